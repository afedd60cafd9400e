"""Server mode: the station runs a small OPC UA server that the PLC reads or subscribes to.

Its nodes (namespace opcua.namespace; string node ids, so a PLC program can name them):

    <line>.<station>                          Object; the source of the reject events
      .LastVerdict.Sequence     UInt32        1, 2, ... per part: written LAST, so a PLC that
                                              triggers on its change reads a complete verdict
      .LastVerdict.PartId       String        .Frame Int64, .EventId String
      .LastVerdict.Reject       Boolean       .Reason String ("" on a pass), .Score Double
      .LastVerdict.CaptureTime  DateTime
      .Counters.Parts / .Rejects UInt64       verdicts this server has published
      .Counters.Frames / .Unverified UInt64   the station's counts (heartbeat)
      .Status                   String        online | offline
      .Heartbeat                DateTime      every heartbeat_s while the station runs
      .Alarm                    String        the station's alarm text ("" when none)
      .Stalled                  Boolean

A reject is also an event of type LineInspectRejectEventType (PartId, Sequence, Reason, Score,
CaptureTime; Severity 800), emitted by the station object, for PLCs that subscribe to events
rather than poll.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any
from urllib.parse import urlparse

from asyncua import Server, ua

from edge.errors import OutputError
from edge.opcua import security
from edge.opcua.config import OpcUaConfig

log = logging.getLogger("edge.outputs")

V = ua.VariantType
VERDICT_NODES = (
    ("PartId", V.String, ""),
    ("Frame", V.Int64, 0),
    ("EventId", V.String, ""),
    ("Reject", V.Boolean, False),
    ("Reason", V.String, ""),
    ("Score", V.Double, 0.0),
    ("CaptureTime", V.DateTime, None),
    ("Sequence", V.UInt32, 0),  # last: see the module doc
)
COUNTER_NODES = ("Parts", "Rejects", "Frames", "Unverified")
EVENT_FIELDS = (
    ("PartId", V.String),
    ("Sequence", V.UInt32),
    ("Reason", V.String),
    ("Score", V.Double),
    ("CaptureTime", V.DateTime),
)
SEQ_WRAP = 2**31 - 1


def utc(epoch: float | None) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch or 0.0, dt.timezone.utc)


class ServerLink:
    """edge.outputs.queued.Link: the station's OPC UA server."""

    def __init__(self, cfg: OpcUaConfig, line: str, station: str):
        self.cfg = cfg
        self.where = cfg.endpoint
        self.prefix = f"{line}.{station}"
        self.uri = f"urn:lineinspect:{line}:{station}"
        self.server: Any = None
        self.seq = 0
        self.parts = self.rejects = 0

    def node_id(self, name: str) -> str:
        return f"ns={self.ns};s={self.prefix}.{name}"

    async def open(self) -> str:
        cfg = self.cfg
        server = Server(user_manager=security.StationUsers(cfg))
        await server.init()
        server.set_endpoint(cfg.endpoint)
        server.set_server_name(f"LineInspect {self.prefix}")
        await server.set_application_uri(self.uri)
        if cfg.security == "sign_encrypt":
            security.station_certificate(cfg)  # one-line errors naming the key and file
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            await server.load_certificate(cfg.certificate)
            await server.load_private_key(cfg.private_key)
            if cfg.peer_certificate:
                server.set_certificate_validator(
                    security.pinned_validator(security.peer_certificates(cfg))
                )
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        if hasattr(server, "set_identity_tokens"):  # asyncua >= 1.1.6 (2.x)
            tokens = [ua.UserNameIdentityToken] if cfg.username else []
            tokens += [ua.AnonymousIdentityToken] if cfg.anonymous else []
            server.set_identity_tokens(tokens)
        else:  # the 1.1 series on Python 3.8
            ids = ["Username"] if cfg.username else []
            server.set_security_IDs(ids + (["Anonymous"] if cfg.anonymous else []))
        self.server = server
        self.ns = await server.register_namespace(cfg.namespace)
        await self._build_model(server)
        try:
            await server.start()
        except OSError as exc:
            raise OutputError(f"cannot listen on {cfg.endpoint}: {exc.strerror or exc}") from exc
        host = urlparse(cfg.endpoint).hostname
        return (
            f"server listening on {cfg.endpoint} ({cfg.security}, "
            f"{'user ' + cfg.username if cfg.username else ''}"
            f"{' + ' if cfg.username and cfg.anonymous else ''}"
            f"{'anonymous' if cfg.anonymous else ''}); nodes ns={self.ns};s={self.prefix}.*"
            + (" (all interfaces)" if host in ("0.0.0.0", "::") else "")
        )

    async def _build_model(self, server: Any) -> None:
        ns = self.ns
        objects = server.get_objects_node()
        station = await objects.add_object(f"ns={ns};s={self.prefix}", self.prefix)
        self.station_node = station
        self.vars: dict[str, Any] = {}

        async def var(parent: Any, name: str, vtype: Any, value: Any, key: str) -> None:
            if vtype == V.DateTime and value is None:
                value = utc(0)
            node = await parent.add_variable(self.node_id(key), name, ua.Variant(value, vtype))
            self.vars[key] = (node.nodeid, vtype)

        verdict = await station.add_object(self.node_id("LastVerdict"), "LastVerdict")
        for name, vtype, value in VERDICT_NODES:
            await var(verdict, name, vtype, value, f"LastVerdict.{name}")
        counters = await station.add_object(self.node_id("Counters"), "Counters")
        for name in COUNTER_NODES:
            await var(counters, name, V.UInt64, 0, f"Counters.{name}")
        for name, vtype, value in (
            ("Status", V.String, "online"),
            ("Heartbeat", V.DateTime, None),
            ("Alarm", V.String, ""),
            ("Stalled", V.Boolean, False),
        ):
            await var(station, name, vtype, value, name)
        etype = await server.create_custom_event_type(
            ns,
            "LineInspectRejectEventType",
            ua.ObjectIds.BaseEventType,
            [(name, vtype) for name, vtype in EVENT_FIELDS],
        )
        self.events = await server.get_event_generator(etype, station)
        self.events.event.Severity = 800

    async def _set(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            nodeid, vtype = self.vars[key]
            await self.server.write_attribute_value(nodeid, ua.DataValue(ua.Variant(value, vtype)))

    async def write(self, verdict: dict) -> None:
        self.seq = self.seq % SEQ_WRAP + 1
        reject = verdict.get("decision") == "reject"
        self.parts += 1
        self.rejects += reject
        reason = str(verdict.get("reason") or "") if reject else ""
        when = utc(verdict.get("capture_time"))
        await self._set(
            {
                "LastVerdict.PartId": str(verdict.get("part_id", "")),
                "LastVerdict.Frame": int(verdict.get("frame") or 0),
                "LastVerdict.EventId": str(verdict.get("event_id", "")),
                "LastVerdict.Reject": reject,
                "LastVerdict.Reason": reason,
                "LastVerdict.Score": float(verdict.get("score") or 0.0),
                "LastVerdict.CaptureTime": when,
                "LastVerdict.Sequence": self.seq,
                "Counters.Parts": self.parts,
                "Counters.Rejects": self.rejects,
            }
        )
        if reject:
            ev = self.events.event
            ev.PartId, ev.Sequence, ev.Reason = str(verdict.get("part_id", "")), self.seq, reason
            ev.Score, ev.CaptureTime = float(verdict.get("score") or 0.0), when
            ev.Message = ua.LocalizedText(f"reject {ev.PartId}: {reason}")
            await self.events.trigger()

    async def status(self, status: dict) -> None:
        values: dict[str, Any] = {
            "Status": str(status.get("state", "online")),
            "Alarm": str(status.get("alarm") or ""),
            "Heartbeat": utc(status.get("time")),
        }
        if "stalled" in status:
            values["Stalled"] = bool(status["stalled"])
        for key, name in (("frames", "Frames"), ("unverified", "Unverified")):
            if key in status:
                values[f"Counters.{name}"] = int(status[key])
        await self._set(values)

    async def close(self) -> None:
        if self.server is None:
            return
        try:
            await self._set({"Status": "offline"})
        finally:
            server, self.server = self.server, None
            await server.stop()
