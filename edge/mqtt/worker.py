"""The publisher's worker-thread half: paho's callbacks (network thread) only enqueue what
happened; one worker of ours takes it off the queue and does the bookkeeping: PUBACKs against
the in-flight ledger (edge/mqtt/ledger.py), spool acks (one transaction per batch), releasing a
reject's caller when its PUBACK beats the spool writer (edge/mqtt/spoolwriter.py), connects and
disconnects, the periodic checks (the spool file is still ours, the broker still acknowledges),
and the re-send passes over the spool (edge/mqtt/spoolsync.py).

`Worker` is a base of edge.mqtt.publisher.Publisher and works on its state, under its lock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from edge.mqtt import ledger as L
from edge.mqtt.connection import describe_error
from edge.spool import SpoolError

log = logging.getLogger("lineinspect.mqtt")

ACK_ALARM_S = 5.0  # the oldest unacknowledged reject this old: "broker not acknowledging"


class Worker:
    _lock: threading.Lock
    _error_lock: threading.Lock
    _events: queue.SimpleQueue

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
            t_ack = time.monotonic()
            self._release_on_puback(mid, reason_code)  # edge/mqtt/spoolwriter.py
            self._events.put(("ack", mid, reason_code, t_ack))
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
                    self._attempts.failed_attempt(
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
            outcome, track = self._ledger.acked(mid, reason_code, t_ack)
            if track is None:
                return
            if track.window is not None and outcome != L.REFUSED:
                self.ack_latency.add(track.window, t_ack - track.t_capture)
            if track.event_id is None:
                if outcome == L.REFUSED:
                    self._counts["refused"] += 1
                    log.warning("broker refused a status/result message: %s", reason_code)
                return
            if outcome == L.NO_SUBSCRIBERS_ACK:
                # The broker took it but nobody will get it: not delivered. Keep it, retry soon.
                self._counts["no_subscribers"] += 1
                self._resend.no_subscribers(time.monotonic())
                text = f"no subscriber on {self.topics['reject']}: rejects kept in the spool"
                if self._alarms.raise_("no_subscribers", text):
                    self._publish_status_locked()
                    log.error("ALARM no_subscribers: %s (reject %s)", text, track.event_id)
                return
            if outcome != L.REFUSED and self._alarms.clear("no_subscribers"):
                self._publish_status_locked()
                log.warning("alarm no_subscribers cleared: a reject was delivered")
            if outcome == L.REFUSED:
                self._counts["refused"] += 1
                log.warning(
                    "broker %s refused reject %s: %s; it stays spooled and is retried",
                    self.address,
                    track.event_id,
                    reason_code,
                )
            elif outcome == L.AMBIGUOUS:
                log.debug("ambiguous ack for %s; it will be sent again", track.event_id)
            elif outcome == L.ACKED:
                acked.append(track.event_id)
            else:  # ACKED_STORING: the spool writer settles it; its caller need not wait
                self._release_acked(track.event_id)

    def _handle_connect(self, reason_code: Any, session_present: bool) -> None:
        with self._lock:
            self._connack_seen = True  # the disconnect that follows a refusal is no extra failure
        if reason_code.is_failure:
            with self._lock:
                self._counts["connect_refusals"] += 1
            self._attempts.failed_attempt(
                "MQTT broker %s refused the connection: %s", self.address, reason_code
            )
            return
        self._attempts.succeeded()
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
            self._resend.connected(time.monotonic())
            pending = len(self.spool)
        log.info(
            "connected to MQTT broker %s as %s (session present: %s, %d reject event(s) spooled)",
            self.address,
            self.client_id,
            session_present,
            pending,
        )

    def _handle_disconnect(self, reason_code: Any, socket_error: str | None) -> None:
        with self._lock:
            was = self._connected
            self._connected = False
            self._resend.disconnected()
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
            self._attempts.failed_attempt(
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
            waiting = len(self._ledger) if self._connected else 0
            stale = time.monotonic() - self._ledger.last_ack if waiting else 0.0
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
        """Re-send spooled events not held by paho, oldest first, a window at a time
        (edge/mqtt/spoolsync.py says when a pass starts)."""
        with self._lock:
            self._resend.schedule(
                time.monotonic(), self._connected, len(self.spool), len(self._ledger)
            )
        while True:
            with self._lock:
                cursor = self._resend.cursor
                room = self._resend.room(len(self._ledger))
                if not self._connected or cursor is None or room <= 0:
                    return
            rows = self.spool.pending(limit=min(room, 50), after_seq=cursor)
            with self._lock:
                if not self._connected or self._resend.cursor != cursor:
                    continue  # disconnected or a new pass started meanwhile
                if not rows:
                    self._resend.cursor = None
                    return
                for row in rows:
                    if row.event_id not in self._ledger:
                        self._publish_locked(row.topic, row.payload, row.qos, event_id=row.event_id)
                self._resend.cursor = rows[-1].seq
