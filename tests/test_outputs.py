"""The output seam (edge.ports.Output): one contract test every output passes against its real
peer (MQTT: mosquitto; OPC UA: asyncua's own server and client, loopback, free ports), and the
fan-out: a failing output never blocks or loses another, and every loss is alarmed."""

from __future__ import annotations

import time

import pytest

from edge import ports
from edge.errors import OutputError
from edge.listen import Listener
from edge.mqtt import Publisher
from edge.outputs import MqttOutput, Outputs, QueuedOutput
from tests.broker import free_port
from tests.test_ports import conforms

pytestmark = pytest.mark.broker
BASE = "lineinspect/lo/s1"


def verdict(i: int, reject: bool) -> dict:
    return {
        "event_id": f"ev-{i}",
        "station": "s1",
        "line": "lo",
        "part_id": f"part_{i:03d}",
        "frame": i,
        "capture_time": time.time(),
        "score": 0.25 + i,
        "image_threshold": 0.5,
        "pixel_threshold": 0.5,
        "regions": [],
        "model": {"name": "m", "sha256": "0" * 64},
        "latency_ms": 1.0,
        "evidence": None,
        "decision": "reject" if reject else "pass",
        **({"reason": "score"} if reject else {}),
    }


def mqtt_publisher(tmp_path, broker) -> Publisher:
    from edge.config import MqttConfig

    cfg = MqttConfig(port=broker.port, spool=str(tmp_path / "spool.db"), client_id="out-test")
    pub = Publisher(cfg, BASE, {"station": "s1", "line": "lo"})
    pub.start()
    return pub


def opcua_cfg(mode: str, url: str, **kw):
    from edge.opcua.config import OpcUaConfig, OpcUaNodes

    nodes = kw.pop("nodes", None)
    return OpcUaConfig(
        mode=mode,
        endpoint=url,
        security="none",
        anonymous=True,
        nodes=OpcUaNodes(**nodes) if nodes else None,
        **kw,
    )


# -- the contract, once per output ------------------------------------------------------------
@pytest.fixture(params=["mqtt", "opcua-server", "opcua-client"])
def output_and_peer(request, tmp_path, mosquitto):
    """(a started output, peer() -> part ids it received in arrival order)."""
    alarms: list = []
    if request.param == "mqtt":
        with Listener(mosquitto.host, mosquitto.port, BASE) as lst:
            out = MqttOutput(mqtt_publisher(tmp_path, mosquitto), results=True)
            try:
                yield out, lambda: [e.payload["part_id"] for e in lst.of_kind("result")], alarms
            finally:
                out.close()  # its publisher's threads must not outlive the test
        return
    rig = pytest.importorskip("tests.opcua_rig")
    if request.param == "opcua-server":
        from edge.opcua.server import ServerLink

        url = rig.endpoint(path="station")
        link = ServerLink(opcua_cfg("server", url), "lo", "s1")
        out = QueuedOutput("opcua", link, queue_size=100, alarm=lambda *a: alarms.append(a))
        out.start()
        sub = rig.Subscriber(url, "lo.s1").start()
        try:
            yield out, lambda: [v for n, v in sub.changes if n == "PartId" and v], alarms
        finally:
            sub.stop()
            out.close()
        return
    from edge.opcua.client import ClientLink

    plc = rig.PlcServer().start()
    link = ClientLink(opcua_cfg("client", plc.url, nodes=plc.nodes_config()), "lo", "s1")
    out = QueuedOutput("opcua", link, queue_size=100, alarm=lambda *a: alarms.append(a))
    out.start()
    try:
        yield out, lambda: [r["PartId"] for r in plc.received], alarms
    finally:
        out.close()
        plc.stop()


def test_every_output_takes_every_verdict_in_order(output_and_peer):
    out, peer, alarms = output_and_peer
    conforms(type(out), ports.Output)
    parts = [verdict(i, i % 3 == 1) for i in range(25)]
    for v in parts:
        out.deliver(v, t_capture=time.monotonic())
    assert out.flush(20)
    want = [v["part_id"] for v in parts]
    deadline = time.monotonic() + 20
    while peer() != want and time.monotonic() < deadline:
        time.sleep(0.05)
    assert peer() == want  # each once, in decision order
    h = out.health()
    assert h["output"] == out.name and h["state"] == "up" and h["alarm"] is None, h
    out.publish_status({"state": "online", "time": time.time(), "alarm": None, "frames": 25})
    assert not [a for a in alarms if a[1] is not None], alarms


# -- the fan-out --------------------------------------------------------------------------------
class RaisingOutput:
    """An output whose deliver fails (a bug, a refused verdict)."""

    name = "broken"

    def deliver(self, verdict, t_capture=None):
        raise OutputError("broken: refused")

    def publish_status(self, status, /):
        raise OutputError("broken: refused")

    def health(self):
        return {"output": self.name, "state": "down", "alarm": "broken"}

    def flush(self, timeout_s):
        return True

    def close(self):
        pass


def test_a_failing_output_never_blocks_or_loses_mqtt(tmp_path, mosquitto):
    rig = pytest.importorskip("tests.opcua_rig")
    from edge.opcua.client import ClientLink

    pub = mqtt_publisher(tmp_path, mosquitto)
    fan = Outputs(pub, [], results=True)
    # A PLC that is not there (closed port) and a 5-verdict queue: the queue overflows.
    url = rig.endpoint(free_port())
    nodes = {"sequence": "ns=2;s=S", "ack": "ns=2;s=A", "reject": "ns=2;s=R"}
    cfg = opcua_cfg("client", url, nodes=nodes, timeout_s=0.3)
    plc = QueuedOutput(
        "opcua",
        ClientLink(cfg, "lo", "s1"),
        queue_size=5,
        alarm=fan.alarm,
        reconnect_min_s=0.05,
        reconnect_max_s=0.2,
    )
    plc.start(required=False)
    fan.outputs += [plc, RaisingOutput()]
    conforms(Outputs, ports.Publisher)
    n, rejects = 30, {i for i in range(30) if i % 2}
    with Listener(mosquitto.host, mosquitto.port, BASE) as lst:
        t0 = time.monotonic()
        for i in range(n):
            with pytest.raises(OutputError, match="broken: refused"):
                fan.deliver(verdict(i, i in rejects), t_capture=time.monotonic())
        took = time.monotonic() - t0
        assert lst.wait_rejects(len(rejects), 15)
        assert lst.wait_for(lambda: len(lst.of_kind("result")) >= n, 15)

        def alarmed():
            st = [e.payload for e in lst.of_kind("status")]
            return st and "NOT delivered" in (st[-1].get("alarm") or "")

        assert lst.wait_for(alarmed, 10), [e.payload for e in lst.of_kind("status")]
        status = lst.of_kind("status")[-1].payload
        fan.publish_heartbeat({"frames": n})
        assert lst.wait_for(lambda: "heartbeat" in lst.of_kind("status")[-1].payload, 10)
        beat = lst.of_kind("status")[-1].payload["heartbeat"]
    # MQTT had every part, in order, while the PLC was away: nothing waited on it.
    assert [e.payload["frame"] for e in lst.of_kind("result")] == list(range(n))
    assert sorted(e["frame"] for e in lst.rejects()) == sorted(rejects)
    assert took < 10  # a generous bound: 30 deliveries must not wait for 0.3 s timeouts each
    h = fan.health()["opcua"]
    assert h["state"] in ("down", "starting") and h["lost"] == n - 5 and h["queued"] == 5, h
    assert h["rejects_lost"] == len([i for i in range(n - 5) if i in rejects])
    assert "unreachable" in status["alarm"] or "unreachable" in (h["alarm"] or "")
    assert beat["outputs"]["opcua"]["queued"] == 5 and beat["outputs"]["mqtt"]["state"] == "up"
    assert fan.stats()["outputs"]["broken"]["state"] == "down"
    fan.close()
    assert plc.health()["lost"] == n  # the 5 still queued at close are counted too
