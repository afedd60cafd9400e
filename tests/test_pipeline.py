"""Pipeline with the fake bundle (unit, fake publisher), the CLI, and end to end with mosquitto."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from edge import config
from edge.__main__ import main
from edge.backends import load_backend
from edge.bundle import Bundle
from edge.errors import BackendError, BundleError
from edge.pipeline import Pipeline
from edge.postprocess import PostProcessor
from edge.sources import EndOfStream, Frame, create_source
from tests.fakebundle import make_bundle, write_frames

ROOT = Path(__file__).resolve().parents[1]
SIZE = (64, 64)
FRAME_SHAPE = (96, 128)
REJECT_KEYS = {
    "event_id",
    "station",
    "line",
    "part_id",
    "frame",
    "capture_time",
    "score",
    "image_threshold",
    "pixel_threshold",
    "regions",
    "model",
    "latency_ms",
    "evidence",
}


class FakePublisher:
    """Records what the pipeline publishes (edge.mqtt.Publisher's surface)."""

    def __init__(self, fail_rejects: int = 0):
        self.rejects, self.results, self.metrics = [], [], []
        self.fail_rejects = fail_rejects
        self.flushed = self.closed = False

    def publish_reject(self, event):
        if self.fail_rejects:
            self.fail_rejects -= 1
            raise OSError("spool disk full")
        self.rejects.append(event)

    def publish_result(self, event):
        self.results.append(event)

    def publish_metrics(self, d):
        json.dumps(d)  # must be JSON-serialisable as is
        self.metrics.append(d)

    def flush(self, timeout_s):
        self.flushed = True
        return True

    def close(self, timeout_s=5):
        self.closed = True

    def stats(self):
        return {"published": len(self.rejects)}


class SlowBackend:
    """Delegates to a real backend, slowly; optionally fails at call number `fail_at`."""

    def __init__(self, inner, delay_s: float = 0.0, fail_at: int | None = None):
        self.inner, self.delay_s, self.fail_at = inner, delay_s, fail_at
        self.name, self.input_shape = inner.name, inner.input_shape
        self.calls = 0

    def infer(self, batch):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        time.sleep(self.delay_s)
        return self.inner.infer(batch)

    def close(self):
        self.inner.close()


class ListSource:
    """Frames from a list (for odd frames the file sources would never produce)."""

    uri = "list://"

    def __init__(self, images):
        self.images, self.i = list(images), 0

    def open(self):
        pass

    def read(self, timeout=None):
        if self.i >= len(self.images):
            raise EndOfStream(self.uri)
        img = self.images[self.i]
        self.i += 1
        return Frame(img, self.i - 1, time.time(), str(self.i - 1), "list")

    def close(self):
        pass

    def stats(self):
        return {"frames": self.i}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"), SIZE)


def build(bundle_dir, source, *, delay_s=0.0, fail_at=None, publisher=None, **kw):
    b = Bundle(bundle_dir)
    th = b.thresholds()
    backend = SlowBackend(load_backend("onnxruntime", b), delay_s, fail_at)
    post = PostProcessor(th.image_threshold, th.pixel_threshold, th.min_region_area, SIZE)
    pub = publisher or FakePublisher()
    kw.setdefault("model", {"name": b.manifest.name, "sha256": b.model_sha256()})
    p = Pipeline(source=source, backend=backend, postprocessor=post, publisher=pub, size=SIZE, **kw)
    return p, pub


def folder_source(folder, **kw):
    src = create_source(str(folder), **kw)
    src.open()
    return src


def test_one_decision_per_frame_in_order(tmp_path, bundle_dir):
    defective = {1, 4, 5}
    folder = write_frames(tmp_path / "frames", defective, 8, FRAME_SHAPE)
    p, pub = build(bundle_dir, folder_source(folder), publish_results=True, station="s7", line="L2")
    s = p.run()
    assert s["frames"] == 8 and s["rejects"] == 3 and s["passes"] == 5
    assert s["drops"] == 0 and s["errors"] == 0
    assert [r["frame"] for r in pub.results] == list(range(8))
    assert [r["decision"] == "reject" for r in pub.results] == [i in defective for i in range(8)]
    assert [e["part_id"] for e in pub.rejects] == ["frame_001", "frame_004", "frame_005"]
    e = pub.rejects[0]
    assert set(e) == REJECT_KEYS
    assert set(pub.results[0]) == REJECT_KEYS | {"decision"}
    assert e["station"] == "s7" and e["line"] == "L2" and e["evidence"] is None
    assert e["score"] > 0.9 and e["image_threshold"] == 0.5 and e["pixel_threshold"] == 0.5
    assert e["model"]["name"] == "fake" and len(e["model"]["sha256"]) == 64
    assert e["latency_ms"] >= 0 and abs(e["capture_time"] - time.time()) < 60
    # Defect patch at x 40..63, y 30..49 of a 128x96 frame; bbox in frame pixels.
    (region,) = e["regions"]
    x, y, w, h = region["bbox"]
    assert abs(x - 40) <= 2 and abs(y - 30) <= 2 and abs(x + w - 64) <= 2 and abs(y + h - 50) <= 2
    assert region["area"] > 0 and region["peak"] > 0.9
    assert len({e["event_id"] for e in pub.rejects}) == 3
    json.dumps(pub.rejects)
    assert pub.flushed and pub.closed
    assert set(s["latency_ms"]) == {
        "preprocess",
        "infer",
        "postprocess",
        "publish",
        "decision",
        "total",
    }
    assert s["latency_ms"]["total"]["p99"] >= s["latency_ms"]["total"]["p50"] > 0
    assert s["fps"] > 0 and s["source"]["frames"] == 8
    assert pub.metrics  # at least the final metrics
    # The published shapes match the documented contracts in edge/schemas/.
    jsonschema = pytest.importorskip("jsonschema")
    schemas = {
        n: jsonschema.Draft202012Validator(
            json.loads((ROOT / f"edge/schemas/{n}.json").read_text())
        )
        for n in ("reject", "result", "metrics")
    }
    for kind, docs in (("reject", pub.rejects), ("result", pub.results), ("metrics", pub.metrics)):
        for doc in docs:
            errors = [e.message for e in schemas[kind].iter_errors(json.loads(json.dumps(doc)))]
            assert not errors, (kind, errors)


def test_triggered_never_drops_under_overload(tmp_path, bundle_dir):
    folder = write_frames(tmp_path / "frames", {3}, 15, FRAME_SHAPE)
    p, pub = build(
        bundle_dir, folder_source(folder), delay_s=0.01, queue_size=1, publish_results=True
    )
    s = p.run()
    assert s["frames"] == 15 and s["drops"] == 0
    assert [r["frame"] for r in pub.results] == list(range(15))


def test_continuous_drops_oldest_under_overload(tmp_path, bundle_dir):
    folder = write_frames(tmp_path / "frames", set(), 30, FRAME_SHAPE)
    p, pub = build(
        bundle_dir,
        folder_source(folder),
        delay_s=0.03,
        mode="continuous",
        queue_size=2,
        publish_results=True,
    )
    s = p.run()
    seqs = [r["frame"] for r in pub.results]
    assert s["drops"] > 0 and s["captured"] == 30
    assert s["frames"] + s["drops"] == 30  # every frame either decided or counted as dropped
    assert seqs == sorted(seqs) and seqs[-1] == 29  # the newest frames survive


def test_stop_drains_captured_frames(tmp_path, bundle_dir):
    folder = write_frames(tmp_path / "frames", {0}, 5, FRAME_SHAPE)
    p, pub = build(bundle_dir, folder_source(folder, loop=True), delay_s=0.01, queue_size=3)
    threading.Timer(0.3, p.stop).start()
    t = time.monotonic()
    s = p.run()
    assert time.monotonic() - t < 5
    assert s["frames"] == s["captured"] > 5  # everything captured went through
    assert s["drops"] == 0 and s["rejects"] == len(pub.rejects) > 0
    assert pub.flushed and pub.closed


def test_max_frames(tmp_path, bundle_dir):
    folder = write_frames(tmp_path / "frames", set(), 5, FRAME_SHAPE)
    p, _ = build(bundle_dir, folder_source(folder, loop=True), max_frames=7)
    assert p.run()["frames"] == 7


def test_backend_failure_is_fatal_and_drains(tmp_path, bundle_dir):
    folder = write_frames(tmp_path / "frames", {0, 1, 2, 3, 4, 5}, 6, FRAME_SHAPE)
    # Call 1 is the warm-up; calls 2 and 3 are frames 0 and 1; call 4 (frame 2) fails.
    p, pub = build(bundle_dir, folder_source(folder), fail_at=4)
    with pytest.raises(BackendError, match="illegal memory access"):
        p.run()
    assert [e["frame"] for e in pub.rejects] == [0, 1]  # already inferred: still published
    assert p.errors["infer"] == 1 and pub.closed


def test_stage_errors_are_counted_not_fatal(bundle_dir):
    from tests.fakebundle import defect_frame, good_frame

    images = [good_frame(), np.zeros((0, 0, 3), np.uint8), defect_frame(), defect_frame()]
    p, pub = build(bundle_dir, ListSource(images), publisher=FakePublisher(fail_rejects=1))
    s = p.run()
    assert s["errors_by_stage"]["preprocess"] == 1 and s["errors_by_stage"]["publish"] == 1
    assert s["errors"] == 2 and s["frames"] == 3 and s["rejects"] == 2
    assert [e["frame"] for e in pub.rejects] == [3]


def test_periodic_metrics_and_bounded_windows(tmp_path, bundle_dir):
    folder = write_frames(tmp_path / "frames", {2}, 6, FRAME_SHAPE)
    p, pub = build(
        bundle_dir,
        folder_source(folder, loop=True),
        delay_s=0.01,
        metrics_interval_s=0.05,
        window=8,
    )
    p.max_frames = 40
    s = p.run()
    assert len(pub.metrics) >= 3
    m = pub.metrics[-1]
    for key in ("fps", "frames", "rejects", "reject_rate", "drops", "errors", "latency_ms"):
        assert key in m
    assert m["frames"] == 40 and m["score_quantiles"]["max"] > 0.9
    assert all(len(w) == 8 for w in p.latency._w.values()) and len(p._scores) == 8
    assert s["frames"] == 40


# ------------------------------------------------------------------------------- config / CLI
def station_yaml(tmp_path, bundle, src, port=1, **extra) -> Path:
    d = {
        "station": {"line": "lineT", "name": "stT"},
        "bundle": str(bundle),
        "source": {"uri": str(src)},
        "mqtt": {"host": "127.0.0.1", "port": port, "connect_timeout_s": 1.0, "spool": "spool.db"},
        "metrics": {"interval_s": 0.5},
    }
    for k, v in extra.items():
        d.setdefault(k, {})
        if isinstance(v, dict):
            d[k].update(v)
        else:
            d[k] = v
    p = tmp_path / "station.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_from_config_with_fake_publisher(tmp_path, bundle_dir):
    folder = write_frames(tmp_path / "frames", {2}, 4, FRAME_SHAPE)
    cfg = config.load(station_yaml(tmp_path, bundle_dir, folder, mqtt={"publish_results": True}))
    pub = FakePublisher()
    s = Pipeline.from_config(cfg, publisher=pub).run()
    assert s["frames"] == 4 and [e["part_id"] for e in pub.rejects] == ["frame_002"]
    assert len(pub.results) == 4 and pub.rejects[0]["station"] == "stT"


def test_from_config_refuses_bundle_without_thresholds(tmp_path):
    b = make_bundle(tmp_path / "b", SIZE, with_thresholds=False)
    folder = write_frames(tmp_path / "frames", set(), 1, FRAME_SHAPE)
    cfg = config.load(station_yaml(tmp_path, b, folder))
    with pytest.raises(BundleError, match="calibration fit"):
        Pipeline.from_config(cfg, publisher=FakePublisher())


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_cli_missing_bundle_file(tmp_path, capsys):
    b = make_bundle(tmp_path / "b", SIZE)
    (b / "model.onnx").unlink()
    cfg = station_yaml(tmp_path, b, write_frames(tmp_path / "f", set(), 1, FRAME_SHAPE))
    code, err = run_cli(capsys, "run", str(cfg))
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and str(b / "model.onnx") in err[0]


def test_cli_malformed_yaml(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("bundle: [unclosed\n")
    for cmd in ("run", "check"):
        code, err = run_cli(capsys, cmd, str(p))
        assert code == 2 and len(err) == 1 and str(p) in err[0] and "YAML" in err[0]


def test_cli_run_without_thresholds(tmp_path, capsys):
    b = make_bundle(tmp_path / "b", SIZE, with_thresholds=False)
    cfg = station_yaml(tmp_path, b, write_frames(tmp_path / "f", set(), 1, FRAME_SHAPE))
    code, err = run_cli(capsys, "run", str(cfg))
    assert code == 2 and len(err) == 1 and "thresholds.yaml" in err[0] and "calibration" in err[0]


def test_cli_unreachable_broker(tmp_path, capsys, bundle_dir):
    from tests.broker import free_port

    port = free_port()  # nothing listens there
    cfg = station_yaml(
        tmp_path, bundle_dir, write_frames(tmp_path / "f", set(), 2, FRAME_SHAPE), port
    )
    for cmd in ("run", "check"):
        code, err = run_cli(capsys, cmd, str(cfg))
        errors = [line for line in err if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and err[-1] == errors[0]
        assert f"127.0.0.1:{port}" in errors[0]


def test_cli_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "edge", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    for cmd in ("run", "check", "listen"):
        assert cmd in out.stdout
    assert "bench" not in out.stdout


def test_edge_imports_no_workstation_packages():
    """The device needs only edge's light dependencies: never torch, train, engines, calibration."""
    code = (
        "import sys, edge.__main__, edge.pipeline, edge.sources, edge.postprocess, "
        "edge.backends.onnxruntime; edge.__main__.build_parser(); "
        "bad = sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('torch', 'train', 'engines', 'calibration')); "
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------------- end to end (broker)
@pytest.mark.broker
def test_end_to_end_rejects_over_mqtt(tmp_path, mosquitto, bundle_dir, capsys):
    from edge.listen import Listener

    defective = {1, 4, 7, 8}
    folder = write_frames(tmp_path / "frames", defective, 10, FRAME_SHAPE)
    cfg_path = station_yaml(tmp_path, bundle_dir, folder, mosquitto.port)
    cfg = config.load(cfg_path)
    summary = tmp_path / "summary.json"
    with Listener(mosquitto.host, mosquitto.port, cfg.topic_base) as listener:
        code = main(["run", str(cfg_path), "--summary-json", str(summary)])
        assert code == 0, capsys.readouterr().err
        assert listener.wait_rejects(len(defective), timeout=10)
        assert listener.wait_status("offline", timeout=5)
        time.sleep(0.3)  # a stray extra reject would have arrived by now
        rejects = listener.rejects()
    assert sorted(e["part_id"] for e in rejects) == [f"frame_{i:03d}" for i in sorted(defective)]
    assert len({e["event_id"] for e in rejects}) == len(rejects) == len(defective)
    for e in rejects:
        assert set(e) == REJECT_KEYS and e["regions"] and e["line"] == "lineT"
    s = json.loads(summary.read_text())
    assert s["frames"] == 10 and s["rejects"] == len(defective) and s["drops"] == 0

    code, err = run_cli(capsys, "check", str(cfg_path))
    assert code == 0, err
    out = capsys.readouterr().out
    assert "all checks passed" in out or code == 0


@pytest.mark.broker
def test_check_prints_findings(tmp_path, mosquitto, bundle_dir, capsys):
    folder = write_frames(tmp_path / "frames", {0}, 2, FRAME_SHAPE)
    cfg = station_yaml(tmp_path, bundle_dir, folder, mosquitto.port)
    assert main(["check", str(cfg)]) == 0
    out = capsys.readouterr().out
    for what in ("config", "bundle", "thresholds", "backend", "source", "inference", "broker"):
        assert f"ok    {what}" in out
    assert "reject" in out and f"127.0.0.1:{mosquitto.port}" in out


@pytest.mark.broker
@pytest.mark.slow
def test_sigterm_drains_and_exits_zero(tmp_path, mosquitto, bundle_dir):
    folder = write_frames(tmp_path / "frames", {1}, 4, FRAME_SHAPE)
    cfg = station_yaml(
        tmp_path, bundle_dir, folder, mosquitto.port, source={"loop": True, "rate": 50.0}
    )
    summary = tmp_path / "summary.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "run", str(cfg), "--summary-json", str(summary)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        # Wait until it is connected and running, then ask it to stop.
        deadline = time.monotonic() + 30
        for line in proc.stderr:
            if "connected to MQTT broker" in line or time.monotonic() > deadline:
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    s = json.loads(summary.read_text())
    assert s["frames"] == s["captured"] > 0 and s["drops"] == 0
