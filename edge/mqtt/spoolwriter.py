"""The reject's way to disk: one writer thread group-commits the spool.

`publish_reject` sends the event to the broker, hands it to the writer and waits until the
event is on disk OR the broker has acknowledged it, whichever comes first. The fsync is then
off the decision path whenever the broker answers faster than the disk (a loopback or LAN
PUBACK takes about a millisecond; an fsync 1 to 20 ms, longer on a busy SD card or eMMC), and
the guarantee is the same: once the call returns, the reject survives a crash, either in the
spool or at the broker.

Group commit: the writer takes every reject waiting when it wakes and stores them in one
transaction, one fsync for all (several stations on one publisher, or a burst queued behind a
slow sync). An event the broker acknowledged before or while it was written is removed right
after (edge/mqtt/ledger.py).

A failed write is counted (`spool_errors`, `spool_full`, per event) and alarmed here, on the
writer thread, because the caller may already be gone (its reject acknowledged: delivered, not
lost). The caller raises the error only when the broker has not acknowledged the event: then
the reject is neither stored nor delivered, and the station counts it as a publish error.

`SpoolWriter` is a base of edge.mqtt.publisher.Publisher and works on its state, under its lock.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from edge.spool import SpoolError

log = logging.getLogger("lineinspect.mqtt")

_STOP = None  # queued by _stop_writer: the thread ends after what was queued before it


class Write:
    """One reject waiting for the spool (or for its PUBACK)."""

    __slots__ = (
        "topic",
        "payload",
        "event_id",
        "sent",
        "held",
        "done",
        "acked",
        "error",
        "mid",
        "n_at",
    )

    def __init__(self, topic: str, payload: bytes, event_id: str, sent: bool, held: bool) -> None:
        self.topic, self.payload, self.event_id = topic, payload, event_id
        self.sent = sent  # on the wire before the write (a connected broker has it, or will)
        self.held = held  # not sent: the in-flight window was full
        self.done = threading.Event()  # stored, acknowledged, or failed
        self.acked = False  # the broker acknowledged it: no need to wait for the disk
        self.error: BaseException | None = None
        self.mid: int | None = None  # its MQTT message id, when sent
        self.n_at = 0  # the publisher's publish count when it was sent


# Message ids are 16 bits and shared with QoS 0 messages: after this many publishes since a
# reject's, its id may be reused, and only the worker's ledger can tell the acks apart.
_MID_SAFE = 60000


class SpoolWriter:
    _lock: threading.Lock

    def _init_writer(self) -> None:
        self._writes: dict[str, Write] = {}  # event_id -> its write, until it is settled
        self._write_queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._by_mid: dict[int, Write] = {}  # sent rejects whose caller a PUBACK may release
        self._n_published = 0  # every publish (any QoS), counted under the lock

    def _store(self, w: Write, mid: int | None) -> None:
        """Hand w to the writer (self._lock held by the caller) and register it, so that its
        PUBACK can release the caller before the disk does. mid: its message id, when sent."""
        self._writes[w.event_id] = w
        if mid is not None:
            w.mid, w.n_at = mid, self._n_published
            self._by_mid[mid] = w
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_loop, name="lineinspect-spool", daemon=True
            )
            self._writer.start()
        self._write_queue.put(w)

    def _wait_stored(self, w: Write) -> None:
        """Until w is on disk or acknowledged. Raises its write error when it is neither."""
        w.done.wait()
        if w.error is not None and not w.acked:
            raise w.error

    def _release_on_puback(self, mid: int, reason_code: Any) -> None:
        """Paho's network thread, on a PUBACK: release the reject's caller at once, one thread
        hop instead of two (the worker does the bookkeeping after). Only a plain success, and
        only while its message id cannot have been reused; anything else waits for the worker.
        No self._lock here (paho holds its own locks): dict reads and pops are atomic."""
        w = self._by_mid.get(mid)
        if w is None or self._n_published - w.n_at >= _MID_SAFE:
            return
        if reason_code is not None and (reason_code.is_failure or reason_code.value != 0):
            return  # refused, or "no matching subscribers": not delivered
        w.acked = True
        w.done.set()

    def _release_acked(self, event_id: str) -> None:
        """The broker acknowledged event_id (self._lock held): its caller need not wait."""
        w = self._writes.get(event_id)
        if w is not None:
            w.acked = True
            w.done.set()

    def _stop_writer(self) -> None:
        """End the writer thread after the writes already queued (close)."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            self._write_queue.put(_STOP)
            writer.join()

    def _write_loop(self) -> None:
        while True:
            batch = [self._write_queue.get()]
            while True:
                try:
                    batch.append(self._write_queue.get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in batch
            writes = [w for w in batch if w is not _STOP]
            try:
                self._write_batch(writes)
            except Exception as exc:  # a bug here must not leave a station waiting forever
                log.exception("spool writer failed")
                for w in writes:
                    if not w.done.is_set():
                        w.error = SpoolError(f"spool writer failed: {exc}")
                        w.done.set()
            if stop:
                return

    def _write_batch(self, todo: list[Write]) -> None:
        """Store the writes in one transaction, then settle each.

        Every reject is written, even one acknowledged already: the write is what tells
        whether the spool works (a spool_write alarm clears only on a good write)."""
        if not todo:
            return
        error: SpoolError | None = None
        full: list[str] = []
        try:
            self._check_spool_file()
            full = self.spool.put_many([(w.topic, w.payload, w.event_id, 1) for w in todo])
        except SpoolError as exc:
            error = exc
        full_set = set(full)
        with self._lock:
            early = []  # acknowledged while being written: remove them now
            for w in todo:
                self._writes.pop(w.event_id, None)
                if w.mid is not None and self._by_mid.get(w.mid) is w:
                    del self._by_mid[w.mid]
                if self._ledger.stored(w.event_id):
                    early.append(w.event_id)
                if error is not None:
                    w.error = error
                elif w.event_id in full_set:
                    w.error = self.spool.full_error(w.event_id)
            if error is not None:
                self._counts["spool_errors"] += len(todo)
            if full:
                self._counts["spool_full"] += len(full)
                self._set_alarm_locked(100)
            if any(w.held for w in todo):
                self._resend.held_back()  # stored: the pump sends them when the window has room
        if error is not None:
            self._alarm_write_failed(error, todo)
        elif len(full) < len(todo):
            self.clear_alarm("spool_write")
        if early and error is None:
            self._ack_spooled(early)
        elif early:  # the broker has them and the spool never did: nothing to remove
            with self._lock:
                self._counts["acked"] += len(early)
        elif error is None and not full:
            with self._lock:
                self._update_alarm_locked()
        for w in todo:
            w.done.set()

    def _alarm_write_failed(self, error: SpoolError, todo: list[Write]) -> None:
        # Loud at once: a retained alarm on status (the rejects themselves went to a connected
        # broker before the write, when there was one).
        sent = sum(w.sent for w in todo)
        what = f"reject {todo[0].event_id}" + (
            f" and {len(todo) - 1} more" if len(todo) > 1 else ""
        )
        if sent == len(todo):
            fate = "sent but not stored"
        elif sent == 0:
            fate = "NOT stored, not sent"
        else:
            fate = f"not stored, {sent} of them sent"
        self.raise_alarm(
            "spool_write",
            f"spool write failed ({' '.join(str(error).split())[:200]}); {what} {fate}",
        )
