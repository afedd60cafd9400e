"""Pipeline with the fake bundle (unit, fake publisher), the CLI, and end to end with mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import yaml

from edge import config
from edge.__main__ import main
from edge.backends import load_backend
from edge.bundle import Bundle
from edge.errors import BackendError, BundleError, ConfigError
from edge.pipeline import Pipeline
from edge.postprocess import PostProcessor
from edge.sources import EndOfStream, Frame, LiveSource, create_source
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
    "stages_ms",
    "reason",
}


class FakePublisher:
    """Records what the pipeline publishes (edge.mqtt.Publisher's surface)."""

    def __init__(self, fail_rejects: int = 0, fail_results: int = 0):
        self.rejects, self.results, self.metrics = [], [], []
        self.fail_rejects, self.fail_results = fail_rejects, fail_results
        self.flushed = self.closed = False

    def publish_reject(self, event, t_capture=None):
        if self.fail_rejects:
            self.fail_rejects -= 1
            raise OSError("spool disk full")
        self.rejects.append(event)

    def publish_result(self, event, t_capture=None):
        if self.fail_results:
            self.fail_results -= 1
            raise OSError("result encoder broke")
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
    assert set(pub.results[0]) == REJECT_KEYS - {"reason"} | {"decision"}  # a pass: no reason
    assert [e["reason"] for e in pub.rejects] == ["score"] * 3
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
        "wait",
        "infer",
        "handoff",
        "postprocess",
        "postprocess_cpu",
        "publish",
        "decision",
        "total",
    }
    # Per-frame stage stamps add up to the decision latency.
    st = e["stages_ms"]
    assert set(st) == {"preprocess", "wait", "infer", "handoff", "batch"} and st["batch"] == 1
    parts = st["preprocess"] + st["wait"] + st["infer"] + st["handoff"]
    assert 0 < parts <= e["latency_ms"] + 1e-3
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


def test_failed_inference_rejects_the_part_as_unverified(tmp_path, bundle_dir):
    folder = write_frames(tmp_path / "frames", set(), 6, FRAME_SHAPE)  # all good parts
    # Call 1 is the warm-up; calls 2 and 3 are frames 0 and 1; from call 4 (frame 2) it fails.
    p, pub = build(bundle_dir, folder_source(folder), fail_at=4)
    s = p.run()  # 4 failures in a row: not yet fatal
    assert [e["frame"] for e in pub.rejects] == [2, 3, 4, 5]
    assert {e["reason"] for e in pub.rejects} == {"unverified"}
    assert all("illegal memory access" in e["cause"] for e in pub.rejects)
    assert p.errors["infer"] == 4 and s["unverified"] == 4 and s["frames"] == 6
    assert "illegal memory access" in s["last_unverified_cause"]


def test_backend_failing_for_good_is_fatal_and_every_part_gets_a_verdict(tmp_path, bundle_dir):
    from edge.pipeline import FATAL_INFER_FAILURES

    n = FATAL_INFER_FAILURES + 8
    folder = write_frames(tmp_path / "frames", {0, 1}, n, FRAME_SHAPE)
    p, pub = build(bundle_dir, folder_source(folder), fail_at=4)
    with pytest.raises(BackendError, match="illegal memory access"):
        p.run()
    assert [e["reason"] for e in pub.rejects[:2]] == ["score", "score"]
    # Every captured part after frame 1 is rejected, inferred or not: none without a verdict.
    captured = p.station.captured
    assert FATAL_INFER_FAILURES + 2 <= captured <= n
    assert [e["frame"] for e in pub.rejects] == list(range(captured))
    assert {e["reason"] for e in pub.rejects[2:]} == {"unverified"}
    assert p.errors["infer"] == FATAL_INFER_FAILURES and pub.closed


def test_nan_model_output_is_rejected_as_unverified(tmp_path):
    bdir = make_bundle(tmp_path / "nan", SIZE, poison="nan")
    folder = write_frames(tmp_path / "frames", {1}, 4, FRAME_SHAPE, poisoned={2})
    p, pub = build(bdir, folder_source(folder), publish_results=True)
    s = p.run()
    assert [(e["frame"], e["reason"]) for e in pub.rejects] == [(1, "score"), (2, "unverified")]
    assert "non-finite" in pub.rejects[1]["cause"] and s["unverified"] == 1
    assert [r["decision"] for r in pub.results] == ["pass", "reject", "reject", "pass"]


def test_on_error_pass_lets_unverified_parts_through(tmp_path):
    bdir = make_bundle(tmp_path / "nan", SIZE, poison="nan")
    folder = write_frames(tmp_path / "frames", set(), 3, FRAME_SHAPE, poisoned={1})
    p, pub = build(bdir, folder_source(folder), on_error="pass")
    s = p.run()
    assert pub.rejects == [] and s["unverified"] == 1


def test_undecodable_frame_on_a_triggered_line_is_rejected(tmp_path, bundle_dir):
    folder = write_frames(tmp_path / "frames", set(), 3, FRAME_SHAPE)
    (folder / "frame_001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    p, pub = build(bundle_dir, folder_source(folder, keep_unreadable=True))
    s = p.run()
    (e,) = pub.rejects
    assert e["part_id"] == "frame_001" and e["reason"] == "unverified"
    assert "undecodable" in e["cause"] and e["score"] != e["score"]  # NaN: no score
    assert s["frames"] == 3 and s["unverified"] == 1


def test_stage_errors_are_counted_not_fatal(bundle_dir):
    from tests.fakebundle import defect_frame, good_frame

    images = [good_frame(), np.zeros((0, 0, 3), np.uint8), defect_frame(), defect_frame()]
    p, pub = build(bundle_dir, ListSource(images), publisher=FakePublisher(fail_rejects=1))
    s = p.run()
    assert s["errors_by_stage"]["preprocess"] == 1 and s["errors_by_stage"]["publish"] == 1
    # The empty frame is rejected as unverified (the publish that failed is that reject's).
    assert s["errors"] == 2 and s["frames"] == 4 and s["rejects"] == 3 and s["unverified"] == 1
    assert [(e["frame"], e["reason"]) for e in pub.rejects] == [(2, "score"), (3, "score")]


def test_a_failed_result_never_costs_the_reject(tmp_path, bundle_dir):
    folder = write_frames(tmp_path / "frames", {0, 1}, 3, FRAME_SHAPE)
    pub = FakePublisher(fail_results=2)
    p, _ = build(bundle_dir, folder_source(folder), publisher=pub, publish_results=True)
    s = p.run()
    assert s["errors_by_stage"]["publish"] == 2 and s["rejects"] == 2
    assert [e["frame"] for e in pub.rejects] == [0, 1]  # both rejects went out
    assert [e["frame"] for e in pub.results] == [2]


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
    # score_quantiles cover ACCEPTED parts only (drift of good parts): defects stay out.
    assert m["frames"] == 40 and m["score_quantiles"]["max"] < 0.1
    assert m["score_quantiles"]["n"] == 8  # bounded by the window
    # frames 2, 8, .., 38 are defects; the last 8 parts (32..39) hold two of them
    assert m["rejects"] == 7 and m["reject_rate"] == 0.25
    assert all(len(w) == 8 for w in p.latency._w.values())
    assert len(p.station.counters._good_scores) == 8 and len(p.station.counters._recent) == 8
    assert s["frames"] == 40


# ------------------------------------------------------------------------------- config / CLI
def station_yaml(tmp_path, bundle, src, port=1, *, filename="station.yaml", **extra) -> Path:
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
    p = tmp_path / filename
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


def test_run_without_broker_at_start_inspects_and_spools(tmp_path, capsys, bundle_dir):
    """require_broker_at_start: false -> no exit (no systemd restart loop); rejects kept on disk."""
    from edge.spool import Spool
    from tests.broker import free_port

    port = free_port()  # nothing listens there
    frames = write_frames(tmp_path / "f", {1, 3}, 4, FRAME_SHAPE)
    cfg = station_yaml(tmp_path, bundle_dir, frames, port, mqtt={"require_broker_at_start": False})
    code, err = run_cli(capsys, "run", str(cfg))
    assert code == 0, err
    with Spool(tmp_path / "spool.db") as spool:
        assert len(spool) == 2  # both rejects wait for the broker, none lost


def test_cli_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "edge", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    for cmd in ("run", "check", "listen", "bench"):
        assert cmd in out.stdout


def test_edge_imports_no_workstation_packages():
    """The device needs only edge's light dependencies: never torch, train, engines,
    calibration or thresholding (not even edge's TensorRT half, which engines builds with)."""
    code = (
        "import sys, edge.__main__, edge.pipeline, edge.sources, edge.postprocess, "
        "edge.backends.onnxruntime, edge.backends.trt_compat; edge.__main__.build_parser(); "
        "bad = sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('torch', 'train', 'engines', 'calibration', 'thresholding')); "
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
        assert set(e) == REJECT_KEYS | {"seq", "bd_seq"} and e["regions"] and e["line"] == "lineT"
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


# ------------------------------------------------------------------ stations, engines, batching
def test_two_stations_share_one_engine_and_batch(tmp_path, bundle_dir):
    """Frames of two cameras go through one model in batches; each decision goes back to the
    station whose frame it was (a mix-up would show as wrong rejects)."""
    from edge.pipeline import Engine, Station
    from tests.fakebundle import defect_frame, good_frame

    b = Bundle(bundle_dir)
    th = b.thresholds()
    backend = SlowBackend(load_backend("onnxruntime", b), delay_s=0.02)
    backend.dynamic_batch = True
    engine = Engine(backend)  # max_batch 0: one frame per station attached
    defects = {"A": {1, 2, 7}, "B": {0, 5}}
    pubs, stations = {}, []
    for name, bad in defects.items():
        images = [defect_frame() if i in bad else good_frame() for i in range(10)]
        pubs[name] = FakePublisher()
        st = Station(
            source=ListSource(images),
            postprocessor=PostProcessor(th.image_threshold, th.pixel_threshold, 4, SIZE),
            publisher=pubs[name],
            size=SIZE,
            station=name,
            publish_results=True,
        )
        engine.attach(st)
        stations.append(st)
    p = Pipeline.from_stations(stations, [engine])
    s = p.run()
    assert engine.max_batch == 2 and engine.batched_frames == 20
    assert engine.batches < 20  # some inferences took a frame of each camera
    assert s["frames"] == 20 and set(s["stations"]) == {"line1/A", "line1/B"}
    assert s["engines"][0]["stations"] == ["line1/A", "line1/B"]
    for name, bad in defects.items():
        res = pubs[name].results
        assert [r["frame"] for r in res] == list(range(10))
        assert {r["frame"] for r in res if r["decision"] == "reject"} == bad
        assert all(r["station"] == name for r in res)
    batched = [r["stages_ms"]["batch"] for r in pubs["A"].results + pubs["B"].results]
    assert max(batched) == 2


def test_fixed_batch_graph_is_padded(tmp_path):
    bdir = make_bundle(tmp_path / "b2", SIZE, dynamic=False, batch=2)
    folder = write_frames(tmp_path / "frames", {2}, 5, FRAME_SHAPE)
    p, pub = build(bdir, folder_source(folder), publish_results=True)
    assert p.engines[0].max_batch == 2
    s = p.run()
    assert s["frames"] == 5 and [r["decision"] for r in pub.results].count("reject") == 1
    assert pub.rejects[0]["frame"] == 2


class BufferedCamera(LiveSource):
    """A live camera that has already delivered `n` frames into its buffer, then stays idle."""

    def __init__(self, n):
        super().__init__("fake://buffered", buffer=n)
        self.n = n

    def _open_capture(self):
        from tests.fakebundle import good_frame

        class Cam:
            left = self.n

            def read(cam):
                if cam.left <= 0:
                    time.sleep(0.01)
                    return True, None  # the driver returns no image: counted, skipped
                cam.left -= 1
                return True, good_frame()

            def release(cam):
                pass

        return Cam()


def test_triggered_stop_inspects_frames_the_camera_already_buffered(bundle_dir):
    src = BufferedCamera(6)
    src.open()
    deadline = time.monotonic() + 5
    while src.stats()["frames"] < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    p, pub = build(bundle_dir, src, delay_s=0.05, queue_size=1, publish_results=True)
    threading.Timer(0.1, p.stop).start()  # stop while most parts wait in the camera buffer
    s = p.run()
    assert s["captured"] == s["frames"] == 6 and s["drained_after_stop"] > 0
    assert [r["frame"] for r in pub.results] == list(range(6))


def test_continuous_stop_does_not_drain_camera(bundle_dir):
    src = BufferedCamera(6)
    src.open()
    deadline = time.monotonic() + 5
    while src.stats()["frames"] < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    p, _ = build(bundle_dir, src, delay_s=0.05, queue_size=1, mode="continuous")
    threading.Timer(0.1, p.stop).start()
    s = p.run()
    assert s["drained_after_stop"] == 0 and s["frames"] < 6


def test_stations_in_one_process_must_not_share_spool_or_ids(tmp_path, bundle_dir):
    folder = write_frames(tmp_path / "frames", set(), 1, FRAME_SHAPE)
    a = config.load(station_yaml(tmp_path, bundle_dir, folder, filename="a.yaml"))
    b = config.load(station_yaml(tmp_path, bundle_dir, folder, filename="b.yaml"))
    with pytest.raises(ConfigError, match="station"):
        Pipeline.from_configs([a, b], publishers=[FakePublisher(), FakePublisher()])
    b = config.load(
        station_yaml(tmp_path, bundle_dir, folder, filename="b.yaml", station={"name": "other"})
    )
    with pytest.raises(ConfigError, match="mqtt.spool"):
        Pipeline.from_configs([a, b], publishers=[FakePublisher(), FakePublisher()])


# ------------------------------------------------------------------ evidence, recalibration
def test_evidence_and_recalibration_from_config(tmp_path, bundle_dir):
    folder = write_frames(tmp_path / "frames", {1, 3}, 8, FRAME_SHAPE)
    cfg = config.load(
        station_yaml(
            tmp_path,
            bundle_dir,
            folder,
            # Room for every job: this test is about what is written, not about the queue.
            evidence={"dir": "evidence", "sample_pass_rate": 0.5, "queue_size": 16},
            recalibration={"dir": "recal", "sample_rate": 1.0},
            preprocess={"crop": [0, 0, 128, 96]},
        )
    )
    pub = FakePublisher()
    s = Pipeline.from_config(cfg, publisher=pub).run()
    assert s["frames"] == 8 and s["errors"] == 0
    assert s["evidence"]["evidence_written"] == 2 + 3 and s["evidence"]["dropped"] == 0
    for e in pub.rejects:
        assert e["evidence"].endswith("_reject.jpg") and Path(e["evidence"]).is_file()
        side = json.loads(Path(e["evidence"][:-4] + ".json").read_text())
        assert side["event"]["event_id"] == e["event_id"] and side["regions_total"] == 1
    recal = sorted((tmp_path / "recal").glob("*.png"))
    assert [p.stem.split("_", 2)[2] for p in recal] == [
        f"frame_{i:03d}" for i in (0, 2, 4, 5, 6, 7)
    ]
    info = json.loads((tmp_path / "recal" / "recalibration.json").read_text())
    assert info["crop"] == [0, 0, 128, 96] and info["model_input"] == list(SIZE)


# ------------------------------------------------------------------ thresholds hot reload
def test_thresholds_hot_reload_while_running(tmp_path):
    bdir = make_bundle(tmp_path / "b", SIZE)
    folder = write_frames(tmp_path / "frames", {0, 1, 2, 3}, 4, FRAME_SHAPE)  # all defective
    cfg = config.load(
        station_yaml(
            tmp_path,
            bdir,
            folder,
            source={"loop": True, "rate": 100.0},
            thresholds={"check_interval_s": 0.02},
            mqtt={"publish_results": True},
        )
    )
    pub = FakePublisher()
    p = Pipeline.from_config(cfg, publisher=pub)
    out = {}
    t = threading.Thread(target=lambda: out.update(p.run()))
    t.start()

    def wait_results(n):
        deadline = time.monotonic() + 10
        while len(pub.results) < n and time.monotonic() < deadline:
            time.sleep(0.01)

    try:
        wait_results(5)
        th = tmp_path / "b" / "thresholds.yaml"
        n_before = len(pub.results)  # all decided with the old thresholds
        sha = Bundle(tmp_path / "b").model_sha256()
        th.write_text(
            yaml.safe_dump({"image_threshold": 5.0, "pixel_threshold": 5.0, "model_sha256": sha})
        )
        wait_results(n_before + 20)
        th.write_text("image_threshold: [oops\n")  # refused: the 5.0 stay
        n_bad = len(pub.results)
        wait_results(n_bad + 20)
    finally:
        p.stop()
        t.join(10)
    res = pub.results
    assert all(r["decision"] == "reject" and r["image_threshold"] == 0.5 for r in res[:n_before])
    switched = next(i for i, r in enumerate(res) if r["image_threshold"] == 5.0)
    assert switched >= n_before
    assert all(r["image_threshold"] == 5.0 for r in res[switched:])  # kept after the bad file
    assert all(r["decision"] == "pass" for r in res[switched:])  # nothing is above 5.0
    assert len(res) > n_bad + 10
    assert out["thresholds"]["reloads"] == 1 and out["thresholds"]["refused"] == 1
    assert pub.metrics[-1]["thresholds"]["image_threshold"] == 5.0


def test_memory_stays_flat_in_a_long_replay(tmp_path, bundle_dir):
    """Bounded queues, windows and evidence quota: RSS after warm-up does not grow with frames."""
    from edge.bench import rss_mb

    folder = write_frames(tmp_path / "frames", {3, 7}, 10, (240, 320))
    cfg = config.load(
        station_yaml(
            tmp_path,
            bundle_dir,
            folder,
            source={"loop": True},
            evidence={"dir": "ev", "quota_mb": 0.5, "sample_pass_rate": 0.2},
            metrics={"interval_s": 0.2, "window": 256},
            mqtt={"publish_results": True},
        )
    )
    pub = FakePublisher()
    pub.results = deque(maxlen=10)  # the test's recorder must not be what grows
    pub.rejects = deque(maxlen=10)
    pub.metrics = deque(maxlen=10)
    p = Pipeline.from_config(cfg, publisher=pub, max_frames=4000)
    samples = []

    def sample():
        while t.is_alive():
            samples.append((p.station.frames, rss_mb()))
            time.sleep(0.05)

    t = threading.Thread(target=p.run)
    t.start()
    sampler = threading.Thread(target=sample)
    sampler.start()
    t.join(300)
    sampler.join()
    s = p.summary()
    assert s["frames"] == 4000
    warm = [m for n, m in samples if n >= 800]
    assert len(warm) >= 3
    growth = max(warm) - warm[0]
    print(f"\nRSS after 800 frames {warm[0]:.1f} MB, max {max(warm):.1f} MB over 4000 frames")
    assert growth < 10.0, f"RSS grew {growth:.1f} MB between frame 800 and 4000"
    ev = sum(f.stat().st_size for f in (tmp_path / "ev").iterdir())
    assert ev <= 0.5 * 2**20 and s["evidence"]["evidence_deleted"] > 0


def test_heartbeat_stalled_alarm_and_sd_notify(tmp_path, bundle_dir, monkeypatch):
    """A backend that hangs: the source delivers, nothing is decided -> `stalled`; the watchdog
    is fed before, not while stalled; READY=1 once running."""
    import socket

    sock_path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(sock_path))
    server.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))

    class Alarmed(FakePublisher):
        def __init__(self):
            super().__init__()
            self.alarms, self.beats = {}, []

        def raise_alarm(self, kind, text):
            self.alarms[kind] = text

        def clear_alarm(self, kind):
            self.alarms.pop(kind, None)

        def publish_heartbeat(self, info):
            self.beats.append(info)

    folder = write_frames(tmp_path / "frames", set(), 4, FRAME_SHAPE)
    hang = threading.Event()
    p, pub = build(bundle_dir, folder_source(folder, loop=True), publisher=Alarmed())
    p.station.liveness.heartbeat_s, p.station.liveness.stall_s = 0.1, 0.5
    inner = p.engines[0].backend.infer

    def infer(x):
        if hang.is_set():
            hang.wait_released.wait()
        return inner(x)

    hang.wait_released = threading.Event()
    p.engines[0].backend.infer = infer
    runner = threading.Thread(target=p.run, daemon=True)
    runner.start()
    got: list[bytes] = []

    def drain_notify():
        while True:
            try:
                got.append(server.recv(64))
            except socket.timeout:  # TimeoutError only from Python 3.10
                return

    try:
        deadline = time.monotonic() + 10
        while p.station.frames < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        # A beat (every 0.1 s) may go out before the first decision: wait for one after it.
        while not (pub.beats and pub.beats[-1]["last_decided"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        drain_notify()
        assert got[0] == b"READY=1" and b"WATCHDOG=1" in got
        assert pub.beats and pub.beats[-1]["last_decided"]["frame"] >= 0
        hang.set()
        deadline = time.monotonic() + 10
        while "stalled" not in pub.alarms and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "not decided" in pub.alarms["stalled"]
        got.clear()
        drain_notify()
        time.sleep(1.2)
        drain_notify()
        assert b"WATCHDOG=1" not in got  # stalled: systemd's watchdog is not fed
    finally:
        hang.clear()
        hang.wait_released.set()
        p.stop()
        runner.join(10)
        server.close()
    assert "stalled" not in pub.alarms  # cleared when decisions resumed
