"""OPC UA beside MQTT, end to end: a real station (edge.runtime.plan, as `edge run` builds it)
with a real asyncua peer on a free loopback port, and a real mosquitto.

    server mode   a subscribed PLC receives every verdict of a replay in order, one event per
                  reject, over Basic256Sha256 Sign & Encrypt with a user from the credentials file
    client mode   every verdict is written into a PLC server that acknowledges; a PLC that stops
                  acknowledging raises the alarm within ack_timeout_s while MQTT rejects flow on
    config        one-line errors: no login, a password in the YAML, a wrong node id, a wrong
                  certificate, the extra missing
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from edge import config as config_mod
from edge.__main__ import main
from edge.errors import ConfigError
from edge.listen import Listener
from edge.outputs import opcua_output
from edge.runtime import plan as plan_mod
from tests.fakebundle import make_bundle, write_frames

rig = pytest.importorskip("tests.opcua_rig")
pytestmark = pytest.mark.broker

SIZE, SHAPE = (64, 64), (96, 128)
LINE, NAME = "lineO", "st1"
BASE = f"lineinspect/{LINE}/{NAME}"
STATION_URI = f"urn:lineinspect:{LINE}:{NAME}"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"), SIZE)


def station_yaml(tmp_path: Path, bundle, frames, port: int, opcua: dict, **top) -> Path:
    d = {
        "station": {"line": LINE, "name": NAME},
        "bundle": str(bundle),
        "source": {"uri": str(frames)},
        "mqtt": {"port": port, "spool": "spool.db", "publish_results": True},
        "metrics": {"interval_s": 0.5},
        "heartbeat_s": 0.5,
        "opcua": opcua,
        **top,
    }
    path = tmp_path / "station.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def credentials(tmp_path: Path, **creds: str) -> str:
    path = tmp_path / "credentials.yaml"
    path.write_text(yaml.safe_dump(creds))
    path.chmod(0o600)
    return str(path)


def server_mode(tmp_path: Path) -> tuple[dict, tuple[Path, Path], Path]:
    """The station as OPC UA server (Sign & Encrypt, login) trusting one PLC client certificate.
    Returns (the opcua config section, the PLC's (cert, key), the credentials file)."""
    certs = tmp_path / "certs"
    st_cert = rig.app_cert(certs, "station", STATION_URI, server=True)
    plc_cert = rig.app_cert(certs, "plc", "urn:test:plc-client", server=False)
    opcua = {
        "mode": "server",
        "endpoint": rig.endpoint(path="lineinspect"),
        "certificate": str(st_cert[0]),
        "private_key": str(st_cert[1]),
        "peer_certificate": str(plc_cert[0]),
    }
    creds = credentials(tmp_path, opcua_username="plc", opcua_password="s3cret")
    return opcua, plc_cert, creds


def test_server_mode_subscriber_gets_every_verdict_in_order(tmp_path, mosquitto, bundle_dir):
    defective = {1, 4, 5, 9, 13}
    n = 16
    frames = write_frames(tmp_path / "frames", defective, n, SHAPE)
    opcua, plc_cert, creds = server_mode(tmp_path)
    url = opcua["endpoint"]
    path = station_yaml(tmp_path, bundle_dir, frames, mosquitto.port, opcua, credentials_file=creds)
    cfg = config_mod.load(path)
    pipe = plan_mod.open_pipeline(plan_mod.build([cfg]))  # the server listens; nothing read yet
    try:
        sub = rig.Subscriber(
            url,
            f"{LINE}.{NAME}",
            user=("plc", "s3cret"),
            uri="urn:test:plc-client",
            certificate=str(plc_cert[0]),
            private_key=str(plc_cert[1]),
            server_certificate=opcua["certificate"],
        ).start()
        status = sub.read("Status")
        with Listener(mosquitto.host, mosquitto.port, BASE) as lst:
            summary = pipe.run()  # the replay, then drain, flush and close (server stops)
            assert lst.wait_rejects(len(defective), 10)
        assert sub.wait(lambda: len(sub.sequences()) >= n and len(sub.events) >= len(defective))
    finally:
        pipe.close()
    assert summary["frames"] == n and summary["errors"] == 0
    assert sub.sequences() == list(range(1, n + 1))  # every verdict, once, in order
    parts = [v for k, v in sub.changes if k == "PartId" and v]
    assert parts == [f"frame_{i:03d}" for i in range(n)]
    # Reject changes only when it changes (4 then 5 are both rejects): False/True runs.
    flags = [v for k, v in sub.changes if k == "Reject"]
    runs = [k for k in range(n) if (k in defective) != (k - 1 in defective)]
    assert flags == [False] + [k in defective for k in runs]
    events = sub.events
    assert [e["PartId"].Value for e in events] == [f"frame_{i:03d}" for i in sorted(defective)]
    assert (
        all(e["Reason"].Value for e in events) and len({e["Sequence"].Value for e in events}) == 5
    )
    assert status == "online"
    lat = summary["latency_ms"]["opcua_written"]
    assert lat["p50"] is not None  # decision -> written, reported
    sub.stop()


def test_a_slow_server_start_is_waited_for_not_cut_at_the_client_timeout(
    tmp_path, bundle_dir, monkeypatch
):
    # asyncua builds its address space in Python: 3-5 s on the 2-core VM, more on a Jetson.
    # The client's timeout_s once bounded it too, and a station in server mode failed to start.
    from edge.opcua.server import ServerLink

    opened = ServerLink.open

    async def slow_open(self):
        await asyncio.sleep(3.0)  # past timeout_s + 2 = 2.1 s below
        return await opened(self)

    monkeypatch.setattr(ServerLink, "open", slow_open)
    opcua, _, creds = server_mode(tmp_path)
    frames = write_frames(tmp_path / "frames", set(), 1, SHAPE)
    path = station_yaml(
        tmp_path, bundle_dir, frames, 1883, {**opcua, "timeout_s": 0.1}, credentials_file=creds
    )
    out = opcua_output(config_mod.load(path), lambda *a: None, required=True)
    try:
        assert out.health()["state"] == "up"
    finally:
        out.close()


def test_server_mode_refuses_a_wrong_login_and_an_untrusted_client(tmp_path, bundle_dir, mosquitto):
    opcua, plc_cert, creds = server_mode(tmp_path)
    url = opcua["endpoint"]
    other = rig.app_cert(tmp_path / "certs", "other", "urn:test:other", server=False)
    frames = write_frames(tmp_path / "frames", set(), 2, SHAPE)
    path = station_yaml(tmp_path, bundle_dir, frames, mosquitto.port, opcua, credentials_file=creds)
    pipe = plan_mod.open_pipeline(plan_mod.build([config_mod.load(path)]))
    try:
        for user, cert, uri in (
            (("plc", "wrong"), plc_cert, "urn:test:plc-client"),
            (("plc", "s3cret"), other, "urn:test:other"),
            (None, plc_cert, "urn:test:plc-client"),  # anonymous: not configured
        ):
            sub = rig.Subscriber(
                url,
                f"{LINE}.{NAME}",
                user=user,
                uri=uri,
                certificate=str(cert[0]),
                private_key=str(cert[1]),
                server_certificate=opcua["certificate"],
            )
            with pytest.raises(Exception, match="Bad"):
                sub.start()
            sub._lt.stop()
    finally:
        pipe.close()


def client_opcua(plc, **kw) -> dict:
    return {
        "mode": "client",
        "endpoint": plc.url,
        "security": "none",
        "anonymous": True,
        "nodes": plc.nodes_config(),
        **kw,
    }


def test_client_mode_writes_every_verdict_and_the_plc_acknowledges(tmp_path, mosquitto, bundle_dir):
    defective = {2, 3, 7, 11}
    n = 14
    frames = write_frames(tmp_path / "frames", defective, n, SHAPE)
    plc = rig.PlcServer().start()
    try:
        path = station_yaml(tmp_path, bundle_dir, frames, mosquitto.port, client_opcua(plc))
        out = tmp_path / "s.json"
        with Listener(mosquitto.host, mosquitto.port, BASE) as lst:
            assert main(["run", str(path), "--summary-json", str(out)]) == 0
            assert lst.wait_rejects(len(defective), 10)
    finally:
        plc.stop()
    got = plc.received
    assert [r["sequence"] for r in got] == list(range(1, n + 1))
    assert [r["PartId"] for r in got] == [f"frame_{i:03d}" for i in range(n)]
    assert [r["Reject"] for r in got] == [i in defective for i in range(n)]
    assert all(r["Reason"] == ("score" if r["Reject"] else "") or r["Reject"] for r in got)
    assert plc.acks == n
    summary = yaml.safe_load(out.read_text())
    h = summary["publisher"]["outputs"]["opcua"]
    assert h["delivered"] == n and h["lost"] == 0 and h["unacknowledged"] == 0, h


def test_client_mode_plc_not_acknowledging_alarms_while_mqtt_flows(tmp_path, mosquitto, bundle_dir):
    defective = {1, 3, 5, 7, 9}
    n = 12
    frames = write_frames(tmp_path / "frames", defective, n, SHAPE)
    plc = rig.PlcServer().start()
    plc.acknowledging = False
    ack_timeout = 0.5
    try:
        path = station_yaml(
            tmp_path,
            bundle_dir,
            frames,
            mosquitto.port,
            client_opcua(plc, ack_timeout_s=ack_timeout),
        )
        with Listener(mosquitto.host, mosquitto.port, BASE) as lst:
            assert main(["run", str(path)]) == 0
            assert lst.wait_rejects(len(defective), 10)  # MQTT: every reject
            statuses = [(e.received, e.payload) for e in lst.of_kind("status")]
    finally:
        plc.stop()
    alarms = [
        (t, p["alarm"]) for t, p in statuses if "did not acknowledge" in (p.get("alarm") or "")
    ]
    assert alarms, [p.get("alarm") for _, p in statuses]
    assert "sequence 1 " in alarms[0][1] and plc.node("Ack") in alarms[0][1]
    # Within the configured timeout of the first write (plus a loaded machine's slack).
    first_write = plc.received[0]["t"]
    assert alarms[0][0] - first_write < ack_timeout + 3.0
    assert [r["PartId"] for r in plc.received][:1] == ["frame_000"]


# -- configuration and start-up errors: one line, naming the key, node or endpoint --------------
def test_config_errors_name_the_key(tmp_path, bundle_dir):
    frames = write_frames(tmp_path / "frames", set(), 1, SHAPE)
    plc_like = {"mode": "client", "endpoint": "opc.tcp://127.0.0.1:4840", "security": "none"}
    nodes = {"sequence": "ns=2;s=S", "ack": "ns=2;s=A", "reject": "ns=2;s=R"}
    cases = [
        ({**plc_like, "nodes": nodes}, "no login"),
        ({**plc_like, "anonymous": True}, "nodes: required in client mode"),
        ({**plc_like, "anonymous": True, "nodes": {**nodes, "ack": "Gate.Ack"}}, "ack:"),
        ({**plc_like, "anonymous": True, "nodes": nodes, "password": "x"}, "credentials_file"),
        ({**plc_like, "endpoint": "http://plc:4840", "anonymous": True}, "endpoint"),
        (
            {"mode": "server", "endpoint": "opc.tcp://0.0.0.0:4840", "anonymous": True},
            "certificate",
        ),
    ]
    for opcua, message in cases:
        path = station_yaml(tmp_path, bundle_dir, frames, 1883, opcua)
        with pytest.raises(ConfigError, match=message):
            config_mod.load(path)


def test_wrong_node_id_and_certificate_are_one_line_errors(tmp_path, bundle_dir, capsys):
    frames = write_frames(tmp_path / "frames", set(), 1, SHAPE)
    certs = tmp_path / "certs"
    plc_cert = rig.app_cert(certs, "plc", "urn:test:plc", server=True)
    st_cert = rig.app_cert(certs, "station", STATION_URI, server=False)
    wrong = rig.app_cert(certs, "wrong", "urn:test:plc", server=True)
    plc = rig.PlcServer(cert=plc_cert, trusted=st_cert[0]).start()
    secure = {
        "certificate": str(st_cert[0]),
        "private_key": str(st_cert[1]),
        "security": "sign_encrypt",
    }
    try:
        bad_node = client_opcua(plc, nodes=plc.nodes_config(ack="ns=2;s=Gate.Nope"), **secure)
        bad_node["peer_certificate"] = str(plc_cert[0])
        bad_cert = client_opcua(plc, peer_certificate=str(wrong[0]), timeout_s=2.0, **secure)
        for opcua, want in (
            (bad_node, "opcua.nodes.ack: ns=2;s=Gate.Nope: BadNodeIdUnknown"),
            (bad_cert, plc.url),
        ):
            path = station_yaml(tmp_path, bundle_dir, frames, 1883, opcua)
            cfg = config_mod.load(path)  # the output alone, as the plan opens it
            with pytest.raises(Exception) as exc:
                opcua_output(cfg, lambda *a: None, required=True)
            text = str(exc.value)
            assert want in text and "\n" not in text, text
    finally:
        plc.stop()
