"""MQTT publisher of a station: reject events that are never lost, results, status, metrics.

Topics, under ``<prefix>/<line>/<station>`` (the topic base):

- ``reject``  QoS 1, one event per rejected part. Each event is published at once and written to
  the on-disk spool (fsync) before `publish_reject` returns; it leaves the spool only when the
  broker's PUBACK says success. A broker outage or a process crash therefore loses none, and the
  disk sync is not on the way to the broker; consumers drop duplicates by event_id.
- ``result``  every part (optional), QoS 0 by default (``result_qos``), best effort, not spooled.
- ``status``  retained: ``online`` on every (re)connect, ``offline`` on a clean close and as the
  last will when the connection dies; ``alarm`` while any alarm holds (spool filling up, a spool
  write failing, a spool recovered or recreated, no subscriber for the rejects, the broker not
  acknowledging, a stalled pipeline); a periodic heartbeat (``heartbeat``).

Every reject carries ``seq`` (1, 2, ... per station process) and ``bd_seq`` (incremented at every
start, kept in the spool file), so a gate sees a gap when an event is missing. A PUBACK with
reason "no matching subscribers" (MQTT 5, code 16) does not delete the event: it stays spooled,
is retried, and an alarm holds until a reject is acknowledged with success. At most
``max_inflight`` rejects are unacknowledged at a time; when the oldest has waited
``ACK_ALARM_S`` an alarm says the broker stopped acknowledging.
- ``metrics`` QoS 0, periodic.

Threads: the caller's (publish_*), paho's network loop, and one worker of ours. Paho callbacks only
enqueue what happened; the worker does the bookkeeping, the spool acks (one sync per batch) and
re-sends what the spool holds after every (re)connect, oldest first, a window at a time. Fresh
rejects are published at once by the caller, so they never wait behind a long backlog.

Paho keeps every unacknowledged QoS 1 message in memory and re-sends it by itself after a
reconnect; the spool pass skips those (they are "in flight"), so a reconnect does not double-send.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import socket
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge import __version__
from edge.config import MqttConfig
from edge.errors import BrokerError
from edge.metrics import LatencyWindows
from edge.spool import Spool, SpoolError, SpoolFullError

__all__ = ["Publisher", "BrokerError", "SpoolError", "SpoolFullError", "PASSWORD_ENV"]

log = logging.getLogger("lineinspect.mqtt")


class _PahoNoise(logging.Filter):
    """paho 2.2 logs "Client is not connected" at ERROR on every loop turn without a socket:
    each reconnect attempt during an outage, and after every disconnect; and "failed to receive
    on socket" at ERROR on every attempt a TLS peer rejects. Our own warnings say both (the socket
    error is kept by DiagnosingClient), once per outage and then every 10th, 100th... attempt."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_SOCKET_ERRORS + ("Client is not connected",))


paho_log = logging.getLogger("lineinspect.mqtt.paho")
paho_log.addFilter(_PahoNoise())

_SOCKET_ERRORS = ("failed to receive on socket", "timeout on socket")
PASSWORD_ENV = "LINEINSPECT_MQTT_PASSWORD"
ALARM_LEVELS = (50, 90)  # percent of the spool; 100 = full (publish_reject raises)
ACK_ALARM_S = 5.0  # the oldest unacknowledged reject this old: "broker not acknowledging"
NO_SUBSCRIBERS = 16  # MQTT 5 PUBACK reason code "No matching subscribers"
NO_SUBSCRIBER_RETRY_S = 2.0  # re-send pass after such a PUBACK (a gate may subscribe soon)
_ALARM_CLEAR_MARGIN = 5  # percent below a level before its alarm clears (no flapping)


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# Latency windows the publisher fills from its PUBACKs: capture -> broker acknowledgement.
ACK_WINDOWS = ("reject_acked", "result_acked")


class _Track:
    """One QoS>0 publish waiting for its on_publish (event_id None: status or result).

    window/t_capture: a part's event (ACK_WINDOWS key, monotonic capture time): its PUBACK adds
    capture -> ack to that latency window."""

    __slots__ = ("event_id", "ambiguous", "window", "t_capture")

    def __init__(
        self, event_id: str | None, window: str | None = None, t_capture: float | None = None
    ) -> None:
        self.event_id = event_id
        self.ambiguous = False  # a QoS 0 publish got the same mid: its ack cannot be trusted
        self.window = window
        self.t_capture = t_capture


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


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror or exc}"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    if type(exc).__module__ == "ssl":
        return f"TLS: {text}"
    return text


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


class Publisher:
    """Publishes a station's events; reject events go through the durable spool.

    `status_info` (model, model_sha256, config_sha256, ...) is merged into every status message.
    """

    def __init__(
        self,
        cfg: MqttConfig,
        topic_base: str,
        status_info: dict | None = None,
        *,
        resend_window: int = 40,
        retry_interval_s: float = 30.0,
        session_expiry_s: int = 3600,
        retain_status: bool = True,
    ) -> None:
        self.cfg = cfg
        self.topic_base = topic_base.rstrip("/")
        self.topics = {
            k: f"{self.topic_base}/{k}" for k in ("reject", "result", "status", "metrics")
        }
        parts = self.topic_base.split("/")
        self.status_info: dict[str, Any] = {"version": __version__}
        if len(parts) >= 3:
            self.status_info.update(line=parts[-2], station=parts[-1])
        self.status_info.update(status_info or {})
        self.client_id = cfg.client_id or "lineinspect-" + "-".join(parts[-2:])
        self.address = f"{cfg.host}:{cfg.port}"
        self.resend_window = resend_window
        self.retry_interval_s = retry_interval_s
        self.session_expiry_s = session_expiry_s
        # False for a probe (`edge check`): its status must not linger as a retained message.
        self.retain_status = retain_status
        self.spool = Spool(cfg.spool, cfg.spool_max_events)

        self._lock = threading.Lock()  # client.publish + the bookkeeping below
        self._error_lock = threading.Lock()
        self._mids: dict[int, deque[_Track]] = {}
        self._inflight: dict[str, _Track] = {}  # event_id -> track, held by paho until acked
        # Rejects published but not yet in the spool (publish_reject sends before it syncs), and
        # those of them whose PUBACK came first: removed from the spool right after the put.
        self._storing: set[str] = set()
        self._acked_while_storing: set[str] = set()
        self.ack_latency = LatencyWindows(ACK_WINDOWS)  # capture -> PUBACK, per event kind
        self._connected = False
        self._resend_cursor: int | None = None  # spool seq of the running re-send pass
        # A reject was held back (in-flight window full) and stored: the pump starts a pass as
        # soon as the window has room, not only at the next periodic retry.
        self._held_back_pending = False
        self._next_retry = 0.0
        self._alarm_level = 0
        # Alarms besides the spool fill level, by kind; all of them go out in status "alarm".
        self._alarms: dict[str, str] = {}
        self.bd_seq: int | None = None  # set at start(): this process's birth/death sequence
        self._seq = 0  # last reject seq handed out
        self._max_inflight = getattr(cfg, "max_inflight", 100)
        self._last_ack = time.monotonic()
        self._counts = dict.fromkeys(
            (
                "published",
                "acked",
                "refused",
                "publish_errors",
                "reconnects",
                "disconnects",
                "connect_refusals",
                "connect_failures",
                "spool_full",
                "spool_errors",
                "callback_errors",
                "results_dropped",
                "metrics_dropped",
                "no_subscribers",
                "spool_recreated",
                "held_back",
            ),
            0,
        )
        self._events: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._client: DiagnosingClient | None = None
        self._worker: threading.Thread | None = None
        self._first_connack = threading.Event()
        self._first_connect_handled = threading.Event()  # the worker has set _connected
        self._first_connack_rc: Any = None
        self._has_connected = False
        self._failed_attempts = 0  # consecutive failed connection attempts (logging only)
        self._connack_seen = False  # a CONNACK arrived on the current connection attempt
        self._last_socket_error: str | None = None
        self._closing = False
        self._closed = False

    # -- life cycle ------------------------------------------------------------------------------

    def start(self, required: bool = True) -> None:
        """Connect, waiting up to cfg.connect_timeout_s for the first CONNACK.

        required=True: raise BrokerError (one line: address, reason, time waited) when no
        connection came up. required=False: log that error and return; the client keeps
        retrying in the background and rejects are spooled until the broker accepts it (for a
        station that must inspect even when its broker is down, refusing or misconfigured at
        start-up, instead of exiting and being restarted in a loop). A TLS setup error (missing
        or unreadable certificate file) always raises: no retry can fix it.
        """
        if self._closed:
            raise BrokerError("MQTT publisher is closed")
        if self._client is not None:
            raise RuntimeError("Publisher.start() called twice")
        cfg = self.cfg
        t0 = time.monotonic()
        v5 = cfg.protocol == "5"
        self.bd_seq = self.spool.next_bd_seq()
        self.status_info["bd_seq"] = self.bd_seq
        if self.spool.recovered:
            with self._lock:
                self._alarms["spool_recovered"] = self.spool.recovered
        client = DiagnosingClient(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
        )
        client.enable_logger(paho_log)
        client.will_set(
            self.topics["status"],
            self._status_payload("offline", reason="connection lost (last will)"),
            qos=1,
            retain=self.retain_status,
        )
        password = cfg.password if cfg.password is not None else os.environ.get(PASSWORD_ENV)
        if cfg.username is not None or password:
            client.username_pw_set(cfg.username or "", password)
        if cfg.tls is not None:
            try:
                client.tls_set(
                    ca_certs=cfg.tls.ca_certs, certfile=cfg.tls.certfile, keyfile=cfg.tls.keyfile
                )
                client.tls_insecure_set(cfg.tls.insecure)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise self._start_error(f"TLS setup failed: {describe_error(exc)}", t0) from exc
        client.reconnect_delay_set(min(1.0, cfg.reconnect_max_s), cfg.reconnect_max_s)
        client.connect_timeout = max(0.5, min(5.0, cfg.connect_timeout_s))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_connect_fail = self._on_connect_fail
        kwargs: dict[str, Any] = {}
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
            kwargs = {"clean_start": False, "properties": props}
        try:
            client.connect_async(cfg.host, cfg.port, cfg.keepalive, **kwargs)
        except ValueError as exc:
            raise self._start_error(str(exc), t0) from exc

        self._closing = False
        self._first_connack.clear()
        self._client = client
        self._worker = threading.Thread(target=self._run, name="lineinspect-mqtt", daemon=True)
        self._worker.start()
        client.loop_start()

        if not v5:
            log.warning(
                "MQTT 3.1.1: a broker that denies %s (ACL) still acknowledges and drops the "
                "events; only MQTT 5 reports the refusal (protocol: '5')",
                self.topics["reject"],
            )
        got = self._first_connack.wait(cfg.connect_timeout_s)
        rc = self._first_connack_rc
        if got and rc is not None and not rc.is_failure:
            # The worker marks the client connected just after the CONNACK callback; wait for
            # it, or results and metrics published right after start() would count as dropped.
            self._first_connect_handled.wait(5.0)
            return
        if got:
            reason = f"connection refused by the broker: {rc}"
        elif client.last_connect_error is not None:
            reason = describe_error(client.last_connect_error)
        elif self._last_socket_error is not None:
            reason = f"connection closed before CONNACK: {self._last_socket_error}"
        else:
            reason = "no CONNACK from the broker (TCP connected: wrong port, TLS expected, or a stalled broker?)"
        error = self._start_error(reason, t0)
        if not required:
            log.error(
                "%s; running without it: rejects are spooled in %s until the broker accepts "
                "the connection (retrying every <= %g s)",
                error,
                self.spool.path,
                cfg.reconnect_max_s,
            )
            return
        self._stop_threads()
        raise error

    def _start_error(self, reason: str, t0: float) -> BrokerError:
        waited = time.monotonic() - t0
        return BrokerError(
            f"cannot reach MQTT broker at {self.address}: {reason} (waited {waited:.1f} s)"
        )

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush, say offline (retained), disconnect, stop, close the spool. Idempotent.

        Waits up to timeout_s for the spool to drain, then up to 1 s more for the offline status.
        What is not acknowledged stays in the spool for the next start.
        """
        if self._closed:
            return
        deadline = time.monotonic() + timeout_s
        client = self._client
        if client is not None:
            if not self.flush(timeout_s):
                log.warning(
                    "closing with %d reject event(s) not acknowledged; they stay in %s and are "
                    "sent on the next start",
                    len(self.spool),
                    self.spool.path,
                )
            with self._lock:
                self._closing = True
                info = None
                if self._connected:
                    info = self._publish_locked(
                        self.topics["status"],
                        self._status_payload("offline", reason="shutdown"),
                        qos=1,
                        retain=self.retain_status,
                    )
            status_deadline = max(deadline, time.monotonic() + 1.0)
            while info is not None and not info.is_published():
                if time.monotonic() >= status_deadline:
                    log.warning("offline status not acknowledged by %s before close", self.address)
                    break
                time.sleep(0.01)
            client.disconnect()
        self._stop_threads()
        self._closed = True
        self.spool.close()

    def _stop_threads(self) -> None:
        client, worker = self._client, self._worker
        if client is not None:
            client.loop_stop()
        if worker is not None:
            self._events.put(("stop",))
            worker.join()
        with self._lock:
            self._client = None
            self._worker = None
            self._connected = False
            self._mids.clear()
            self._inflight.clear()
            self._resend_cursor = None

    def __enter__(self) -> Publisher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- publishing ------------------------------------------------------------------------------

    def publish_reject(self, event: dict, t_capture: float | None = None) -> None:
        """Publish one reject event at once, then spool it durably; returns when it is on disk.

        The event goes to the broker before the spool's fsync, so the disk sync is not on the
        way to the reject gate; the caller still gets control back only once the event would
        survive a crash. A PUBACK that arrives during the sync removes it right after.

        Args:
            event: the reject event (must have event_id).
            t_capture: monotonic capture time of the part: its PUBACK then feeds the
                `reject_acked` latency window (capture -> broker acknowledgement).

        Raises SpoolFullError when the spool is full and SpoolError when it cannot be written: the
        event was NOT stored (it may still reach a connected broker); the caller must count it
        and raise an alarm.
        """
        if self._closed:
            raise BrokerError("MQTT publisher is closed; reject event not stored")
        try:
            event_id = str(event["event_id"])
        except KeyError:
            raise ValueError("reject event has no event_id") from None
        topic = self.topics["reject"]
        with self._lock:
            # seq numbers every reject this process owes, stored or not: a gap at the gate is
            # exactly a reject that never arrived.
            self._seq += 1
            event = {**event, "seq": self._seq, "bd_seq": self.bd_seq or 0}
            payload = encode_event(event)
            held = len(self._inflight) >= self._max_inflight
            if held:
                self._counts["held_back"] += 1  # the spool keeps it; the pump sends it later
            elif self._connected and event_id not in self._inflight:
                self._storing.add(event_id)
                self._publish_locked(
                    topic, payload, 1, event_id=event_id, window="reject_acked", t_capture=t_capture
                )
        try:
            self._check_spool_file()
            self.spool.put(topic, payload, event_id, qos=1)
        except SpoolFullError:
            with self._lock:
                self._counts["spool_full"] += 1
                self._set_alarm_locked(100)
            raise
        except SpoolError as exc:
            with self._lock:
                self._counts["spool_errors"] += 1
                sent = event_id in self._storing
            # Loud at once: a retained alarm on status (the reject itself went to a connected
            # broker before the write, when there was one).
            self.raise_alarm(
                "spool_write",
                f"spool write failed ({' '.join(str(exc).split())[:200]}); reject {event_id} "
                + ("sent but not stored" if sent else "NOT stored, not sent"),
            )
            raise
        finally:
            with self._lock:
                self._storing.discard(event_id)
                acked_early = event_id in self._acked_while_storing
                self._acked_while_storing.discard(event_id)
            if acked_early:  # also when the put failed: the broker has it, count the ack
                self._ack_spooled([event_id])
        self.clear_alarm("spool_write")
        if held:
            with self._lock:
                self._held_back_pending = True
        if not acked_early:
            with self._lock:
                self._update_alarm_locked()

    def publish_result(
        self, event: dict, qos: int | None = None, t_capture: float | None = None
    ) -> bool:
        """Best effort (not spooled). False when not connected (counted in results_dropped).

        qos: default cfg.result_qos. t_capture: monotonic capture time of the part; with QoS 1
        its PUBACK feeds the `result_acked` latency window."""
        qos = self.cfg.result_qos if qos is None else qos
        return self._publish_plain(
            self.topics["result"],
            encode_event(event),
            qos,
            "results_dropped",
            window="result_acked",
            t_capture=t_capture,
        )

    def publish_metrics(self, metrics: dict) -> bool:
        """QoS 0, best effort. False when not connected (counted in metrics_dropped).

        The publisher's own counters (stats(): refused PUBACKs, publish errors, connection
        failures, spool fill, alarm) go out under "mqtt" unless the caller already set that key.
        """
        if "mqtt" not in metrics:
            metrics = {**metrics, "mqtt": self.stats()}
        return self._publish_plain(
            self.topics["metrics"], encode_event(metrics), 0, "metrics_dropped"
        )

    def _publish_plain(
        self, topic: str, payload: bytes, qos: int, dropped: str, **track: Any
    ) -> bool:
        """Publish when connected, else count it under `dropped`. track: window, t_capture."""
        with self._lock:
            if not self._connected:
                self._counts[dropped] += 1
                return False
            return self._publish_locked(topic, payload, qos=qos, **track) is not None

    def flush(self, timeout_s: float) -> bool:
        """Wait until every spooled event is acknowledged. False on timeout."""
        deadline = time.monotonic() + timeout_s
        while len(self.spool):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def stats(self) -> dict:
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
            out["inflight"] = len(self._inflight)
            out["connected"] = self._connected
            out["alarm"] = self._alarm_text()
            out["seq"] = self._seq
            out["bd_seq"] = self.bd_seq
        out["spooled"] = len(self.spool)
        out["spool_fill"] = round(self.spool.fill_ratio, 4)
        return out

    @property
    def connected(self) -> bool:
        return self._connected

    # -- publishing internals (self._lock held) --------------------------------------------------

    def _publish_locked(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool = False,
        event_id: str | None = None,
        window: str | None = None,
        t_capture: float | None = None,
    ) -> mqtt.MQTTMessageInfo | None:
        """client.publish + bookkeeping. `event_id`: a spooled event, acked on its PUBACK.
        `window`, `t_capture`: see _Track (ignored for QoS 0, which has no acknowledgement).

        Returns None when paho refused the message (counted and logged; a spooled event stays
        in the spool and goes out with the next re-send pass).
        """
        client = self._client
        if client is None:
            return None
        what = f"reject {event_id} (kept in the spool)" if event_id else f"on {topic}"
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain)
        except (ValueError, OSError) as exc:
            self._counts["publish_errors"] += 1
            log.error("cannot publish %s: %s", what, exc)
            return None
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            self._counts["publish_errors"] += 1
            log.error("cannot publish %s: paho queue full", what)
            return None
        if qos > 0:
            track = _Track(event_id, window if t_capture is not None else None, t_capture)
            self._mids.setdefault(info.mid, deque()).append(track)
            if event_id is not None:
                if not self._inflight:  # the ack clock starts with the first one in flight
                    self._last_ack = time.monotonic()
                self._inflight[event_id] = track
                self._counts["published"] += 1
        else:
            # A QoS 0 message with the mid of a QoS 1 one still in flight (the 16-bit mid wrapped):
            # its on_publish is indistinguishable from the PUBACK, so neither can ack the spool.
            for track in self._mids.get(info.mid, ()):
                track.ambiguous = True
        return info

    def _status_payload(self, state: str, **extra: Any) -> bytes:
        payload = {"state": state, **self.status_info, "time": utc_now_iso()}
        alarm = self._alarm_text()
        if alarm:
            payload["alarm"] = alarm
        payload.update({k: v for k, v in extra.items() if v is not None})
        return encode_event(payload)

    def _alarm_text(self) -> str | None:
        texts = [f"spool {self._alarm_level}% full"] if self._alarm_level else []
        texts += self._alarms.values()
        return "; ".join(texts) or None

    # -- alarms ------------------------------------------------------------------------------------

    def raise_alarm(self, kind: str, text: str) -> None:
        """Hold an alarm (logged, and at once on the retained status when connected) until
        clear_alarm(kind). Raising the same text again does nothing."""
        with self._lock:
            if self._alarms.get(kind) == text:
                return
            self._alarms[kind] = text
            self._publish_status_locked()
        log.error("ALARM %s: %s", kind, text)

    def clear_alarm(self, kind: str) -> None:
        with self._lock:
            if kind not in self._alarms:
                return
            del self._alarms[kind]
            self._publish_status_locked()
        log.warning("alarm %s cleared", kind)

    def alarms(self) -> dict[str, str]:
        with self._lock:
            return dict(self._alarms)

    def _publish_status_locked(self, **extra: Any) -> None:
        if self._connected and not self._closing:
            self._publish_locked(
                self.topics["status"],
                self._status_payload("online", **extra),
                qos=1,
                retain=self.retain_status,
            )

    def publish_heartbeat(self, info: dict) -> bool:
        """The periodic retained `online` status with the station's liveness figures (QoS 0:
        a broker that stops acknowledging must not fill the in-flight window with them)."""
        with self._lock:
            if not self._connected or self._closing:
                return False
            extra = {"heartbeat": {**info, "seq": self._seq, "bd_seq": self.bd_seq}}
            return (
                self._publish_locked(
                    self.topics["status"],
                    self._status_payload("online", **extra),
                    qos=0,
                    retain=self.retain_status,
                )
                is not None
            )

    def _check_spool_file(self) -> None:
        """A deleted or replaced spool file: recreate it and alarm (events only the lost file
        held are gone; those in flight still reach the broker)."""
        if self.spool.check_file():
            with self._lock:
                self._counts["spool_recreated"] += 1
            self.raise_alarm(
                "spool_recreated",
                f"spool {self.spool.path} was deleted or replaced while running; recreated "
                f"({self.spool.recreated} time(s))",
            )

    def _update_alarm_locked(self) -> None:
        percent = 100.0 * self.spool.fill_ratio
        level = (
            100 if percent >= 100 else max((lv for lv in ALARM_LEVELS if percent >= lv), default=0)
        )
        if level < self._alarm_level:  # clear only well below the level raised (no flapping)
            held = max(
                (lv for lv in ALARM_LEVELS if percent >= lv - _ALARM_CLEAR_MARGIN), default=0
            )
            level = min(self._alarm_level, max(level, held))
        self._set_alarm_locked(level)

    def _set_alarm_locked(self, level: int) -> None:
        if level == self._alarm_level:
            return
        raised = level > self._alarm_level
        self._alarm_level = level
        if raised:
            log.warning(
                "spool %s is %d%% full (%d of %d reject events not acknowledged by %s)",
                self.spool.path,
                level,
                len(self.spool),
                self.spool.max_events,
                self.address,
            )
        else:
            log.info("spool %s alarm now: %s", self.spool.path, self._alarm_text() or "cleared")
        if self._connected and not self._closing:
            self._publish_locked(
                self.topics["status"],
                self._status_payload("online"),
                qos=1,
                retain=self.retain_status,
            )

    # -- paho callbacks (network thread): only enqueue ------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if not self._first_connack.is_set():
                self._first_connack_rc = reason_code
                self._first_connack.set()
            self._events.put(("connect", reason_code, bool(flags.session_present)))
        except Exception:
            self._callback_failed("on_connect")

    def _on_connect_fail(self, client, userdata) -> None:
        try:
            self._events.put(("connect_fail", client.last_connect_error))
        except Exception:
            self._callback_failed("on_connect_fail")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            socket_error, client.last_socket_error = client.last_socket_error, None
            if socket_error is not None:
                self._last_socket_error = socket_error  # for start()'s error message
            self._events.put(("disconnect", reason_code, socket_error))
        except Exception:
            self._callback_failed("on_disconnect")

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        try:
            self._events.put(("ack", mid, reason_code, time.monotonic()))
        except Exception:
            self._callback_failed("on_publish")

    def _callback_failed(self, name: str) -> None:
        with self._error_lock:  # not self._lock: paho may hold its own locks here
            self._counts["callback_errors"] += 1
        log.exception("error in MQTT %s callback", name)

    # -- worker ----------------------------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                items = [self._events.get(timeout=0.25)]
            except queue.Empty:
                items = []
            while len(items) < 1000:
                try:
                    items.append(self._events.get_nowait())
                except queue.Empty:
                    break
            try:
                stop = self._handle(items)
                self._watch()
                self._pump()
            except Exception:
                self._callback_failed("worker")
                time.sleep(0.1)

    def _handle(self, items: list[tuple]) -> bool:
        stop = False
        acked: list[str] = []
        for item in items:
            kind = item[0]
            try:
                if kind == "stop":
                    stop = True
                elif kind == "ack":
                    self._handle_ack(item[1], item[2], item[3], acked)
                elif kind == "connect":
                    self._handle_connect(item[1], item[2])
                elif kind == "disconnect":
                    self._handle_disconnect(item[1], item[2])
                elif kind == "connect_fail":
                    with self._lock:
                        self._counts["connect_failures"] += 1
                    self._log_failed_attempt(
                        "cannot connect to MQTT broker %s: %s",
                        self.address,
                        describe_error(item[1]) if item[1] is not None else "unknown error",
                    )
            except Exception:  # one bad item must not cost the others (a lost "connect" would)
                self._callback_failed(f"worker ({kind})")
        if acked:
            self._ack_spooled(acked)
        return stop

    def _ack_spooled(self, event_ids: list[str]) -> None:
        """Remove events the broker acknowledged from the spool (one transaction)."""
        try:
            self.spool.ack_many(event_ids)
        except SpoolError:
            with self._lock:
                self._counts["spool_errors"] += 1
            log.exception("acknowledged events stay spooled (they will be sent again)")
        with self._lock:
            self._counts["acked"] += len(event_ids)
            self._update_alarm_locked()

    def _handle_ack(self, mid: int, reason_code: Any, t_ack: float, acked: list[str]) -> None:
        with self._lock:
            tracks = self._mids.get(mid)
            if not tracks:
                return  # a QoS 0 message, or one sent before a restart of the client
            track = tracks.popleft()
            if not tracks:
                del self._mids[mid]
            failed = reason_code is not None and reason_code.is_failure
            if track.window is not None and not failed:
                self.ack_latency.add(track.window, t_ack - track.t_capture)
            if track.event_id is None:
                if failed:
                    self._counts["refused"] += 1
                    log.warning("broker refused a status/result message: %s", reason_code)
                return
            self._inflight.pop(track.event_id, None)
            self._last_ack = t_ack
            no_subscribers = (
                reason_code is not None and getattr(reason_code, "value", 0) == NO_SUBSCRIBERS
            )
            if no_subscribers:
                # The broker took it but nobody will get it: not delivered. Keep it, retry soon.
                self._counts["no_subscribers"] += 1
                self._next_retry = min(self._next_retry, time.monotonic() + NO_SUBSCRIBER_RETRY_S)
                text = f"no subscriber on {self.topics['reject']}: rejects kept in the spool"
                if self._alarms.get("no_subscribers") != text:
                    self._alarms["no_subscribers"] = text
                    self._publish_status_locked()
                    log.error("ALARM no_subscribers: %s (reject %s)", text, track.event_id)
                return
            if not failed and "no_subscribers" in self._alarms:
                del self._alarms["no_subscribers"]
                self._publish_status_locked()
                log.warning("alarm no_subscribers cleared: a reject was delivered")
            if failed:
                self._counts["refused"] += 1
                log.warning(
                    "broker %s refused reject %s: %s; it stays spooled and is retried",
                    self.address,
                    track.event_id,
                    reason_code,
                )
            elif track.ambiguous:
                log.debug("ambiguous ack for %s; it will be sent again", track.event_id)
            elif track.event_id in self._storing:
                self._acked_while_storing.add(track.event_id)  # publish_reject removes it
            else:
                acked.append(track.event_id)

    def _handle_connect(self, reason_code: Any, session_present: bool) -> None:
        with self._lock:
            self._connack_seen = True  # the disconnect that follows a refusal is no extra failure
        if reason_code.is_failure:
            with self._lock:
                self._counts["connect_refusals"] += 1
            self._log_failed_attempt(
                "MQTT broker %s refused the connection: %s", self.address, reason_code
            )
            return
        self._failed_attempts = 0
        with self._lock:
            if self._has_connected:
                self._counts["reconnects"] += 1
            self._has_connected = True
            self._connected = True
            self._first_connect_handled.set()
            self._publish_locked(
                self.topics["status"],
                self._status_payload("online"),
                qos=1,
                retain=self.retain_status,
            )
            self._resend_cursor = 0
            self._next_retry = time.monotonic() + self.retry_interval_s
            pending = len(self.spool)
        log.info(
            "connected to MQTT broker %s as %s (session present: %s, %d reject event(s) spooled)",
            self.address,
            self.client_id,
            session_present,
            pending,
        )

    def _log_failed_attempt(self, msg: str, *args: Any) -> None:
        """Warn on the 1st, 10th, 100th... failed attempt in a row, debug otherwise: paho retries
        every reconnect_max_s for as long as the outage lasts, and the log must stay readable."""
        self._failed_attempts += 1
        n = self._failed_attempts
        if n == 1 or math.log10(n).is_integer():
            suffix = "" if n == 1 else f" ({n} attempts in a row)"
            log.warning(
                msg + "%s; retrying every <= %g s, rejects are spooled meanwhile",
                *args,
                suffix,
                self.cfg.reconnect_max_s,
            )
        else:
            log.debug(msg, *args)

    def _handle_disconnect(self, reason_code: Any, socket_error: str | None) -> None:
        with self._lock:
            was = self._connected
            self._connected = False
            self._resend_cursor = None
            if was:
                self._counts["disconnects"] += 1
            elif not self._connack_seen:  # the attempt died before any CONNACK
                self._counts["connect_failures"] += 1
            connack_seen, self._connack_seen = self._connack_seen, False
            closing = self._closing
        why = f"{reason_code} ({socket_error})" if socket_error else str(reason_code)
        if closing:
            return
        if was:
            log.warning(
                "lost connection to MQTT broker %s: %s; reconnecting, rejects are spooled meanwhile",
                self.address,
                why,
            )
        elif not connack_seen:
            self._log_failed_attempt(
                "cannot connect to MQTT broker %s: connection closed before CONNACK: %s",
                self.address,
                socket_error or reason_code,
            )

    def _watch(self) -> None:
        """Periodic checks of the worker (every <= 0.25 s): the spool file is still ours; the
        broker still acknowledges what is in flight."""
        try:
            self._check_spool_file()
        except SpoolError as exc:
            self.raise_alarm("spool_write", f"spool file check failed: {exc}")
        with self._lock:
            # While disconnected the outage is what holds them (logged, and the gate sees the
            # last will); this alarm is for a connection that is up but silent.
            waiting = len(self._inflight) if self._connected else 0
            stale = time.monotonic() - self._last_ack if waiting else 0.0
        if waiting and stale >= ACK_ALARM_S:
            self.raise_alarm(
                "not_acknowledging",
                f"broker {self.address} has not acknowledged for {int(stale)}+ s "
                f"({waiting} reject(s) in flight, at most {self._max_inflight}; the rest wait "
                "in the spool)",
            )
        elif not waiting or stale < ACK_ALARM_S:
            self.clear_alarm("not_acknowledging")

    def _pump(self) -> None:
        """Re-send spooled events not held by paho, oldest first, at most resend_window in flight."""
        now = time.monotonic()
        with self._lock:
            if (
                self._connected
                and self._resend_cursor is None
                and now >= self._next_retry
                and len(self.spool) > len(self._inflight)
            ):
                self._resend_cursor = 0  # periodic pass: events refused or acked ambiguously
            if (
                self._connected
                and self._resend_cursor is None
                and self._held_back_pending
                and len(self._inflight) < self._max_inflight
            ):
                self._held_back_pending = False
                self._resend_cursor = 0  # rejects held back while the window was full
            if self._connected and now >= self._next_retry:
                self._next_retry = now + self.retry_interval_s
        while True:
            with self._lock:
                cursor = self._resend_cursor
                room = min(self.resend_window, self._max_inflight) - len(self._inflight)
                if not self._connected or cursor is None or room <= 0:
                    return
            rows = self.spool.pending(limit=min(room, 50), after_seq=cursor)
            with self._lock:
                if not self._connected or self._resend_cursor != cursor:
                    continue  # disconnected or a new pass started meanwhile
                if not rows:
                    self._resend_cursor = None
                    return
                for row in rows:
                    if row.event_id not in self._inflight:
                        self._publish_locked(row.topic, row.payload, row.qos, event_id=row.event_id)
                self._resend_cursor = rows[-1].seq
