"""Station config: strict typed loading, errors naming file and key, path resolution."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Literal

import pytest

from edge import config, typedconfig
from edge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = """\
bundle: bundle
source:
  uri: {uri}
"""


def write(tmp_path: Path, text: str, name: str = "station.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_unknown_key_names_file_and_key(tmp_path):
    p = write(tmp_path, MINIMAL.format(uri="frames/") + "mqtt:\n  hots: 10.0.0.1\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert str(p) in str(e.value) and "mqtt.hots" in str(e.value)


def test_wrong_type_names_file_and_key(tmp_path):
    p = write(tmp_path, MINIMAL.format(uri="frames/") + "mqtt:\n  port: '1883'\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert str(p) in str(e.value) and "mqtt.port" in str(e.value)


def test_invalid_literal_names_key(tmp_path):
    p = write(tmp_path, MINIMAL.format(uri="frames/") + "mode: sometimes\n")
    with pytest.raises(ConfigError, match="mode"):
        config.load(p)


@pytest.mark.parametrize("value", ["2", "true", "'1'"])
def test_result_qos_takes_only_0_or_1(tmp_path, value):
    p = write(tmp_path, MINIMAL.format(uri="frames/") + f"mqtt:\n  result_qos: {value}\n")
    with pytest.raises(ConfigError, match="mqtt.result_qos"):
        config.load(p)
    p.write_text(MINIMAL.format(uri="frames/") + "mqtt:\n  result_qos: 1\n")
    assert config.load(p).mqtt.result_qos == 1


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = write(tmp_path, "bundle: b\nsource: {uri: x\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert str(p) in str(e.value) and "malformed YAML" in str(e.value)


def test_missing_required_key(tmp_path):
    p = write(tmp_path, "bundle: b\n")
    with pytest.raises(ConfigError, match="source"):
        config.load(p)


def test_relative_paths_resolve_against_config_dir(tmp_path, monkeypatch):
    sub = tmp_path / "stations"
    sub.mkdir()
    p = write(
        sub,
        MINIMAL.format(uri="file://frames/")
        + "postprocess:\n  roi_mask: roi.png\nmqtt:\n  spool: spool.sqlite\n",
    )
    monkeypatch.chdir(tmp_path)  # cwd must not matter
    cfg = config.load(p)
    assert cfg.bundle == str(sub / "bundle")
    assert cfg.source.uri == "file://" + str(sub / "frames")
    assert cfg.postprocess.roi_mask == str(sub / "roi.png")
    assert cfg.mqtt.spool == str(sub / "spool.sqlite")
    assert cfg.mqtt.client_id == "lineinspect-line1-station1"


@pytest.mark.parametrize(
    "uri, want",
    [
        ("frames", "{d}/frames"),  # bare relative path
        ("/abs/video.mp4", "/abs/video.mp4"),
        ("file:///abs/dir/", "file:///abs/dir/"),
        ("v4l2:///dev/video0", "v4l2:///dev/video0"),
        ("rtsp://cam/stream", "rtsp://cam/stream"),
    ],
)
def test_source_uri_resolution(tmp_path, uri, want):
    cfg = config.load(write(tmp_path, MINIMAL.format(uri=uri)))
    assert cfg.source.uri == want.format(d=tmp_path)


def test_example_config_loads():
    cfg = config.load(ROOT / "configs" / "station.example.yaml")
    assert cfg.source.uri == "v4l2:///dev/video0"
    assert Path(cfg.bundle).is_absolute()
    assert cfg.mode in ("triggered", "continuous")


def test_new_sections_load_and_resolve(tmp_path):
    p = write(
        tmp_path,
        "bundle: bundle\n"
        "source:\n  uri: rtsp://cam/x\n  reconnect_max_s: 4.0\n  retry_open: false\n"
        "evidence: {dir: ev, sample_pass_rate: 0.1, jpeg_quality: 80}\n"
        "recalibration: {dir: recal, sample_rate: 0.05, quota_mb: 200}\n"
        "thresholds: {watch: false, check_interval_s: 2.0}\n"
        "runtime: {inference_threads: 2, spin: true, opencv_threads: 1, max_batch: 4}\n"
        "metrics: {interval_s: 5.0, window: 512}\n",
    )
    cfg = config.load(p)
    assert cfg.source.reconnect_max_s == 4.0 and cfg.source.retry_open is False
    assert cfg.evidence.dir == str(tmp_path / "ev") and cfg.evidence.jpeg_quality == 80
    assert cfg.recalibration.dir == str(tmp_path / "recal") and cfg.recalibration.quota_mb == 200
    assert cfg.thresholds.watch is False and cfg.runtime.spin is True
    assert cfg.runtime.max_batch == 4 and cfg.metrics.window == 512


@pytest.mark.parametrize(
    "extra, key",
    [
        ("evidence: {sample_pass_rate: 1.5}\n", "evidence.sample_pass_rate"),
        ("evidence: {quota_mb: 0}\n", "evidence.quota_mb"),
        ("recalibration: {sample_rate: -0.1}\n", "recalibration.sample_rate"),
        ("runtime: {inference_threads: -1}\n", "runtime.inference_threads"),
        ("source: {uri: x, reconnect_min_s: 5.0, reconnect_max_s: 1.0}\n", "source.reconnect"),
        ("source: {uri: x, timeout_s: 0}\n", "source.timeout_s"),
        ("thresholds: {check_interval_s: 0}\n", "thresholds.check_interval_s"),
        ("metrics: {window: 0}\n", "metrics"),
        ("runtime: {threads: 2}\n", "runtime.threads"),
    ],
)
def test_new_sections_reject_bad_values_naming_the_key(tmp_path, extra, key):
    text = MINIMAL.format(uri="frames/")
    if extra.startswith("source:"):
        text = "bundle: bundle\n"
    p = write(tmp_path, text + extra)
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert str(p) in str(e.value) and key in str(e.value)
    assert "source.source" not in str(e.value)


@pytest.mark.parametrize(
    "extra, key",
    [
        ("station: {line: 'a/b'}\n", "line"),
        ("station: {line: 'l#1'}\n", "line"),
        ("station: {name: 'st+'}\n", "name"),
        ("station: {name: 'st 1'}\n", "name"),
        ('station: {name: "st\\t1"}\n', "name"),
        ('station: {name: "st\\x01"}\n', "name"),
        ("station: {name: ''}\n", "name"),
        ("station: {name: '-st'}\n", "name"),
        ("station: {name: " + "s" * 65 + "}\n", "name"),
        ("mqtt: {prefix: 'plant/a'}\n", "prefix"),
        ("mqtt: {prefix: '#'}\n", "prefix"),
    ],
)
def test_names_that_would_break_topics_are_refused(tmp_path, extra, key):
    p = write(tmp_path, MINIMAL.format(uri="frames/") + extra)
    with pytest.raises(ConfigError) as e:
        config.load(p)
    msg = str(e.value)
    assert str(p) in msg and key in msg and "\n" not in msg


def test_good_names_load(tmp_path):
    text = "station: {line: L-2.a, name: st_1}\nmqtt: {prefix: plant.A}\n"
    cfg = config.load(write(tmp_path, MINIMAL.format(uri="frames/") + text))
    assert cfg.topic_base == "plant.A/L-2.a/st_1"


def creds(tmp_path, text, mode=0o600):
    c = tmp_path / "creds.yaml"
    c.write_text(text)
    c.chmod(mode)
    return c


def test_credentials_file_overrides_mqtt_credentials(tmp_path):
    creds(tmp_path, "mqtt_username: li\nmqtt_password: s3cr3t-pw\n")
    text = "mqtt: {username: old, password: old-pw}\ncredentials_file: creds.yaml\n"
    cfg = config.load(write(tmp_path, MINIMAL.format(uri="frames/") + text))
    assert cfg.mqtt.username == "li" and cfg.mqtt.password == "s3cr3t-pw"
    assert cfg.credentials_file == str(tmp_path / "creds.yaml")


@pytest.mark.parametrize(
    "text, mode, why",
    [
        ("mqtt_password: s3cr3t-pw\n", 0o640, "group/others"),
        ("mqtt_password: s3cr3t-pw\n", 0o604, "group/others"),
        ("mqtt_pasword: s3cr3t-pw\n", 0o600, "unknown key mqtt_pasword"),
        ("mqtt_password: 12\n", 0o600, "non-empty string"),
    ],
)
def test_credentials_file_refused(tmp_path, text, mode, why):
    c = creds(tmp_path, text, mode)
    p = write(tmp_path, MINIMAL.format(uri="frames/") + "credentials_file: creds.yaml\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    msg = str(e.value)
    assert str(c) in msg and why in msg and "s3cr3t" not in msg and "\n" not in msg


def test_missing_credentials_file_named(tmp_path):
    p = write(tmp_path, MINIMAL.format(uri="frames/") + "credentials_file: nope.yaml\n")
    with pytest.raises(ConfigError, match="nope.yaml"):
        config.load(p)


@pytest.mark.parametrize(
    "uri, want",
    [
        ("rtsp://user:pa:ss@cam.local:554/x", "rtsp://***@cam.local:554/x"),
        ("rtsp://user@cam/x", "rtsp://***@cam/x"),
        ("rtsp://cam/x", "rtsp://cam/x"),
        ("/data/frames", "/data/frames"),
        ("cannot open rtsp://u:p@h/s (timeout)", "cannot open rtsp://***@h/s (timeout)"),
    ],
)
def test_redact_uri(uri, want):
    from edge.redact import redact_uri

    assert redact_uri(uri) == want


# ------------------------------------------------------------------ annotations on Python 3.8
@dataclasses.dataclass
class _Inner:
    n: int = 0


@dataclasses.dataclass
class _Spelled:
    a: int | None = None
    b: list[int] = dataclasses.field(default_factory=list)
    c: dict[str, float] = dataclasses.field(default_factory=dict)
    d: tuple[int, ...] = ()
    e: Literal["x", "y"] = "x"
    f: _Inner | None = None
    g: typing.Optional[str] = None  # noqa: UP045 - the old spelling must work too


def test_typedconfig_reads_new_style_annotations_on_every_python():
    """`X | None`, `list[int]` ... are strings here (from __future__ import annotations);
    typedconfig parses them itself, so Python 3.8 (JetPack 5) reads the same config trees."""
    hints = typedconfig.type_hints(_Spelled)
    assert hints["a"] == typing.Optional[int] and hints["b"] == typing.List[int]  # noqa: UP006
    data = {"a": 3, "b": [1, 2], "c": {"k": 1}, "d": [4, 5], "e": "y", "f": {"n": 7}, "g": "s"}
    obj = typedconfig.from_dict(_Spelled, data)
    assert obj == _Spelled(3, [1, 2], {"k": 1.0}, (4, 5), "y", _Inner(7), "s")
    with pytest.raises(ConfigError, match="e: invalid value 'z'"):
        typedconfig.from_dict(_Spelled, {"e": "z"})
    with pytest.raises(ConfigError, match=r"b\[1\]: expected an integer"):
        typedconfig.from_dict(_Spelled, {"b": [1, "2"]})
