"""The MQTT connection: one way to build and configure a paho client (the station's publisher
and `edge listen` both use it), the reasons a connection failed, and event encoding.

    new_client(...)      DiagnosingClient with credentials, TLS, backoff and our logger
    connect_async(...)   connect with the session kept (MQTT 5 session expiry) or clean
    describe_error(exc)  one readable line for a failed connect (DNS, refused, TLS)
    encode_event(obj)    compact JSON that never fails on numpy values, NaN or odd types
    AttemptLog           logs failed attempts on the 1st, 10th, 100th... in a row
"""

from __future__ import annotations

import json
import logging
import math
import socket
from datetime import datetime, timezone
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("lineinspect.mqtt")

_SOCKET_ERRORS = ("failed to receive on socket", "timeout on socket")
PASSWORD_ENV = "LINEINSPECT_MQTT_PASSWORD"


class _PahoNoise(logging.Filter):
    """paho 2.2 logs "Client is not connected" at ERROR on every loop turn without a socket:
    each reconnect attempt during an outage, and after every disconnect; and "failed to receive
    on socket" at ERROR on every attempt a TLS peer rejects. Our own warnings say both (the socket
    error is kept by DiagnosingClient), once per outage and then every 10th, 100th... attempt."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_SOCKET_ERRORS + ("Client is not connected",))


paho_log = logging.getLogger("lineinspect.mqtt.paho")
paho_log.addFilter(_PahoNoise())


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Nagle off on the broker connection. With it on, a small packet written while the
    previous one is unacknowledged at the TCP level (a reject's PUBLISH right after its part's
    result) waits for the peer's delayed ACK: up to 40 ms on Linux. The broker's side needs the
    same (mosquitto: `set_tcp_nodelay true`, docs/mqtt.md)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:  # not a TCP socket (a unix socket, a websocket)
        log.info("MQTT socket: TCP_NODELAY not set (%s)", exc)


class DiagnosingClient(mqtt.Client):
    """paho Client that remembers why the last connection attempt failed (for error messages).

    last_connect_error: the OSError of the last failed connect (refused, DNS, TLS verification).
    last_socket_error: the last receive error paho reported on an open socket, e.g. the broker's
        TLS alert when it wants a client certificate (TLS 1.3 sends it after the handshake);
        whoever reports it clears it.
    """

    last_connect_error: BaseException | None = None
    last_socket_error: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_log = self._remember_socket_error
        self.on_socket_open = _no_delay

    def _remember_socket_error(self, client, userdata, level, buf: str) -> None:
        if level == mqtt.MQTT_LOG_ERR and buf.startswith(_SOCKET_ERRORS):
            self.last_socket_error = buf

    def reconnect(self) -> MQTTErrorCode:
        try:
            rc = super().reconnect()
        except OSError as exc:
            self.last_connect_error = exc
            raise
        self.last_connect_error = None
        return rc


def new_client(
    client_id: str,
    *,
    protocol: str,
    persistent: bool,
    username: str | None,
    password: str | None,
    tls: Any,
    reconnect_max_s: float,
    **client_kwargs: Any,
) -> DiagnosingClient:
    """A configured client (not connected). persistent: keep the session across connections.

    Raises OSError or ValueError when the TLS files cannot be loaded (no retry can fix that)."""
    v5 = protocol == "5"
    client = DiagnosingClient(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else not persistent,
        **client_kwargs,
    )
    client.enable_logger(paho_log)
    if username is not None or password:
        client.username_pw_set(username or "", password)
    if tls is not None:  # ssl.SSLError is an OSError
        client.tls_set(ca_certs=tls.ca_certs, certfile=tls.certfile, keyfile=tls.keyfile)
        client.tls_insecure_set(tls.insecure)
    client.reconnect_delay_set(min(1.0, reconnect_max_s), reconnect_max_s)
    return client


def connect_async(
    client: mqtt.Client,
    host: str,
    port: int,
    keepalive: int,
    *,
    protocol: str,
    persistent: bool,
    session_expiry_s: int,
) -> None:
    """Start connecting in the background (loop_start runs it); MQTT 5 keeps the session for
    session_expiry_s when persistent."""
    kwargs: dict[str, Any] = {}
    if protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry_s if persistent else 0
        kwargs = {"clean_start": not persistent, "properties": props}
    client.connect_async(host, port, keepalive, **kwargs)


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror or exc}"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    if type(exc).__module__ == "ssl":
        return f"TLS: {text}"
    return text


class AttemptLog:
    """Warn on the 1st, 10th, 100th... failed connection attempt in a row, debug otherwise:
    paho retries every reconnect_max_s for as long as the outage lasts, and the log must stay
    readable."""

    def __init__(self, reconnect_max_s: float) -> None:
        self.reconnect_max_s = reconnect_max_s
        self.failed = 0

    def succeeded(self) -> None:
        self.failed = 0

    def failed_attempt(self, msg: str, *args: Any) -> None:
        self.failed += 1
        n = self.failed
        if n == 1 or math.log10(n).is_integer():
            suffix = "" if n == 1 else f" ({n} attempts in a row)"
            log.warning(
                msg + "%s; retrying every <= %g s, rejects are spooled meanwhile",
                *args,
                suffix,
                self.reconnect_max_s,
            )
        else:
            log.debug(msg, *args)


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays unwrapped, non-finite floats as null."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _json_fallback(obj: Any) -> str:
    log.warning("event field of type %s encoded as its str()", type(obj).__name__)
    return str(obj)


def encode_event(event: dict) -> bytes:
    """Compact UTF-8 JSON of an event, never failing on numpy values, NaN or odd types."""
    return json.dumps(
        _jsonable(event), separators=(",", ":"), allow_nan=False, default=_json_fallback
    ).encode()
