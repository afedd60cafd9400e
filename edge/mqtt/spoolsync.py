"""Keeping the broker in step with the spool: when to re-send what the spool holds and paho does
not, and from where.

A pass walks the spool oldest first, a window at a time, skipping what is in flight (paho
re-sends those itself after a reconnect, so a reconnect does not double-send). Passes start:
after every (re)connect; periodically (events refused, or acknowledged ambiguously); soon after
a "no matching subscribers" PUBACK (a gate may subscribe any moment); and as soon as the
in-flight window has room after rejects were held back.

Not locked itself: the publisher holds its lock around every call.
"""

from __future__ import annotations

NO_SUBSCRIBER_RETRY_S = 2.0  # re-send pass after such a PUBACK (a gate may subscribe soon)


class Resender:
    def __init__(self, window: int, retry_interval_s: float, max_inflight: int) -> None:
        self.window = window
        self.retry_interval_s = retry_interval_s
        self.max_inflight = max_inflight
        self.cursor: int | None = None  # spool seq of the running pass; None: no pass
        self.next_retry = 0.0
        # A reject was held back (in-flight window full) and stored: a pass starts as soon as
        # the window has room, not only at the next periodic retry.
        self.held_back_pending = False

    def connected(self, now: float) -> None:
        self.cursor = 0
        self.next_retry = now + self.retry_interval_s

    def disconnected(self) -> None:
        self.cursor = None

    def no_subscribers(self, now: float) -> None:
        self.next_retry = min(self.next_retry, now + NO_SUBSCRIBER_RETRY_S)

    def held_back(self) -> None:
        self.held_back_pending = True

    def schedule(self, now: float, connected: bool, spooled: int, inflight: int) -> None:
        """Start a pass when one is due."""
        if not connected:
            return
        if self.cursor is None and now >= self.next_retry and spooled > inflight:
            self.cursor = 0  # periodic pass: events refused or acked ambiguously
        if self.cursor is None and self.held_back_pending and inflight < self.max_inflight:
            self.held_back_pending = False
            self.cursor = 0  # rejects held back while the window was full
        if now >= self.next_retry:
            self.next_retry = now + self.retry_interval_s

    def room(self, inflight: int) -> int:
        """How many more events the running pass may put in flight now."""
        return min(self.window, self.max_inflight) - inflight
