"""Station config: strict typed loading, errors naming file and key, path resolution."""

from pathlib import Path

import pytest

from edge import config
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
