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

import logging
import os
import queue
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from edge import __version__
from edge.config import MqttConfig, default_client_id
from edge.errors import BrokerError
from edge.metrics import LatencyWindows
from edge.mqtt.alarms import Alarms, StatusAndAlarms
from edge.mqtt.connection import (
    PASSWORD_ENV,
    AttemptLog,
    DiagnosingClient,
    connect_async,
    describe_error,
    encode_event,
    new_client,
)
from edge.mqtt.ledger import Ledger
from edge.mqtt.spoolsync import Resender
from edge.mqtt.spoolwriter import SpoolWriter, Write
from edge.mqtt.worker import Worker
from edge.spool import Spool

log = logging.getLogger("lineinspect.mqtt")

# Latency windows the publisher fills from its PUBACKs: capture -> broker acknowledgement.
ACK_WINDOWS = ("reject_acked", "result_acked")
COUNTS = (
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
)


class Publisher(Worker, SpoolWriter, StatusAndAlarms):
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
        self.client_id = cfg.client_id or default_client_id(*parts[-2:])
        self.address = f"{cfg.host}:{cfg.port}"
        self.session_expiry_s = session_expiry_s
        # False for a probe (`edge check`): its status must not linger as a retained message.
        self.retain_status = retain_status
        self.spool = Spool(cfg.spool, cfg.spool_max_events)

        self._lock = threading.Lock()  # client.publish + the ledger, alarms, resender, counts
        self._error_lock = threading.Lock()
        self._max_inflight = getattr(cfg, "max_inflight", 100)
        self._ledger = Ledger()
        self._alarms = Alarms()
        self._resend = Resender(resend_window, retry_interval_s, self._max_inflight)
        self.ack_latency = LatencyWindows(ACK_WINDOWS)  # capture -> PUBACK, per event kind
        self._connected = False
        self.bd_seq: int | None = None  # set at start(): this process's birth/death sequence
        self._seq = 0  # last reject seq handed out
        self._counts = dict.fromkeys(COUNTS, 0)
        self._attempts = AttemptLog(cfg.reconnect_max_s)
        self._events: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._init_writer()
        self._client: DiagnosingClient | None = None
        self._worker: threading.Thread | None = None
        self._first_connack = threading.Event()
        self._first_connect_handled = threading.Event()  # the worker has set _connected
        self._first_connack_rc: Any = None
        self._has_connected = False
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
                self._alarms.raise_("spool_recovered", self.spool.recovered)
        password = cfg.password if cfg.password is not None else os.environ.get(PASSWORD_ENV)
        try:
            client = new_client(
                self.client_id,
                protocol=cfg.protocol,
                persistent=True,
                username=cfg.username,
                password=password,
                tls=cfg.tls,
                reconnect_max_s=cfg.reconnect_max_s,
            )
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise self._start_error(f"TLS setup failed: {describe_error(exc)}", t0) from exc
        client.will_set(
            self.topics["status"],
            self._status_payload("offline", reason="connection lost (last will)"),
            qos=1,
            retain=self.retain_status,
        )
        client.connect_timeout = max(0.5, min(5.0, cfg.connect_timeout_s))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_connect_fail = self._on_connect_fail
        try:
            connect_async(
                client,
                cfg.host,
                cfg.port,
                cfg.keepalive,
                protocol=cfg.protocol,
                persistent=True,
                session_expiry_s=self.session_expiry_s,
            )
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
        self._stop_writer()
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
            self._ledger.clear()
            self._resend.disconnected()

    def __enter__(self) -> Publisher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- publishing ------------------------------------------------------------------------------

    def publish_reject(self, event: dict, t_capture: float | None = None) -> None:
        """Publish one reject event at once and spool it durably; returns when it is on disk or
        the broker has acknowledged it, whichever comes first (edge/mqtt/spoolwriter.py).

        The event goes to the broker before the spool's fsync, and a PUBACK that beats the
        fsync releases the caller: the disk sync is not on the way to the reject gate, and the
        event survives a crash either way. A PUBACK during the sync removes it right after.

        Args:
            event: the reject event (must have event_id).
            t_capture: monotonic capture time of the part: its PUBACK then feeds the
                `reject_acked` latency window (capture -> broker acknowledgement).

        Raises SpoolFullError when the spool is full and SpoolError when it cannot be written,
        and the broker has not acknowledged the event: it was NOT stored (it may still reach a
        connected broker); the caller must count it. The alarm is already raised.
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
            held = len(self._ledger) >= self._max_inflight
            info = None
            if held:
                self._counts["held_back"] += 1  # the spool keeps it; the pump sends it later
            elif self._connected and event_id not in self._ledger:
                self._ledger.storing(event_id)
                info = self._publish_locked(
                    topic, payload, 1, event_id=event_id, window="reject_acked", t_capture=t_capture
                )
            write = Write(topic, payload, event_id, info is not None, held)
            self._store(write, None if info is None else info.mid)
        self._wait_stored(write)

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
        """Wait until every spooled event is acknowledged (and the spool writer has settled
        every reject handed to it). False on timeout."""
        deadline = time.monotonic() + timeout_s
        while len(self.spool) or self._writes:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def stats(self) -> dict:
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
            out["inflight"] = len(self._ledger)
            out["connected"] = self._connected
            out["alarm"] = self._alarms.text()
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
        `window`, `t_capture`: see ledger.Track (ignored for QoS 0, which has no acknowledgement).

        Returns None when paho refused the message (counted and logged; a spooled event stays
        in the spool and goes out with the next re-send pass).
        """
        client = self._client
        if client is None:
            return None
        what = f"reject {event_id} (kept in the spool)" if event_id else f"on {topic}"
        self._n_published += 1
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
        if self._ledger.sent(info.mid, qos, event_id, window, t_capture):
            self._counts["published"] += 1
        return info
