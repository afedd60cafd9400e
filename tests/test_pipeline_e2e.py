"""End to end against a real mosquitto: replays, a misbehaving camera, SIGTERM, SIGHUP, several
stations in one process, the Prometheus endpoint, and the benchmark command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import pytest
import yaml

from edge.__main__ import main
from edge.bundle import Bundle
from edge.listen import Listener
from tests.broker import free_port
from tests.fakebundle import defect_frame, good_frame, make_bundle, write_frames

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[1]
SIZE = (64, 64)
SHAPE = (96, 128)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"), SIZE)


def station(tmp_path, bundle, uri, port, name="st1", **sections) -> Path:
    d = {
        "station": {"line": "lineE", "name": name},
        "bundle": str(bundle),
        "source": {"uri": str(uri)},
        "mqtt": {
            "host": "127.0.0.1",
            "port": port,
            "connect_timeout_s": 5.0,
            "spool": f"spool-{name}.db",
            "publish_results": True,
        },
        "metrics": {"interval_s": 0.2},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            d.setdefault(key, {}).update(value)
        else:
            d[key] = value
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def write_video(path: Path, defective: set[int], n: int) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (SHAPE[1], SHAPE[0]))
    assert w.isOpened()
    for i in range(n):
        w.write(defect_frame(SHAPE) if i in defective else good_frame(SHAPE))
    w.release()
    return path


def results(listener):
    return [e.payload for e in listener.events if e.kind == "result"]


def spawn(*argv):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "edge", *argv],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def finish(proc, sig=signal.SIGTERM, timeout=30):
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize("kind", ["folder", "video"])
def test_replay_one_decision_per_frame_in_order(tmp_path, mosquitto, bundle_dir, capsys, kind):
    defective = {1, 4, 5, 9}
    n = 12
    if kind == "folder":
        src = write_frames(tmp_path / "frames", defective, n, SHAPE)
    else:
        src = write_video(tmp_path / "line.avi", defective, n)
    cfg = station(tmp_path, bundle_dir, src, mosquitto.port)
    with Listener(mosquitto.host, mosquitto.port, "lineinspect/lineE/st1") as listener:
        assert main(["run", str(cfg), "--summary-json", str(tmp_path / "s.json")]) == 0
        assert listener.wait_for(lambda: len(results(listener)) >= n, 10)
        assert listener.wait_rejects(len(defective), 10)
    res = results(listener)
    assert [r["frame"] for r in res] == list(range(n))  # one each, in order
    assert [r["decision"] == "reject" for r in res] == [i in defective for i in range(n)]
    assert sorted(e["frame"] for e in listener.rejects()) == sorted(defective)
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["frames"] == n and s["drops"] == 0 and s["errors"] == 0


def test_rtsp_closed_port_is_survived_and_reported(tmp_path, mosquitto, bundle_dir):
    uri = f"rtsp://127.0.0.1:{free_port()}/cam"
    cfg = station(
        tmp_path,
        bundle_dir,
        uri,
        mosquitto.port,
        source={"reconnect_min_s": 0.05, "reconnect_max_s": 0.2, "timeout_s": 0.2},
    )
    mport = free_port()
    with Listener(mosquitto.host, mosquitto.port, "lineinspect/lineE/st1") as listener:
        proc = spawn("run", str(cfg), "--metrics-port", str(mport), "--metrics-host", "127.0.0.1")
        try:

            def reported():
                ms = [e.payload for e in listener.events if e.kind == "metrics"]
                return ms and ms[-1]["source"]["reconnect_attempts"] >= 3

            assert listener.wait_for(reported, 30), "no metrics reporting the reconnects"
            m = [e.payload for e in listener.events if e.kind == "metrics"][-1]
            assert m["source"]["connected"] is False and "cannot open" in m["source"]["last_error"]
            assert proc.poll() is None  # still running, waiting for the camera
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                text = r.read().decode()
            assert 'lineinspect_source_connected{line="lineE",station="st1"} 0' in text
            assert "lineinspect_source_reconnect_attempts_total" in text
        finally:
            code, err = finish(proc)
    assert code == 0, err
    assert "cannot open" in err and "still unavailable" in err


def test_truncated_video_is_survived_and_reported(tmp_path, mosquitto, bundle_dir, capsys):
    full = write_video(tmp_path / "full.avi", {2}, 20)
    data = full.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) * 3 // 5])
    cfg = station(tmp_path, bundle_dir, cut, mosquitto.port)
    with Listener(mosquitto.host, mosquitto.port, "lineinspect/lineE/st1") as listener:
        assert main(["run", str(cfg), "--summary-json", str(tmp_path / "s.json")]) == 0
        s = json.loads((tmp_path / "s.json").read_text())
        assert listener.wait_for(lambda: len(results(listener)) >= s["frames"], 10)
    assert 0 < s["frames"] < 20 and s["errors"] == 0
    assert s["source"]["truncated"] == 1
    assert [r["frame"] for r in results(listener)] == list(range(s["frames"]))
    assert "truncated or corrupt" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_loses_no_captured_part(tmp_path, mosquitto, bundle_dir):
    defective = {1, 3}
    folder = write_frames(tmp_path / "frames", defective, 5, SHAPE)
    cfg = station(tmp_path, bundle_dir, folder, mosquitto.port, source={"loop": True, "rate": 40.0})
    summary = tmp_path / "s.json"
    with Listener(mosquitto.host, mosquitto.port, "lineinspect/lineE/st1") as listener:
        proc = spawn("run", str(cfg), "--summary-json", str(summary))
        try:
            assert listener.wait_for(lambda: len(results(listener)) >= 20, 30)
        finally:
            code, err = finish(proc)  # mid-run, frames in every queue
        assert code == 0, err
        s = json.loads(summary.read_text())
        n = s["captured"]
        assert listener.wait_for(lambda: len(results(listener)) >= n, 10)
        assert listener.wait_rejects(sum(1 for i in range(n) if i % 5 in defective), 10)
    assert s["frames"] == n and s["drops"] == 0 and s["errors"] == 0
    assert sorted(r["frame"] for r in results(listener)) == list(range(n))
    assert sorted(e["frame"] for e in listener.rejects()) == [
        i for i in range(n) if i % 5 in defective
    ]
    assert s["publisher"]["spooled"] == 0  # every reject acknowledged before exit


def test_two_stations_in_one_process_both_publish(tmp_path, mosquitto, bundle_dir):
    fa = write_frames(tmp_path / "a", {0, 2}, 4, SHAPE)
    fb = write_frames(tmp_path / "b", {3}, 5, SHAPE)
    ca = station(tmp_path, bundle_dir, fa, mosquitto.port, name="camA")
    cb = station(tmp_path, bundle_dir, fb, mosquitto.port, name="camB")
    with Listener(mosquitto.host, mosquitto.port, "lineinspect/lineE") as listener:
        code = main(["run", str(ca), str(cb), "--summary-json", str(tmp_path / "s.json")])
        assert code == 0
        assert listener.wait_rejects(3, 10)
        assert listener.wait_for(lambda: len(results(listener)) >= 9, 10)
    by_station = {}
    for e in listener.rejects():
        by_station.setdefault(e["station"], []).append(e["part_id"])
    assert by_station == {"camA": ["frame_000", "frame_002"], "camB": ["frame_003"]}
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["frames"] == 9 and set(s["stations"]) == {"lineE/camA", "lineE/camB"}
    (engine,) = s["engines"]  # one model loaded for both cameras
    assert engine["stations"] == ["lineE/camA", "lineE/camB"]
    topics = {e.topic for e in listener.events if e.kind == "status"}
    assert topics == {"lineinspect/lineE/camA/status", "lineinspect/lineE/camB/status"}


@pytest.mark.slow
def test_sighup_reloads_thresholds(tmp_path, mosquitto):
    bdir = make_bundle(tmp_path / "bundle", SIZE)
    folder = write_frames(tmp_path / "frames", {0, 1}, 2, SHAPE)  # every part defective
    cfg = station(
        tmp_path,
        bdir,
        folder,
        mosquitto.port,
        source={"loop": True, "rate": 30.0},
        thresholds={"watch": False},  # only SIGHUP may reload
    )
    with Listener(mosquitto.host, mosquitto.port, "lineinspect/lineE/st1") as listener:
        proc = spawn("run", str(cfg))
        try:
            assert listener.wait_for(lambda: len(results(listener)) >= 3, 30)
            (bdir / "thresholds.yaml").write_text(
                yaml.safe_dump(
                    {
                        "image_threshold": 9.0,
                        "pixel_threshold": 9.0,
                        "model_sha256": Bundle(bdir).model_sha256(),
                    }
                )
            )
            time.sleep(0.3)
            assert all(r["image_threshold"] == 0.5 for r in results(listener))  # not watched
            proc.send_signal(signal.SIGHUP)
            assert listener.wait_for(
                lambda: any(r["image_threshold"] == 9.0 for r in results(listener)), 10
            )
        finally:
            code, err = finish(proc)
    assert code == 0, err
    assert "SIGHUP" in err and "thresholds reloaded" in err
    after = [r for r in results(listener) if r["image_threshold"] == 9.0]
    assert after and all(r["decision"] == "pass" for r in after)


@pytest.mark.slow
def test_bench_writes_its_figures(tmp_path, mosquitto, bundle_dir):
    folder = write_frames(tmp_path / "frames", {2}, 6, SHAPE)
    out = tmp_path / "bench.json"
    argv = ["bench", "--bundle", str(bundle_dir), "--source", str(folder), "--frames", "12"]
    argv += ["--rounds", "1", "--json", str(out), "--broker", f"127.0.0.1:{mosquitto.port}"]
    argv += ["--soak", "3"]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["backend"]["images_per_s"] > 0 and r["pipeline"]["images_per_s"] > 0
    assert r["pipeline"]["ratio"] == pytest.approx(r["rounds"][0]["ratio"])
    lat = r["latency"]
    assert lat["frames"] == 12 and lat["results_received"] == 12 and lat["rejects_received"] == 2
    assert lat["e2e_ms"]["p99"] >= lat["e2e_ms"]["p50"] > 0  # capture -> PUBACK, every part
    assert lat["e2e_reject_ms"]["p99"] >= lat["e2e_reject_ms"]["p50"] > 0
    assert lat["delivered_ms"]["p50"] > 0  # capture -> the subscriber got it
    assert set(r["acceptance"]) == {
        "throughput_ratio_ge_0.95",
        "postprocess_p99_le_2ms",
        "e2e_p99_le_1.5x_backend_p50_plus_5ms",
        "reject_e2e_p99_le_limit",  # the rejects' own capture -> PUBACK p99, same limit
    }
    assert r["soak"]["frames"] > 0 and r["soak"]["rss_mb_max"] > 0 and r["peak_rss_mb"] > 0
