"""The in-flight ledger: every QoS 1 publish waiting for its PUBACK, and what its ack means.

Not locked itself: the publisher holds its one lock around `client.publish` and every call
here, so a message id is recorded before its PUBACK can be handled.

A PUBACK settles one of:
    OTHER           a status or result message (refused ones are counted)
    ACKED           a reject the broker took: remove it from the spool
    ACKED_STORING   the same, but the spool writer has not stored it yet: it removes it right
                    after the write
    NO_SUBSCRIBERS  MQTT 5 reason 16: nobody got it; it stays spooled and is retried soon
    REFUSED         the broker refused it: it stays spooled and is retried
    AMBIGUOUS       a QoS 0 message reused its id (16-bit wrap): not trusted, sent again
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

NO_SUBSCRIBERS = 16  # MQTT 5 PUBACK reason code "No matching subscribers"

OTHER, ACKED, ACKED_STORING, NO_SUBSCRIBERS_ACK, REFUSED, AMBIGUOUS = (
    "other",
    "acked",
    "acked_storing",
    "no_subscribers",
    "refused",
    "ambiguous",
)


class Track:
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


class Ledger:
    """Message ids in flight, reject events held by paho until acked, and rejects sent but not
    yet in the spool (publish_reject sends before the spool writer syncs)."""

    def __init__(self) -> None:
        self._mids: dict[int, deque[Track]] = {}
        self._inflight: dict[str, Track] = {}  # event_id -> track, held by paho until acked
        self._storing: set[str] = set()
        self._acked_while_storing: set[str] = set()
        self.last_ack = time.monotonic()

    def __len__(self) -> int:
        """Reject events in flight."""
        return len(self._inflight)

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._inflight

    def sent(
        self, mid: int, qos: int, event_id: str | None, window: str | None, t_capture: float | None
    ) -> bool:
        """Record a publish; True when it is a reject now in flight."""
        if qos == 0:
            # A QoS 0 message with the mid of a QoS 1 one still in flight (the 16-bit mid
            # wrapped): its on_publish is indistinguishable from the PUBACK, so neither can ack.
            for track in self._mids.get(mid, ()):
                track.ambiguous = True
            return False
        track = Track(event_id, window if t_capture is not None else None, t_capture)
        self._mids.setdefault(mid, deque()).append(track)
        if event_id is None:
            return False
        if not self._inflight:  # the ack clock starts with the first one in flight
            self.last_ack = time.monotonic()
        self._inflight[event_id] = track
        return True

    def acked(self, mid: int, reason_code: Any, t_ack: float) -> tuple[str, Track | None]:
        """Settle the PUBACK (or QoS 0 on_publish) of `mid`: (outcome, its track)."""
        tracks = self._mids.get(mid)
        if not tracks:
            return OTHER, None  # a QoS 0 message, or one sent before a restart of the client
        track = tracks.popleft()
        if not tracks:
            del self._mids[mid]
        failed = reason_code is not None and reason_code.is_failure
        if track.event_id is None:
            return (REFUSED if failed else OTHER), track
        self._inflight.pop(track.event_id, None)
        self.last_ack = t_ack
        if reason_code is not None and getattr(reason_code, "value", 0) == NO_SUBSCRIBERS:
            return NO_SUBSCRIBERS_ACK, track
        if failed:
            return REFUSED, track
        if track.ambiguous:
            return AMBIGUOUS, track
        if track.event_id in self._storing:
            self._acked_while_storing.add(track.event_id)  # the spool writer settles it
            return ACKED_STORING, track
        return ACKED, track

    def storing(self, event_id: str) -> None:
        self._storing.add(event_id)

    def stored(self, event_id: str) -> bool:
        """The spool writer is done with `event_id`: True when its PUBACK came meanwhile."""
        self._storing.discard(event_id)
        early = event_id in self._acked_while_storing
        self._acked_while_storing.discard(event_id)
        return early

    def clear(self) -> None:
        """The client is gone: nothing it held is in flight any more."""
        self._mids.clear()
        self._inflight.clear()
