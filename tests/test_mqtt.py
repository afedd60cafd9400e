"""Publisher and Listener against a real mosquitto started by each test."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from jsonschema import Draft202012Validator
from paho.mqtt.enums import CallbackAPIVersion

from edge.config import MqttConfig, TlsConfig
from edge.errors import BrokerError
from edge.listen import Listener, main
from edge.mqtt import Publisher, SpoolFullError, encode_event
from edge.spool import Spool, SpoolError
from tests.broker import Mosquitto, free_port
from tests.certs import have_openssl, make_ca, make_cert, tls_listener_conf
from tests.polling import wait_until as wait

REPO = Path(__file__).resolve().parents[1]
BASE = "lineinspect/l1/s1"
SHA = "ab" * 32
STATUS_INFO = {"model": "dskd-demo", "model_sha256": SHA, "config_sha256": "cd" * 32}
SCHEMAS = {
    name: Draft202012Validator(json.loads((REPO / "edge" / "schemas" / f"{name}.json").read_text()))
    for name in ("reject", "result", "status", "metrics")
}


def make_cfg(broker, tmp_path, **kw) -> MqttConfig:
    kw.setdefault("spool", str(tmp_path / "spool.sqlite"))
    kw.setdefault("connect_timeout_s", 3.0)
    kw.setdefault("reconnect_max_s", 1.0)
    kw.setdefault("port", broker.port)
    return MqttConfig(host=broker.host, client_id="lineinspect-l1-s1", **kw)


def make_reject(i: int) -> dict:
    return {
        "event_id": str(uuid.uuid4()),
        "station": "s1",
        "line": "l1",
        "part_id": 1000 + i,
        "frame": i,
        "capture_time": time.time(),
        "score": 0.9 + i / 1000,
        "image_threshold": 0.5,
        "pixel_threshold": 0.4,
        "regions": [{"bbox": [10, 20, 30, 40], "area": 900, "peak": 0.97}],
        "model": {"name": "dskd-demo", "sha256": SHA},
        "latency_ms": 12.5,
        "evidence": None,
    }


def ids(events) -> list[str]:
    return [e["event_id"] for e in events]


def assert_valid(kind: str, payload: dict) -> None:
    errors = [e.message for e in SCHEMAS[kind].iter_errors(payload)]
    assert errors == [], f"{kind} payload invalid: {errors}"


@pytest.mark.broker
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_rejects_results_metrics_status(mosquitto, tmp_path, protocol, caplog):
    caplog.set_level(logging.DEBUG, logger="lineinspect")
    cfg = make_cfg(mosquitto, tmp_path, protocol=protocol)
    with Listener(mosquitto.host, mosquitto.port, BASE) as listener:
        pub = Publisher(cfg, BASE, STATUS_INFO)
        pub.start()
        online = listener.wait_status("online", 3)
        assert online is not None and online["model"] == "dskd-demo"
        assert (online["line"], online["station"]) == ("l1", "s1")
        assert_valid("status", online)

        events = [make_reject(i) for i in range(40)]
        for e in events:
            pub.publish_reject(e)
        result = {**make_reject(99), "decision": "pass", "regions": []}
        metrics = {
            "time": time.time(),
            "fps": 25.0,
            "frames": 1000,
            "drops": 0,
            "rejects": 40,
            "reject_rate": 0.04,
            "latency_ms": {"infer": {"p50": 5.0, "p95": 7.0, "p99": 9.0}},
            "score_quantiles": {"p50": 0.1, "p99": 0.6},
            "errors": {"source": 0},
        }
        assert pub.publish_result(result) is True
        assert pub.publish_metrics(metrics) is True
        assert pub.flush(5)
        assert listener.wait_rejects(40, 5)
        assert listener.wait_for(lambda: listener.of_kind("metrics"), 3)

        got = listener.rejects()
        assert ids(got) == ids(events)  # all, once, in order (one connection, no outage)
        for payload in got:
            assert_valid("reject", payload)
        assert got[0] == {**json.loads(json.dumps(events[0])), "seq": 1, "bd_seq": 0}
        assert [p["seq"] for p in got] == list(range(1, len(got) + 1))
        assert_valid("result", listener.of_kind("result")[0].payload)
        assert_valid("metrics", listener.of_kind("metrics")[0].payload)
        st = pub.stats()
        assert st["published"] == st["acked"] == 40
        assert st["spooled"] == 0 and st["refused"] == 0 and st["connected"] is True

        # A consumer drops a repeated event id (the publisher may send one twice, never zero times).
        raw = mqtt.Client(CallbackAPIVersion.VERSION2)
        raw.connect(mosquitto.host, mosquitto.port)
        raw.loop_start()
        raw.publish(f"{BASE}/reject", json.dumps(events[0]), qos=1).wait_for_publish(3)
        raw.disconnect()
        raw.loop_stop()
        assert listener.wait_for(lambda: listener.duplicates == 1, 3)
        assert len(listener.rejects()) == 40

        pub.close()
        offline = listener.wait_status("offline", 3)
        assert offline is not None and offline["reason"] == "shutdown"
        assert_valid("status", offline)
        pub.close()  # idempotent
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []

    with Listener(mosquitto.host, mosquitto.port, BASE) as late:  # retained
        assert late.wait_status("offline", 3) is not None
        assert late.of_kind("status")[-1].retained


def _publisher_process(broker, spool: Path) -> subprocess.Popen:
    """A publisher in a child process: prints 'ready', then publishes N rejects per stdin line N."""
    code = f"""
import sys, time, uuid
from edge.config import MqttConfig, TlsConfig
from edge.mqtt import Publisher
cfg = MqttConfig(host={broker.host!r}, port={broker.port}, spool={str(spool)!r},
                 client_id="lineinspect-l1-s1", connect_timeout_s=5, reconnect_max_s=1)
pub = Publisher(cfg, {BASE!r}, {{"model": "child"}})
pub.start()
print("ready", flush=True)
for line in sys.stdin:
    for i in range(int(line)):
        pub.publish_reject({{"event_id": str(uuid.uuid4()), "i": i}})
    print("published", flush=True)
time.sleep(60)
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.broker
def test_a_puback_that_beats_the_spool_sync_releases_the_caller(mosquitto, tmp_path):
    """publish_reject sends first and syncs second, and returns at the first of the two: a slow
    disk does not hold back the station once the broker has the reject; the write still
    happens, and the PUBACK that came during it empties the spool (no resend, no duplicate)."""
    cfg = make_cfg(mosquitto, tmp_path)
    with Listener(mosquitto.host, mosquitto.port, BASE) as listener:
        pub = Publisher(cfg, BASE, STATUS_INFO)
        pub.start()
        real_put_many = pub.spool.put_many
        disk = threading.Event()
        writing = threading.Event()

        def slow_put_many(events):
            writing.set()
            assert disk.wait(10)  # the disk is busy until the test lets it go
            return real_put_many(events)

        pub.spool.put_many = slow_put_many
        event = make_reject(0)
        t0 = time.monotonic()
        pub.publish_reject(event, t_capture=t0 - 0.010)
        # Returned while the write cannot have completed: released by the broker's PUBACK
        # (the writer may not even have started: the PUBACK can beat it too).
        assert not disk.is_set()
        assert writing.wait(3)
        assert listener.wait_rejects(1, 3)
        assert wait(lambda: pub.ack_latency.count("reject_acked") == 1, 3)
        disk.set()
        assert pub.flush(5)  # written, then removed as acknowledged
        assert len(pub.spool) == 0
        st = pub.stats()
        assert st["acked"] == 1 and st["spooled"] == 0 and st["spool_errors"] == 0
        lat = pub.ack_latency.percentiles()["reject_acked"]
        assert lat["p50"] is not None and lat["p50"] >= 10.0  # capture -> PUBACK, in ms
        assert pub.ack_latency.percentiles()["result_acked"]["p50"] is None
        pub.close()
    assert ids(listener.rejects()) == [event["event_id"]]


def test_rejects_waiting_together_share_one_spool_sync(tmp_path):
    """Group commit: rejects that wait while a sync runs are stored by the next one, together,
    and each caller returns only once its event is on disk (no broker: nothing acknowledges)."""
    cfg = MqttConfig(host="127.0.0.1", port=free_port(), spool=str(tmp_path / "spool.sqlite"))
    pub = Publisher(cfg, BASE, STATUS_INFO)
    real_put_many = pub.spool.put_many
    batches: list[int] = []
    first = threading.Event()
    release = threading.Event()

    def slow_put_many(events):
        batches.append(len(events))
        if len(batches) == 1:
            first.set()
            assert release.wait(10)
        return real_put_many(events)

    pub.spool.put_many = slow_put_many
    done: list[str] = []

    def publish(ev):
        pub.publish_reject(ev)
        done.append(ev["event_id"])
        assert ev["event_id"] in {r.event_id for r in pub.spool.pending()}  # on disk already

    events = [make_reject(i) for i in range(6)]
    threads = [threading.Thread(target=publish, args=(events[0],))]
    threads[0].start()
    assert first.wait(5)  # the first sync is running
    for ev in events[1:]:
        threads.append(threading.Thread(target=publish, args=(ev,)))
        threads[-1].start()
    assert wait(lambda: pub._write_queue.qsize() == 5, 5)
    assert done == []  # nobody returns before its event is stored
    release.set()
    for t in threads:
        t.join(10)
    assert sorted(done) == sorted(ids(events))
    assert batches == [1, 5]  # five rejects, one transaction, one sync
    assert len(pub.spool) == 6
    pub.close(timeout_s=0.1)


def test_a_failed_write_nobody_acknowledged_raises_and_alarms(tmp_path):
    """No broker to acknowledge it: a reject the spool cannot store is neither stored nor
    delivered; publish_reject raises (the station counts it) and the alarm holds."""
    cfg = MqttConfig(host="127.0.0.1", port=free_port(), spool=str(tmp_path / "spool.sqlite"))
    pub = Publisher(cfg, BASE, STATUS_INFO)
    pub.spool._conn.execute("PRAGMA query_only=ON")  # every write now fails
    ev = make_reject(0)
    with pytest.raises(SpoolError, match="cannot store event"):
        pub.publish_reject(ev)
    st = pub.stats()
    assert st["spool_errors"] == 1 and st["spooled"] == 0
    assert "spool write failed" in st["alarm"] and "NOT stored, not sent" in st["alarm"]
    pub.spool._conn.execute("PRAGMA query_only=OFF")
    pub.publish_reject(make_reject(1))  # a good write clears it
    assert pub.stats()["alarm"] is None
    pub.close(timeout_s=0.1)


@pytest.mark.broker
def test_results_at_qos1_have_their_ack_latency(mosquitto, tmp_path):
    cfg = make_cfg(mosquitto, tmp_path, result_qos=1)
    with Listener(mosquitto.host, mosquitto.port, BASE) as listener:
        with Publisher(cfg, BASE, STATUS_INFO) as pub:
            for i in range(5):
                result = {**make_reject(i), "decision": "pass", "regions": []}
                assert pub.publish_result(result, t_capture=time.monotonic()) is True
            assert wait(lambda: pub.ack_latency.count("result_acked") == 5, 5)
            assert pub.publish_result(make_reject(9), qos=0) is True  # QoS 0: nothing to time
            assert listener.wait_for(lambda: len(listener.of_kind("result")) == 6, 3)
            assert pub.ack_latency.count("result_acked") == 5


@pytest.mark.broker
def test_nagle_is_off_on_both_ends_of_the_station_connection(mosquitto, tmp_path):
    # With Nagle on, a reject's PUBACK waited for the station's delayed ACK (40 ms) behind its
    # result's PUBACK (docs/edge.md): the station's socket and the broker's config turn it off.
    import socket

    with Publisher(make_cfg(mosquitto, tmp_path), BASE, STATUS_INFO) as pub:
        sock = pub._client.socket()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert "set_tcp_nodelay true" in mosquitto.conf_path.read_text().splitlines()


@pytest.mark.broker
def test_last_will_when_the_process_dies(mosquitto, tmp_path):
    with Listener(mosquitto.host, mosquitto.port, BASE) as listener:
        proc = _publisher_process(mosquitto, tmp_path / "spool.sqlite")
        try:
            online = listener.wait_status("online", 3)
            assert online is not None and online["model"] == "child"
            proc.kill()  # SIGKILL: no DISCONNECT, the broker sees the socket die
            offline = listener.wait_status("offline", 3)
        finally:
            proc.kill()
            proc.wait()
        assert offline is not None and offline["reason"] == "connection lost (last will)"
        assert offline["model"] == "child"
        assert_valid("status", offline)


@pytest.mark.broker
def test_unreachable_broker_fails_start_clearly(tmp_path):
    port = free_port()  # nothing listens there
    cfg = MqttConfig(port=port, spool=str(tmp_path / "spool.sqlite"), connect_timeout_s=1.5)
    pub = Publisher(cfg, BASE, STATUS_INFO)
    t0 = time.monotonic()
    with pytest.raises(BrokerError) as exc:
        pub.start()
    elapsed = time.monotonic() - t0
    msg = str(exc.value)
    assert msg.startswith(f"cannot reach MQTT broker at 127.0.0.1:{port}: ")
    assert "refused" in msg.lower() and "(waited 1." in msg and "\n" not in msg
    assert 1.4 < elapsed < 4.0
    pub.close()  # nothing to flush, must not hang
    assert not any(t.name == "lineinspect-mqtt" for t in threading.enumerate())


@pytest.mark.broker
def test_credentials_from_env_and_refusal(tmp_path, monkeypatch, caplog):
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "li", "s3cret-pw"], check=True)
    caplog.set_level(logging.DEBUG, logger="lineinspect")
    with Mosquitto(tmp_path, allow_anonymous=False, extra_conf=f"password_file {pwfile}") as broker:
        monkeypatch.setenv("LINEINSPECT_MQTT_PASSWORD", "bad-pw-123")
        pub = Publisher(make_cfg(broker, tmp_path, username="li"), BASE, STATUS_INFO)
        t0 = time.monotonic()
        with pytest.raises(
            BrokerError,
            match=r"at 127\.0\.0\.1:\d+: connection refused by the broker: (Bad user name or password|Not authorized)",
        ):
            pub.start()
        assert time.monotonic() - t0 < 2.0  # a refusal is final: no waiting out the timeout
        pub.close()

        monkeypatch.setenv("LINEINSPECT_MQTT_PASSWORD", "s3cret-pw")
        pub = Publisher(make_cfg(broker, tmp_path, username="li"), BASE, STATUS_INFO)
        pub.start()
        # A reject nobody subscribed to is not delivered (PUBACK "no matching subscribers").
        gate = Listener(broker.host, broker.port, BASE, username="li", password="s3cret-pw")
        with gate:
            pub.publish_reject(make_reject(0))
            assert pub.flush(3)
        pub.close()
    assert "s3cret-pw" not in caplog.text and "bad-pw-123" not in caplog.text


EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> Path:
    crt = d / f"{name}.crt"
    _openssl(
        "req",
        "-x509",
        *EC_KEY,
        "-keyout",
        d / f"{name}.key",
        "-out",
        crt,
        "-days",
        2,
        "-subj",
        f"/CN={name}",
    )
    return crt


@pytest.mark.broker
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(tmp_path):
    ca = _make_ca(tmp_path, "ca")
    other_ca = _make_ca(tmp_path, "other-ca")
    key, csr, crt = tmp_path / "server.key", tmp_path / "server.csr", tmp_path / "server.crt"
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("req", *EC_KEY, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    sign = ("-CA", ca, "-CAkey", tmp_path / "ca.key", "-CAcreateserial", "-days", 2)
    _openssl("x509", "-req", "-in", csr, *sign, "-out", crt, "-extfile", tmp_path / "san.ext")
    tls_conf = f"cafile {ca}\ncertfile {crt}\nkeyfile {key}"
    with Mosquitto(tmp_path, extra_conf=tls_conf) as broker:
        tls = TlsConfig(ca_certs=str(ca))
        with Listener(broker.host, broker.port, BASE, tls=tls) as listener:
            pub = Publisher(make_cfg(broker, tmp_path, tls=tls), BASE, STATUS_INFO)
            pub.start()
            event = make_reject(0)
            pub.publish_reject(event)
            assert pub.flush(3)
            assert listener.wait_rejects(1, 3)
            assert ids(listener.rejects()) == [event["event_id"]]
            pub.close()

        wrong_ca = TlsConfig(ca_certs=str(other_ca))
        pub = Publisher(make_cfg(broker, tmp_path, tls=wrong_ca, connect_timeout_s=1), BASE)
        with pytest.raises(
            BrokerError, match=r"127\.0\.0\.1:\d+: TLS: .*certificate verify failed"
        ):
            pub.start()
        pub.close()

        no_file = TlsConfig(ca_certs=str(tmp_path / "nope.crt"))
        pub = Publisher(make_cfg(broker, tmp_path, tls=no_file), BASE)
        with pytest.raises(BrokerError, match=r"TLS setup failed: .*No such file"):
            pub.start()
        pub.close()


@pytest.mark.broker
def test_broker_killed_and_restarted_loses_nothing(tmp_path):
    # The reject gate listens with a persistent session on a broker with persistence, so events
    # the broker accepts while the gate is reconnecting are queued for it.
    with Mosquitto(tmp_path, persistence=True) as broker:
        gate = Listener(broker.host, broker.port, BASE, client_id="gate", persistent=True).start()
        pub = Publisher(make_cfg(broker, tmp_path), BASE, STATUS_INFO)
        try:
            pub.start()
            before = [make_reject(i) for i in range(10)]
            for e in before:
                pub.publish_reject(e)
            assert gate.wait_rejects(10, 5)
            assert pub.flush(3)

            broker.kill()
            assert wait(lambda: not pub.stats()["connected"], 5)
            during = [make_reject(100 + i) for i in range(10)]
            for e in during:
                pub.publish_reject(e)  # never blocks, never raises: spooled
            assert pub.stats()["spooled"] == 10
            assert not pub.flush(0.2)

            broker.start()
            after = [make_reject(200 + i) for i in range(10)]
            assert wait(lambda: pub.stats()["connected"], 5)
            for e in after:
                pub.publish_reject(e)
            assert pub.flush(5)
            assert gate.wait_rejects(30, 8), f"got {len(gate.rejects())} of 30"
            assert set(ids(gate.rejects())) == set(ids(before + during + after))
            assert ids(gate.rejects())[:10] == ids(before)
            st = pub.stats()
            assert st["reconnects"] >= 1 and st["disconnects"] >= 1 and st["spooled"] == 0
        finally:
            pub.close()
            gate.stop()


@pytest.mark.broker
def test_half_open_connection_paho_resends_in_flight_once(tmp_path):
    # The broker freezes (SIGSTOP: no RST, like a pulled cable): rejects go out on a socket nobody
    # reads and stay in flight inside paho. When the broker comes back, paho re-sends them itself
    # and the spool pass skips them: every event arrives, in order, none twice.
    with Mosquitto(tmp_path, persistence=True) as broker:
        gate = Listener(broker.host, broker.port, BASE, client_id="gate", persistent=True).start()
        pub = Publisher(make_cfg(broker, tmp_path), BASE, STATUS_INFO)
        try:
            pub.start()
            assert gate.wait_status("online", 3)
            broker.proc.send_signal(signal.SIGSTOP)
            events = [make_reject(i) for i in range(60)]  # more than paho's 20 in flight
            for e in events:
                pub.publish_reject(e)
            st = pub.stats()
            assert st["connected"] and st["inflight"] == 60 and st["spooled"] == 60
            broker.kill()
            broker.start()
            assert pub.flush(5)
            assert gate.wait_rejects(60, 5)
            assert ids(gate.rejects()) == ids(events)
            assert gate.duplicates == 0
            assert pub.stats()["published"] == 60  # paho re-sent them, not the spool pass
        finally:
            pub.close()
            gate.stop()


@pytest.mark.broker
def test_spool_replayed_by_the_next_publisher(tmp_path):
    with Mosquitto(tmp_path, persistence=True) as broker:
        gate = Listener(broker.host, broker.port, BASE, client_id="gate", persistent=True).start()
        try:
            first = Publisher(make_cfg(broker, tmp_path), BASE, STATUS_INFO)
            first.start()
            broker.stop()
            assert wait(lambda: not first.stats()["connected"], 5)
            events = [make_reject(i) for i in range(5)]
            for e in events:
                first.publish_reject(e)
            first.close(timeout_s=0.2)  # cannot flush: the events stay in the spool file
            with Spool(tmp_path / "spool.sqlite") as left:
                assert len(left) == 5

            broker.start()
            second = Publisher(make_cfg(broker, tmp_path), BASE, STATUS_INFO)
            second.start()
            try:
                assert second.flush(5)
                assert gate.wait_rejects(5, 5)
                assert ids(gate.rejects()) == ids(events)  # oldest first
            finally:
                second.close()
        finally:
            gate.stop()


@pytest.mark.broker
def test_spool_survives_a_publisher_crash(tmp_path):
    spool = tmp_path / "spool.sqlite"
    with Mosquitto(tmp_path, persistence=True) as broker:
        gate = Listener(broker.host, broker.port, BASE, client_id="gate", persistent=True).start()
        try:
            proc = _publisher_process(broker, spool)
            try:
                broker.kill()
                proc.stdin.write("7\n")
                proc.stdin.flush()
                assert proc.stdout.readline().strip() == "published"
            finally:
                proc.kill()
                proc.wait()
            with Spool(spool) as left:
                assert len(left) == 7

            broker.start()
            pub = Publisher(make_cfg(broker, tmp_path, spool=str(spool)), BASE, STATUS_INFO)
            pub.start()
            try:
                assert pub.flush(5)
                assert gate.wait_rejects(7, 5)
                assert sorted(e["i"] for e in gate.rejects()) == list(range(7))
            finally:
                pub.close()
        finally:
            gate.stop()


@pytest.mark.broker
def test_refused_pubacks_alarms_and_full_spool(tmp_path, caplog):
    # MQTT 5: the broker refuses the reject topic (ACL) with a PUBACK reason code; the events
    # stay spooled, alarms go out on status, a full spool raises, and everything is delivered once
    # the broker accepts the topic again.
    acl = tmp_path / "acl"
    acl.write_text(f"topic read #\ntopic readwrite {BASE}/status\n")
    caplog.set_level(logging.WARNING, logger="lineinspect.mqtt")
    with Mosquitto(tmp_path, persistence=True, extra_conf=f"acl_file {acl}") as broker:
        gate = Listener(broker.host, broker.port, BASE, client_id="gate", persistent=True).start()
        pub = Publisher(make_cfg(broker, tmp_path, spool_max_events=10), BASE, STATUS_INFO)
        try:
            pub.start()
            events = [make_reject(i) for i in range(10)]
            for e in events:
                pub.publish_reject(e)
            assert wait(lambda: pub.stats()["refused"] == 10, 3)
            not_stored = make_reject(10)
            with pytest.raises(SpoolFullError, match="is full"):
                pub.publish_reject(not_stored)
            st = pub.stats()
            assert st["spooled"] == 10 and st["acked"] == 0 and st["spool_full"] == 1
            assert st["alarm"] == "spool 100% full"
            alarms = lambda: [e.payload.get("alarm") for e in gate.of_kind("status")]  # noqa: E731
            assert gate.wait_for(lambda: "spool 100% full" in alarms(), 3)
            assert [a for a in alarms() if a] == [
                "spool 50% full",
                "spool 90% full",
                "spool 100% full",
            ]
            assert "Not authorized" in caplog.text and "50% full" in caplog.text
            assert gate.rejects() == []

            broker.extra_conf = ""  # the broker now accepts the topic
            broker.restart()
            assert pub.flush(6)
            assert gate.wait_rejects(10, 5)
            # Every spooled event arrives. The one the full spool could not store was still
            # sent to the connected broker (refused then); paho re-sends it after the restart
            # if the refusal was lost with the old connection: it may arrive, nothing else may.
            got = set(ids(gate.rejects()))
            assert set(ids(events)) <= got <= set(ids(events)) | {not_stored["event_id"]}
            assert gate.wait_for(lambda: gate.last_status().get("alarm") is None, 3)
            assert pub.stats()["alarm"] is None
        finally:
            pub.close()
            gate.stop()


@pytest.mark.broker
def test_listen_command(mosquitto, tmp_path, capsys):
    station = tmp_path / "station.yaml"
    station.write_text(
        "bundle: bundle\nsource: {uri: 'file://frames/'}\nstation: {line: l1, name: s1}\n"
        f"mqtt: {{host: 127.0.0.1, port: {mosquitto.port}, connect_timeout_s: 3,"
        f" spool: {tmp_path / 'spool.sqlite'}}}\n"
    )
    assert main([str(station), "--count", "1", "--timeout", "0.3"]) == 1  # nothing came

    rc: list[int] = []
    cli = threading.Thread(target=lambda: rc.append(main([str(station), "--count", "2"])))
    cli.start()
    pub = Publisher(make_cfg(mosquitto, tmp_path), BASE, STATUS_INFO)
    pub.start()
    try:
        sent = 0
        while cli.is_alive() and sent < 100:  # until the listener, subscribing meanwhile, has 2
            pub.publish_reject(make_reject(sent))
            sent += 1
            cli.join(0.05)
    finally:
        pub.close()
    assert rc == [0]
    out = capsys.readouterr().out
    assert out.count("REJECT part=") == 2 and "regions=1 event=" in out

    assert main([str(station), "--timeout", "0.5", "--json"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line)["payload"]["state"] == "offline"  # the retained status


def test_encode_event_never_fails_on_numpy_or_nan():
    event = {
        "event_id": "e",
        "score": np.float32(0.5),
        "frame": np.int64(7),
        "bbox": np.array([1, 2, 3, 4]),
        "peak": math.nan,
        "t": (1, 2),
        "path": Path("/x"),
    }
    assert json.loads(encode_event(event)) == {
        "event_id": "e",
        "score": 0.5,
        "frame": 7,
        "bbox": [1, 2, 3, 4],
        "peak": None,
        "t": [1, 2],
        "path": "/x",
    }


@pytest.mark.broker
@pytest.mark.skipif(not have_openssl(), reason="needs the openssl command")
def test_tls_client_certificate(tmp_path):
    # A listener that wants a client certificate: refused without one (the message says why),
    # accepted with one signed by its CA; the listener authenticates the same way.
    ca = make_ca(tmp_path, "ca")
    server = make_cert(tmp_path, "server", ca, server=True)
    client = make_cert(tmp_path, "client", ca)
    tls_port = free_port()
    conf = tls_listener_conf(tls_port, ca, server, require_certificate=True)
    with Mosquitto(tmp_path, extra_conf=conf) as broker:
        no_cert = TlsConfig(ca_certs=str(ca.crt))
        pub = Publisher(make_cfg(broker, tmp_path, port=tls_port, tls=no_cert), BASE)
        with pytest.raises(BrokerError, match=r"closed before CONNACK: .*certificate required"):
            pub.start()
        assert pub.stats()["connect_failures"] >= 1
        pub.close()

        tls = TlsConfig(ca_certs=str(ca.crt), certfile=str(client.crt), keyfile=str(client.key))
        with Listener(broker.host, tls_port, BASE, tls=tls) as listener:
            pub = Publisher(make_cfg(broker, tmp_path, port=tls_port, tls=tls), BASE, STATUS_INFO)
            pub.start()
            try:
                event = make_reject(0)
                pub.publish_reject(event)
                assert pub.flush(3)
                assert listener.wait_rejects(1, 3)
                assert ids(listener.rejects()) == [event["event_id"]]
            finally:
                pub.close()


@pytest.mark.broker
def test_connection_failures_counted_and_logged_once_per_outage(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="lineinspect")
    with Mosquitto(tmp_path) as broker:
        pub = Publisher(make_cfg(broker, tmp_path, reconnect_max_s=0.2), BASE, STATUS_INFO)
        pub.start()
        try:
            broker.stop()
            assert wait(lambda: pub.stats()["connect_failures"] >= 3, 10)
            warned = [
                r
                for r in caplog.records
                if r.levelno == logging.WARNING and "cannot connect to MQTT broker" in r.message
            ]
            failures = pub.stats()["connect_failures"]
            assert 1 <= len(warned) < failures  # the 1st, 10th, 100th... attempt, not each one
            assert "retrying every <= 0.2 s" in warned[0].message
            assert not [r for r in caplog.records if "failed to receive on socket" in r.message]

            pub.publish_reject(make_reject(0))  # spooled meanwhile
            broker.start()
            with Listener(broker.host, broker.port, BASE):  # a subscriber: it can be delivered
                assert pub.flush(5)
            assert pub.stats()["reconnects"] == 1
        finally:
            pub.close()


@pytest.mark.broker
def test_metrics_carry_the_publisher_counters(mosquitto, tmp_path):
    with Listener(mosquitto.host, mosquitto.port, BASE) as listener:
        pub = Publisher(make_cfg(mosquitto, tmp_path), BASE, STATUS_INFO)
        pub.start()
        try:
            metrics = {
                "time": time.time(),
                "fps": 1.0,
                "frames": 1,
                "drops": 0,
                "rejects": 0,
                "reject_rate": 0.0,
                "latency_ms": {},
                "score_quantiles": {},
                "errors": {},
            }
            assert pub.publish_metrics(metrics)
            assert pub.publish_metrics({**metrics, "mqtt": {"own": 1}})  # the caller's wins
            assert listener.wait_for(lambda: len(listener.of_kind("metrics")) == 2, 3)
        finally:
            pub.close()
    first, second = (e.payload for e in listener.of_kind("metrics"))
    assert_valid("metrics", first)
    assert first["mqtt"]["connected"] is True and first["mqtt"]["connect_failures"] == 0
    assert second["mqtt"] == {"own": 1}


def _message(topic: str, payload: dict) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(topic=topic.encode())
    msg.payload = json.dumps(payload).encode()
    return msg


def test_listener_dedupe_window_is_bounded():
    listener = Listener(topic_base=BASE, dedupe_window=2)
    for eid in ("a", "b", "a", "c", "b", "a"):
        listener._on_message(None, None, _message(f"{BASE}/reject", {"event_id": eid}))
    # "a" again while in the window: dropped; after "b" and "c" pushed it out: seen anew.
    assert [p["event_id"] for p in listener.rejects()] == ["a", "b", "c", "a"]
    assert listener.duplicates == 2 and listener.reject_count == 4

    quiet = Listener(topic_base=BASE, keep_events=False)
    quiet._on_message(None, None, _message(f"{BASE}/reject", {"event_id": "x"}))
    assert quiet.events == [] and quiet.reject_count == 1
    with pytest.raises(ValueError, match="dedupe_window"):
        Listener(topic_base=BASE, dedupe_window=0)


@pytest.mark.broker
def test_listen_command_with_a_persistent_session(mosquitto, tmp_path, capsys):
    station = tmp_path / "station.yaml"
    station.write_text(
        "bundle: bundle\nsource: {uri: 'file://frames/'}\nstation: {line: l1, name: s1}\n"
        f"mqtt: {{host: 127.0.0.1, port: {mosquitto.port}, connect_timeout_s: 3}}\n"
    )
    gate = [str(station), "--client-id", "gate-cli"]
    assert main([*gate, "--timeout", "0.2"]) == 0  # creates the session, then leaves
    capsys.readouterr()
    pub = Publisher(make_cfg(mosquitto, tmp_path), BASE, STATUS_INFO)
    pub.start()
    events = [make_reject(i) for i in range(3)]
    try:
        for e in events:
            pub.publish_reject(e)
        assert pub.flush(3)
    finally:
        pub.close()
    # Published while nobody listened: the broker kept them for the session.
    assert main([*gate, "--count", "3", "--timeout", "5"]) == 0
    out = capsys.readouterr().out
    assert [ln.rsplit("event=", 1)[1] for ln in out.splitlines() if "REJECT" in ln] == ids(events)


@pytest.mark.broker
def test_start_not_required_runs_without_the_broker_and_catches_up(tmp_path, caplog):
    # start(required=False): a refused login at start-up is logged and counted, not raised; the
    # client keeps retrying, rejects are spooled, and they go out once the broker accepts it.
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "li", "other-pw"], check=True)
    conf = f"password_file {pwfile}"
    caplog.set_level(logging.INFO, logger="lineinspect")
    with Mosquitto(tmp_path, persistence=True, allow_anonymous=False, extra_conf=conf) as broker:
        cfg = make_cfg(broker, tmp_path, username="li", password="li-pw-42", reconnect_max_s=0.2)
        pub = Publisher(cfg, BASE, STATUS_INFO)
        pub.start(required=False)
        try:
            events = [make_reject(i) for i in range(3)]
            for e in events:
                pub.publish_reject(e)
            assert wait(lambda: pub.stats()["connect_refusals"] >= 2, 5)  # still trying
            st = pub.stats()
            assert not st["connected"] and st["spooled"] == 3
            assert "running without it" in caplog.text

            subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "li", "li-pw-42"], check=True)
            subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "gate", "gate-pw"], check=True)
            broker.restart()
            with Listener(
                broker.host, broker.port, BASE, username="gate", password="gate-pw"
            ) as listener:
                assert pub.flush(5)
                assert listener.wait_status("online", 3) is not None
            assert pub.stats()["acked"] == 3
        finally:
            pub.close()
    assert "li-pw-42" not in caplog.text


@pytest.mark.broker
def test_no_matching_subscribers_keeps_the_event_and_alarms(tmp_path, mosquitto):
    """MQTT 5 PUBACK 16 "no matching subscribers": the broker has it, nobody will get it."""
    pub = Publisher(make_cfg(mosquitto, tmp_path), BASE, STATUS_INFO)
    pub.start()
    try:
        ev = make_reject(0)
        pub.publish_reject(ev)
        assert wait(lambda: pub.stats()["no_subscribers"] >= 1, 5)
        assert len(pub.spool) == 1 and not pub.flush(0.5)  # kept, not counted as delivered
        assert "no subscriber" in pub.stats()["alarm"]
        # The gate subscribes: the retry delivers it and the alarm clears.
        with Listener(mosquitto.host, mosquitto.port, BASE) as gate:
            st = gate.wait_status("online", 5)
            assert st is not None and "no subscriber" in st.get("alarm", "")  # retained alarm
            assert gate.wait_rejects(1, 10) and gate.rejects()[0]["event_id"] == ev["event_id"]
            assert pub.flush(5)
            assert wait(lambda: pub.stats()["alarm"] is None, 5)
    finally:
        pub.close()


@pytest.mark.broker
def test_spool_write_failure_alarms_on_status_and_still_publishes(tmp_path, mosquitto):
    pub = Publisher(make_cfg(mosquitto, tmp_path), BASE, STATUS_INFO)
    pub.start()
    try:
        with Listener(mosquitto.host, mosquitto.port, BASE) as gate:
            pub.publish_reject(make_reject(0))
            assert pub.flush(5)
            pub.spool._conn.execute("PRAGMA query_only=ON")  # every write now fails
            ev = make_reject(1)
            t0 = time.monotonic()
            try:  # raises unless the broker's PUBACK came first (then it was delivered)
                pub.publish_reject(ev)
            except SpoolError:
                pass
            # the failed write (and, when its PUBACK came after it, the failed removal)
            assert wait(lambda: pub.stats()["spool_errors"] >= 1, 3)
            assert gate.wait_for(
                lambda: any(
                    "spool write failed" in (e.payload or {}).get("alarm", "")
                    for e in gate.of_kind("status")
                ),
                1.0 + (time.monotonic() - t0),
            )
            # Connected: the reject went out before the failed write.
            assert gate.wait_rejects(2, 5) and gate.rejects()[1]["event_id"] == ev["event_id"]
            pub.spool._conn.execute("PRAGMA query_only=OFF")
            pub.publish_reject(make_reject(2))  # a good write clears it
            assert wait(lambda: pub.stats()["alarm"] is None, 3), pub.stats()
    finally:
        pub.close()


@pytest.mark.broker
def test_deleted_spool_is_recreated_and_alarmed(tmp_path, mosquitto):
    pub = Publisher(make_cfg(mosquitto, tmp_path), BASE, STATUS_INFO)
    pub.start()
    try:
        with Listener(mosquitto.host, mosquitto.port, BASE):
            Path(pub.spool.path).unlink()
            assert wait(lambda: "recreated" in (pub.stats()["alarm"] or ""), 2)
            assert Path(pub.spool.path).exists() and pub.stats()["spool_recreated"] == 1
    finally:
        pub.close()


@pytest.mark.broker
def test_gate_acks_only_after_its_handler_and_gets_a_failed_event_again(tmp_path, mosquitto):
    failed: list[str] = []

    def handler(event):
        if event.kind == "reject" and not failed:
            failed.append(event.payload["event_id"])
            raise RuntimeError("gate actuator busy")

    kw = dict(client_id="gate-1", persistent=True, reconnect_max_s=1.0)
    gate = Listener(mosquitto.host, mosquitto.port, BASE, on_event=handler, **kw).start()
    pub = Publisher(make_cfg(mosquitto, tmp_path), BASE, STATUS_INFO)
    pub.start()
    try:
        events = [make_reject(i) for i in range(3)]
        for ev in events:
            pub.publish_reject(ev)
        assert pub.flush(5)
        assert gate.wait_rejects(2, 5) and gate.errors == 1
        assert failed == [events[0]["event_id"]]
        assert events[0]["event_id"] not in ids(gate.rejects())  # not recorded: not handled
        gate.stop()
        # The same persistent session again: the broker re-delivers the unacknowledged one.
        gate = Listener(mosquitto.host, mosquitto.port, BASE, on_event=handler, **kw).start()
        assert gate.wait_rejects(1, 10)
        assert ids(gate.rejects()) == [events[0]["event_id"]]
    finally:
        gate.stop()
        pub.close()


@pytest.mark.broker
def test_gate_reports_seq_gaps_and_late_fills(mosquitto):
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    with Listener(mosquitto.host, mosquitto.port, BASE) as gate:
        raw = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        raw.connect(mosquitto.host, mosquitto.port)
        raw.loop_start()
        try:
            for bd, seq in [(0, 1), (0, 2), (0, 5), (0, 3), (1, 1)]:
                ev = {**make_reject(seq), "seq": seq, "bd_seq": bd}
                raw.publish(f"{BASE}/reject", encode_event(ev), qos=1).wait_for_publish(5)
            assert gate.wait_rejects(5, 5)
        finally:
            raw.loop_stop()
            raw.disconnect()
        # 3 and 4 went missing; 3 arrived late; a new bd_seq (restart) starts again at 1.
        assert gate.gaps() == {f"{BASE} bd_seq=0": [4]}
        assert any("seq 3..4 missing" in g for g in gate.gap_events)
        assert any("seq 3 arrived late" in g for g in gate.gap_events)


@pytest.mark.broker
def test_probe_publisher_leaves_no_retained_status(tmp_path, mosquitto):
    # `edge check` connects with retain_status=False on <base>/check: nothing lingers there.
    pub = Publisher(
        make_cfg(mosquitto, tmp_path), f"{BASE}/check", STATUS_INFO, retain_status=False
    )
    pub.start()
    pub.close()
    with Listener(mosquitto.host, mosquitto.port, f"{BASE}/check") as later:
        time.sleep(0.5)
        assert later.of_kind("status") == []
