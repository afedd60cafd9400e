"""The `opcua:` section of a station config (edge/config.py holds it). No asyncua import here:
a station without the `opcua` extra still loads and validates its config.

    mode: server   the station runs an OPC UA server the PLC reads or subscribes to
    mode: client   the station writes each verdict into the PLC's own server and waits for the
                   PLC to acknowledge it (nodes: which variables; see docs/opcua.md)
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlparse

INPUT = {"path": "input"}  # edge.config.INPUT: a file the station reads (deploy ships it)

ENDPOINT_RE = re.compile(r"^opc\.tcp://[^\s/@]+:\d{1,5}(/[^\s]*)?$")
# Node ids as OPC UA writes them: ns=<index>;<i|s|g|b>=<identifier> (or without ns=, ns 0).
NODE_ID_RE = re.compile(
    r"^(ns=\d{1,5};)?(i=\d+|s=[^\x00-\x1f]+|g=[0-9A-Fa-f-]{36}|b=[A-Za-z0-9+/=]+)$"
)


@dataclass
class OpcUaNodes:
    """Client mode: the PLC's variables. The station writes the verdict fields, then `sequence`
    (1, 2, ... wrapping at 2^31-1, never 0: it changes with every part); the PLC acts on the
    change and writes the same number into `ack`."""

    sequence: str
    ack: str
    reject: str
    part_id: str | None = None
    reason: str | None = None
    score: str | None = None
    capture_time: str | None = None  # a Double (seconds since the epoch) or a DateTime

    def validate(self) -> None:
        for key, value in vars(self).items():
            if value is not None and not NODE_ID_RE.fullmatch(value):
                raise ValueError(
                    f"{key}: {value!r} is not an OPC UA node id (ns=<n>;s=<name> or ns=<n>;i=<n>)"
                )


@dataclass
class OpcUaConfig:
    mode: Literal["server", "client"]
    # server: where to listen (opc.tcp://0.0.0.0:4840/lineinspect); client: the PLC's endpoint
    endpoint: str
    # sign_encrypt: Basic256Sha256, Sign & Encrypt, with the certificates below. none: plain
    # (test rigs, or a PLC without security), must be said explicitly.
    security: Literal["sign_encrypt", "none"] = "sign_encrypt"
    certificate: str | None = field(default=None, metadata=INPUT)  # the station's (DER or PEM)
    private_key: str | None = field(default=None, metadata=INPUT)  # its key (PEM), owner-only
    # client: the PLC server's certificate (pinned: another one is refused); server: the PLC
    # client certificate(s) trusted (a file or a folder of them)
    peer_certificate: str | None = field(default=None, metadata=INPUT)
    # Anonymous sessions: only when said here. Otherwise user and password come from the
    # credentials file (opcua_username / opcua_password): client = what the station logs in
    # with, server = the one user the station's server accepts.
    anonymous: bool = False
    # Set from credentials_file (opcua_username / opcua_password) only; refused in the YAML.
    username: str | None = None
    password: str | None = None
    namespace: str = "urn:lineinspect"  # server mode: the namespace of the station's nodes
    queue_size: int = 1000  # verdicts waiting for this output; full = oldest dropped, alarmed
    timeout_s: float = 5.0  # connect and each request
    ack_timeout_s: float = 2.0  # client: the PLC writes `ack` within this, else an alarm
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 10.0
    # false: a PLC that is down or refuses the station at start-up is alarmed and retried in
    # the background while verdicts queue (deploy sets false; interactive runs fail loudly)
    require_at_start: bool = True
    nodes: OpcUaNodes | None = None  # client mode: required

    def validate(self) -> None:
        if not ENDPOINT_RE.fullmatch(self.endpoint):
            raise ValueError(
                f"endpoint: {self.endpoint!r} is not opc.tcp://host:port[/path] (no user info)"
            )
        if self.mode == "client" and self.nodes is None:
            raise ValueError("nodes: required in client mode (sequence, ack, reject, ...)")
        if self.mode == "server" and self.nodes is not None:
            raise ValueError("nodes: only in client mode (the server's nodes are the station's)")
        if self.security == "sign_encrypt" and not (self.certificate and self.private_key):
            raise ValueError(
                "certificate/private_key: required with security: sign_encrypt "
                "(or say security: none)"
            )
        if self.mode == "client" and self.security == "sign_encrypt" and not self.peer_certificate:
            raise ValueError("peer_certificate: the PLC server's certificate is required")
        if self.queue_size < 1:
            raise ValueError(f"queue_size: must be >= 1, got {self.queue_size}")
        for key in ("timeout_s", "ack_timeout_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be > 0, got {getattr(self, key)}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError(
                "reconnect_min_s/reconnect_max_s: need 0 < min <= max, got "
                f"{self.reconnect_min_s}, {self.reconnect_max_s}"
            )


def free_endpoint(endpoint: str) -> str:
    """The endpoint with its port replaced by a free one on the same host (`edge check` on a
    machine where the station's server already listens)."""
    parsed = urlparse(endpoint)
    host = parsed.hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return parsed._replace(netloc=netloc).geturl()
