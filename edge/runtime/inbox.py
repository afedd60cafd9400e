"""What travels between the station's threads and the engine: the item, the run's flags, the inbox.

`Item` is one captured frame on its way to a decision (input, stage stamps, model outputs, or
the cause that denies it a verdict). `Control` holds the flags every thread of a run watches.
`Inbox` is the bounded per-station FIFO in front of one engine.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from edge.sources import Frame

POLL_S = 0.1  # how often blocked threads look at the stop/abort flags


@dataclass
class Item:
    frame: Frame
    station: Any  # edge.runtime.station.Station
    x: np.ndarray | None = None  # (3,H,W) uint8 RGB model input
    t_pre: float = 0.0
    t_inf0: float = 0.0
    t_inf: float = 0.0
    t_post0: float = 0.0
    amap: np.ndarray | None = None  # (1,H,W) float32
    score: float = 0.0
    batch: int = 1
    cause: str | None = None  # set when the part cannot get a real verdict (edge.verdict)


class Control:
    """Flags shared by every thread of a run."""

    def __init__(self) -> None:
        self.stop = threading.Event()  # stop capturing; drain what was captured
        self.abort = threading.Event()  # stop everything now (fatal error)
        self.fatal: BaseException | None = None

    def fail(self, exc: BaseException, drain: bool = False) -> None:
        """Record a fatal error; stop capture, and unless `drain`, stop inference too."""
        if self.fatal is None:
            self.fatal = exc
        if not drain:
            self.abort.set()
        self.stop.set()


class Inbox:
    """Bounded FIFO per station in front of one engine; the engine takes round-robin batches.

    One condition variable for all: a producer blocks only on its own full queue (triggered
    back-pressure), or drops its own oldest (continuous); the consumer wakes on any put.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._q: list[deque[Item]] = []
        self._cap: list[int] = []
        self._open: set[int] = set()
        self._rr = 0

    def add(self, capacity: int) -> int:
        with self._cv:
            self._q.append(deque())
            self._cap.append(max(1, capacity))
            key = len(self._q) - 1
            self._open.add(key)
            return key

    def put(
        self, key: int, item: Item, drop_oldest: bool, abort: threading.Event
    ) -> tuple[bool, int]:
        """(put?, frames dropped to make room). False only when aborting."""
        with self._cv:
            q, cap = self._q[key], self._cap[key]
            dropped = 0
            if drop_oldest:
                while len(q) >= cap:
                    q.popleft()
                    dropped += 1
            else:
                while len(q) >= cap:
                    if abort.is_set():
                        return False, 0
                    self._cv.wait(POLL_S)
            q.append(item)
            self._cv.notify_all()
            return True, dropped

    def close(self, key: int) -> None:
        """The producer `key` will put no more."""
        with self._cv:
            self._open.discard(key)
            self._cv.notify_all()

    def get_batch(self, n: int, timeout: float) -> list[Item] | None:
        """Up to n items, round-robin over stations; [] on timeout; None once all closed + empty."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while not any(self._q):
                if not self._open:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cv.wait(left)
            out: list[Item] = []
            k = len(self._q)
            start = self._rr % k
            self._rr += 1
            while len(out) < n and any(self._q):
                for i in range(k):
                    q = self._q[(start + i) % k]
                    if q and len(out) < n:
                        out.append(q.popleft())
            self._cv.notify_all()  # room for blocked producers
            return out

    def qsize(self, key: int) -> int:
        return len(self._q[key])
