"""Real OPC UA peers for the tests (asyncua's own server and client, loopback, free ports):

    PlcServer   the PLC's server for client mode: Gate.* variables; acknowledges every new
                Sequence by writing it into Gate.Ack (unless told to stop), and records the
                verdict it read with it
    Subscriber  a PLC subscribing to a station's server (server mode): data changes of the
                LastVerdict nodes and the reject events, in arrival order
    app_cert    a self-signed OPC UA application certificate (DER) and key (PEM)

Each runs its own asyncio loop on its own thread, as a PLC is its own program.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

asyncua = pytest.importorskip("asyncua", reason="the `opcua` extra (asyncua) is not installed")
from asyncua import Client, Server, ua  # noqa: E402
from asyncua.crypto import cert_gen  # noqa: E402
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402

from edge.broker import free_port  # noqa: E402
from tests.polling import wait_until  # noqa: E402

GATE = ("Reject", "PartId", "Reason", "Score", "CaptureTime", "Sequence", "Ack")
V = ua.VariantType
GATE_TYPES = {
    "Reject": (V.Boolean, False),
    "PartId": (V.String, ""),
    "Reason": (V.String, ""),
    "Score": (V.Float, 0.0),  # a Float tag on the PLC: the station writes the PLC's type
    "CaptureTime": (V.Double, 0.0),
    "Sequence": (V.UInt32, 0),
    "Ack": (V.UInt32, 0),
}


def endpoint(port: int | None = None, path: str = "plc") -> str:
    return f"opc.tcp://127.0.0.1:{port or free_port()}/{path}"


def app_cert(folder: Path, name: str, uri: str, server: bool) -> tuple[Path, Path]:
    """(certificate.der, key.pem) for an OPC UA application with application URI `uri`."""
    folder.mkdir(parents=True, exist_ok=True)
    key = cert_gen.generate_private_key()
    use = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = cert_gen.generate_self_signed_app_certificate(
        key,
        name,
        {"organizationName": "LineInspect tests"},
        [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")],
        extended=[use],
    )
    cert_path, key_path = folder / f"{name}.der", folder / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    key_path.chmod(0o600)
    return cert_path, key_path


class LoopThread:
    """An asyncio loop on its own thread; call(coro) runs a coroutine there and waits."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class PlcServer:
    """The PLC's OPC UA server (client mode): ns=2;s=Gate.<name> variables, writable."""

    def __init__(
        self,
        url: str | None = None,
        *,
        cert: tuple[Path, Path] | None = None,
        trusted: Path | None = None,
        users: dict[str, str] | None = None,
    ):
        self.url = url or endpoint()
        self.cert, self.trusted, self.users = cert, trusted, users
        self.acknowledging = True
        self.received: list[dict] = []  # verdicts read at each new Sequence, in order
        self.ns = 2  # the first namespace registered after the standard ones
        self.acks = 0
        self._lt: LoopThread | None = None
        self.server: Any = None

    def node(self, name: str) -> str:
        return f"ns={self.ns};s=Gate.{name}"

    def start(self) -> PlcServer:
        self._lt = LoopThread("plc-server")
        self._lt.call(self._start())
        return self

    async def _start(self) -> None:
        users = self.users

        class Users:
            def get_user(self, iserver, username=None, password=None, certificate=None):
                from edge.opcua.security import User, UserRole

                if users is None:
                    return User(role=UserRole.User)
                pw = password.decode() if isinstance(password, bytes) else password
                return User(role=UserRole.User) if users.get(username) == pw else None

        server = Server(user_manager=Users())
        await server.init()
        server.set_endpoint(self.url)
        await server.set_application_uri("urn:test:plc")
        if self.cert is not None:
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            await server.load_certificate(str(self.cert[0]))
            await server.load_private_key(str(self.cert[1]))
            if self.trusted is not None:
                from edge.opcua.security import pinned_validator

                trusted = x509.load_der_x509_certificate(self.trusted.read_bytes())
                server.set_certificate_validator(
                    pinned_validator({trusted.public_bytes(Encoding.DER)})
                )
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        assert await server.register_namespace("urn:test:plc:gate") == self.ns
        gate = await server.get_objects_node().add_object(f"ns={self.ns};s=Gate", "Gate")
        self.vars = {}
        for name in GATE:
            vtype, value = GATE_TYPES[name]
            node = await gate.add_variable(self.node(name), name, ua.Variant(value, vtype))
            await node.set_writable()
            self.vars[name] = node
        await server.start()
        self.server = server
        self._task = asyncio.ensure_future(self._acknowledge())

    async def _acknowledge(self) -> None:
        """The PLC program: on a new Sequence, take the verdict, then write Ack."""
        last = 0
        while True:
            seq = await self.vars["Sequence"].read_value()
            if seq != last:
                last = seq
                fields = {n: await self.vars[n].read_value() for n in GATE[:5]}
                self.received.append({"sequence": seq, **fields, "t": time.time()})
                if self.acknowledging:
                    await self.vars["Ack"].write_value(ua.Variant(seq, V.UInt32))
                    self.acks += 1
            await asyncio.sleep(0.001)

    def stop(self) -> None:
        if self._lt is None:
            return
        self._task.cancel()
        self._lt.call(self.server.stop())
        self._lt.stop()
        self._lt = None

    def nodes_config(self, **over: str) -> dict[str, str]:
        nodes = {
            "reject": self.node("Reject"),
            "part_id": self.node("PartId"),
            "reason": self.node("Reason"),
            "score": self.node("Score"),
            "capture_time": self.node("CaptureTime"),
            "sequence": self.node("Sequence"),
            "ack": self.node("Ack"),
        }
        return {**nodes, **over}


class _Handler:
    def __init__(self, sub: Subscriber):
        self.sub = sub

    def datachange_notification(self, node, val, data) -> None:
        self.sub.changes.append((node.nodeid.Identifier.rsplit(".", 1)[-1], val))

    def event_notification(self, event) -> None:
        self.sub.events.append(event.get_event_props_as_fields_dict())


class Subscriber:
    """A PLC subscribed to a station's OPC UA server (server mode)."""

    def __init__(self, url: str, prefix: str, *, user: tuple[str, str] | None = None, **sec: Any):
        self.url, self.prefix, self.user, self.sec = url, prefix, user, sec
        self.changes: list[tuple[str, Any]] = []
        self.events: list[dict] = []
        self._lt = LoopThread("opcua-subscriber")

    def start(self) -> Subscriber:
        self._lt.call(self._start())
        return self

    async def _start(self) -> None:
        client = Client(self.url, timeout=5)
        if self.user:
            client.set_user(self.user[0])
            client.set_password(self.user[1])
        if self.sec:
            client.application_uri = self.sec.pop("uri")
            await client.set_security(
                SecurityPolicyBasic256Sha256,
                mode=ua.MessageSecurityMode.SignAndEncrypt,
                **self.sec,
            )
        await client.connect()
        self.client = client
        ns = await client.get_namespace_index("urn:lineinspect")
        base = f"ns={ns};s={self.prefix}"
        sub = await client.create_subscription(20, _Handler(self))
        names = ("Sequence", "PartId", "Reject")
        nodes = [client.get_node(f"{base}.LastVerdict.{n}") for n in names]
        await sub.subscribe_data_change(nodes, queuesize=10000)
        etype = await client.nodes.base_event_type.get_child(f"{ns}:LineInspectRejectEventType")
        await sub.subscribe_events(client.get_node(base), etype)
        self.sub = sub
        self.ns = ns

    def read(self, name: str) -> Any:
        node = self.client.get_node(f"ns={self.ns};s={self.prefix}.{name}")
        return self._lt.call(node.read_value())

    def sequences(self) -> list[int]:
        return [v for n, v in self.changes if n == "Sequence" and v]

    def wait(self, cond: Any, timeout: float = 20.0) -> bool:
        return wait_until(cond, timeout)

    def stop(self) -> None:
        try:
            self._lt.call(self.client.disconnect(), timeout=10)
        except ConnectionError:
            pass  # the station's server stopped first: nothing to close
        finally:
            self._lt.stop()
