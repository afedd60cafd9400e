"""Client mode: the station writes each verdict into the PLC's own OPC UA server, with the
handshake common on lines:

    station: verdict fields (reject, part id, reason, score, capture time), then `sequence`
             (1, 2, ... wrapping at 2^31-1, never 0: it changes with every part)
    PLC:     acts on the change of `sequence`, then writes the same number into `ack`

`ack` is read back until it equals the sequence or opcua.ack_timeout_s passes: NotAcknowledged
(edge/outputs/queued.py counts it and holds an alarm until the PLC acknowledges again). A lost
connection raises, and the output reconnects with backoff and writes the same verdict again.
Every node is read once at connect: a node id the PLC does not have is a one-line error naming
the key and the node; its data type is taken from the PLC, so an Int16 or a Double tag works.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from edge.errors import OutputError
from edge.opcua import security
from edge.opcua.config import OpcUaConfig
from edge.outputs.queued import NotAcknowledged

SEQ_WRAP = 2**31 - 1
ACK_POLL_S = 0.002  # read `ack` this often while waiting (one small read on the PLC)
FIELDS = ("reject", "part_id", "reason", "score", "capture_time")


class ClientLink:
    """edge.outputs.queued.Link: the PLC's server, written as its client."""

    def __init__(self, cfg: OpcUaConfig, line: str, station: str):
        self.cfg = cfg
        self.where = cfg.endpoint
        self.uri = f"urn:lineinspect:{line}:{station}"
        self.client: Any = None
        self.seq = 0
        self.nodes: dict[str, tuple[Any, Any]] = {}  # key -> (Node, VariantType)

    async def open(self) -> str:
        cfg = self.cfg
        client = Client(cfg.endpoint, timeout=cfg.timeout_s)
        client.application_uri = self.uri
        client.name = client.description = f"LineInspect {self.uri}"
        if cfg.security == "sign_encrypt":
            security.station_certificate(cfg)  # one-line errors naming the key and file
            security.peer_certificates(cfg)
            await client.set_security(
                SecurityPolicyBasic256Sha256,
                cfg.certificate,
                cfg.private_key,
                server_certificate=cfg.peer_certificate,  # pinned: another one fails
                mode=ua.MessageSecurityMode.SignAndEncrypt,
            )
        if cfg.username is not None:
            client.set_user(cfg.username)
            client.set_password(cfg.password)
        self.client = client
        try:
            await asyncio.wait_for(client.connect(), cfg.timeout_s)
        except asyncio.TimeoutError:
            hint = (
                " (Sign & Encrypt: a server whose certificate is not opcua.peer_certificate "
                "cannot answer)"
                if cfg.security == "sign_encrypt"
                else ""
            )
            raise OutputError(f"no answer within {cfg.timeout_s:g}s{hint}") from None
        except ua.UaStatusCodeError as exc:
            raise OutputError(f"refused: {_status(exc)}") from exc
        await self._resolve_nodes(client)
        ack = await self.nodes["ack"][0].read_value()
        # Carry on from the number the PLC holds (after a restart of either side), so the next
        # one is a change the PLC sees.
        seq = await self.nodes["sequence"][0].read_value()
        self.seq = seq if isinstance(seq, int) and 0 <= seq <= SEQ_WRAP else 0
        return (
            f"connected to the PLC at {cfg.endpoint} ({cfg.security}, "
            f"{'user ' + cfg.username if cfg.username else 'anonymous'}); "
            f"{len(self.nodes)} nodes found, ack {ack}"
        )

    async def _resolve_nodes(self, client: Any) -> None:
        self.nodes = {}
        for key, nodeid in vars(self.cfg.nodes).items():
            if nodeid is None:
                continue
            node = client.get_node(nodeid)
            try:
                vtype = await node.read_data_type_as_variant_type()
                await node.read_value()
            except ua.UaStatusCodeError as exc:
                raise OutputError(f"opcua.nodes.{key}: {nodeid}: {_status(exc)}") from exc
            self.nodes[key] = (node, vtype)

    async def write(self, verdict: dict) -> None:
        seq = self.seq % SEQ_WRAP + 1
        reject = verdict.get("decision") == "reject"
        values = {
            "reject": reject,
            "part_id": str(verdict.get("part_id", "")),
            "reason": str(verdict.get("reason") or "") if reject else "",
            "score": float(verdict.get("score") or 0.0),
            "capture_time": verdict.get("capture_time") or 0.0,
        }
        nodes, dvs = [], []
        for key in (*FIELDS, "sequence"):  # sequence last: the PLC triggers on it
            if key not in self.nodes:
                continue
            node, vtype = self.nodes[key]
            value = seq if key == "sequence" else _as(values[key], vtype)
            nodes.append(node)
            dvs.append(ua.DataValue(ua.Variant(value, vtype)))
        results = await self.client.uaclient.write_attributes(
            [n.nodeid for n in nodes], dvs, ua.AttributeIds.Value
        )
        bad = [(n, r) for n, r in zip(nodes, results) if not r.is_good()]
        if bad:
            node, code = bad[0]
            raise OutputError(f"writing {node.nodeid.to_string()}: {code}")
        self.seq = seq
        await self._wait_ack(seq)

    async def _wait_ack(self, seq: int) -> None:
        ack_node = self.nodes["ack"][0]
        deadline = time.monotonic() + self.cfg.ack_timeout_s
        while True:
            ack = await ack_node.read_value()
            if ack == seq:
                return
            if time.monotonic() >= deadline:
                raise NotAcknowledged(
                    f"the PLC did not acknowledge sequence {seq} within "
                    f"{self.cfg.ack_timeout_s:g}s ({self.cfg.nodes.ack} is {ack})"
                )
            await asyncio.sleep(ACK_POLL_S)

    async def status(self, status: dict) -> None:
        """The PLC's server holds only the handshake: the status goes out over MQTT."""

    async def close(self) -> None:
        if self.client is None:
            return
        client, self.client = self.client, None
        await client.disconnect()


def _as(value: Any, vtype: Any) -> Any:
    """A verdict field as the PLC's variable type."""
    v = ua.VariantType
    if vtype == v.DateTime:
        return dt.datetime.fromtimestamp(float(value), dt.timezone.utc)
    if vtype in (v.Float, v.Double):
        return float(value)
    if vtype == v.Boolean:
        return bool(value)
    if vtype == v.String:
        return str(value)
    if vtype in (v.SByte, v.Byte, v.Int16, v.UInt16, v.Int32, v.UInt32, v.Int64, v.UInt64):
        return int(value)
    raise OutputError(f"a PLC variable of type {vtype.name} cannot take {value!r}")


def _status(exc: BaseException) -> str:
    """BadNodeIdUnknown, BadUserAccessDenied, ...: asyncua's class per status code."""
    name = type(exc).__name__
    return name if name != "UaStatusCodeError" else " ".join(str(exc).split())
