"""Metrics: rolling windows, quantiles, Prometheus text exposition and its HTTP endpoint."""

from __future__ import annotations

import re
import threading
import urllib.error
import urllib.request

import pytest

from edge.errors import ConfigError
from edge.metrics import LatencyWindows, MetricsServer, quantiles, render_prometheus

SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>[^}]*)\})? (?P<value>[-+0-9.eE]+|[+-]Inf)$"
)
LABEL = re.compile(r'^[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"$')


def snapshot(station="s1", **over):
    s = {
        "station": station,
        "line": 'L"1',  # a quote: must be escaped
        "frames": 10,
        "captured": 11,
        "rejects": 2,
        "drops": 1,
        "fps": 12.5,
        "reject_rate": 0.2,
        "uptime_s": 3.0,
        "errors": {"capture": 0, "publish": 1},
        "latency_ms": {
            "infer": {"p50": 10.0, "p95": 12.0, "p99": 13.0},
            "total": {"p50": None, "p95": None, "p99": None},
        },
        "score_quantiles": {"p50": 0.1, "p95": 0.2, "p99": 0.25, "max": 0.3, "n": 8},
        "source": {"connected": False, "reconnects": 0, "reconnect_attempts": 4, "corrupt": 1},
        "thresholds": {
            "image_threshold": 0.5,
            "pixel_threshold": 0.4,
            "min_region_area": 9,
            "reloads": 1,
            "refused": 2,
        },
        "mqtt": {"connected": True, "spooled": 3},
        "evidence": {"evidence_written": 2, "dropped": 0, "errors": 0},
    }
    s.update(over)
    return s


def parse(text):
    """{(name, frozenset(labels)): value}, checking every line's syntax on the way."""
    out, types = {}, {}
    for line in text.strip().splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge") and name not in types
            types[name] = kind
            continue
        m = SAMPLE.match(line)
        assert m, line
        labels = m["labels"].split('",') if m["labels"] else []
        labels = [lab if lab.endswith('"') else lab + '"' for lab in labels]
        assert all(LABEL.match(lab) for lab in labels), line
        assert m["name"] in types, f"sample before its TYPE: {line}"
        out[(m["name"], frozenset(labels))] = float(m["value"])
    return out


def test_windows_and_quantiles_are_bounded():
    w = LatencyWindows(("a", "b"), maxlen=4)
    for v in (0.001, 0.002, 0.003, 0.004, 0.100):
        w.add("a", v)
    p = w.percentiles()
    assert p["b"] == {"p50": None, "p95": None, "p99": None}
    assert p["a"]["p50"] == pytest.approx(3.5) and p["a"]["p99"] <= 100.0
    assert quantiles([]) == {"p50": None, "p95": None, "p99": None, "max": None, "n": 0}
    assert quantiles([1.0, 2.0, 3.0])["max"] == 3.0


def test_prometheus_text_for_two_stations():
    text = render_prometheus([snapshot("s1"), snapshot("s2", frames=20)])
    m = parse(text)
    ids = frozenset({'line="L\\"1"', 'station="s1"'})
    assert m[("lineinspect_frames_total", ids)] == 10
    assert m[("lineinspect_frames_total", ids - {'station="s1"'} | {'station="s2"'})] == 20
    assert m[("lineinspect_source_connected", ids)] == 0
    assert m[("lineinspect_source_reconnect_attempts_total", ids)] == 4
    assert m[("lineinspect_latency_ms", ids | {'stage="infer"', 'quantile="0.99"'})] == 13.0
    assert m[("lineinspect_errors_total", ids | {'stage="publish"'})] == 1
    assert m[("lineinspect_good_score", ids | {'quantile="0.5"'})] == 0.1
    assert m[("lineinspect_good_score", ids | {'quantile="1"'})] == 0.3
    assert m[("lineinspect_threshold", ids | {'kind="min_region_area"'})] == 9
    assert m[("lineinspect_thresholds_refused_total", ids)] == 2
    assert m[("lineinspect_mqtt_spooled", ids)] == 3
    # A stage with no data yet has no sample (absent, not NaN).
    assert not any(k[0] == "lineinspect_latency_ms" and 'stage="total"' in k[1] for k in m)
    assert text.count("# TYPE lineinspect_frames_total counter") == 1


def test_http_endpoint():
    snaps = [snapshot()]
    server = MetricsServer(lambda: snaps, 0, "127.0.0.1").start()
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            assert ("lineinspect_rejects_total", frozenset({'line="L\\"1"', 'station="s1"'})) in (
                parse(r.read().decode())
            )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=5)
        assert e.value.code == 404
        snaps[0] = {"broken": True}  # a rendering bug answers 500, the server lives on
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=5)
        assert e.value.code == 500
    finally:
        server.close()


def test_port_in_use_is_a_clear_error():
    server = MetricsServer(list, 0, "127.0.0.1")
    try:
        with pytest.raises(ConfigError, match=f"--metrics-port {server.port}"):
            MetricsServer(list, server.port, "127.0.0.1")
    finally:
        server.close()


def test_default_bind_is_loopback():
    server = MetricsServer(list, 0)
    try:
        assert server._server.server_address[0] == "127.0.0.1"
    finally:
        server.close()


def test_idle_connection_flood_leaves_threads_bounded_and_the_station_deciding(tmp_path):
    """2000 idle connections to the metrics port: a bounded number of threads, the pipeline
    keeps deciding, and the endpoint answers again once the idle ones time out."""
    import socket
    import time

    from edge.backends import load_backend
    from edge.bundle import Bundle
    from edge.pipeline import Pipeline
    from edge.postprocess import PostProcessor
    from edge.sources import create_source
    from tests.fakebundle import make_bundle, write_frames
    from tests.test_pipeline import FakePublisher

    b = Bundle(make_bundle(tmp_path / "b", (64, 64)))
    src = create_source(str(write_frames(tmp_path / "f", {1}, 4)), loop=True, rate=200.0)
    src.open()
    pipeline = Pipeline(
        source=src,
        backend=load_backend("onnxruntime", b, intra_op_threads=1),
        postprocessor=PostProcessor(0.5, 0.5, 4, (64, 64)),
        publisher=FakePublisher(),
        size=(64, 64),
    )
    runner = threading.Thread(target=pipeline.run, daemon=True)
    server = MetricsServer(pipeline.snapshots, 0, timeout_s=1.0, max_connections=8).start()
    socks: list[socket.socket] = []
    try:
        runner.start()
        while pipeline.station.frames < 5:
            time.sleep(0.05)
        threads_before = threading.active_count()
        for _ in range(2000):
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        frames_at_flood = pipeline.station.frames
        time.sleep(0.5)
        peak = threading.active_count()
        assert peak <= threads_before + 8, (threads_before, peak)
        deadline = time.monotonic() + 30
        while pipeline.station.frames <= frames_at_flood + 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pipeline.station.frames > frames_at_flood + 10  # still deciding under the flood
        assert server.refused > 0
        # The idle ones time out (1 s here): the endpoint serves a scrape again.
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{server.port}/metrics", timeout=5
                ) as r:
                    assert b"lineinspect_frames_total" in r.read()
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "metrics endpoint never answered again"
                time.sleep(0.2)
    finally:
        for s in socks:
            s.close()
        server.close()
        pipeline.stop()
        runner.join(30)
