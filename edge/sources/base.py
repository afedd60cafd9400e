"""What every source is: the Frame it hands out, EndOfStream, the Source contract, and the
shared base (pacing, counters, context manager)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edge.redact import redact_uri

log = logging.getLogger("edge.sources")


class EndOfStream(Exception):  # noqa: N818 - a signal, not an error
    """Raised by `Source.read()` when a non-looping source has no more frames."""


@dataclass
class Frame:
    """One captured frame.

    image: (H,W,3) uint8 BGR. seq: monotonic per source (gaps = frames dropped at the source).
    capture_time: epoch seconds (time.time()) when the frame was captured/read.
    part_id: part identifier (file stem for image folders, else str(seq)).
    source: file name for folders/videos, else the URI.
    t_mono: time.monotonic() at capture, for latency maths immune to wall-clock steps.
    error: set (and image empty) for a part whose image could not be decoded; only sources
        asked to keep such parts (`keep_unreadable`, a triggered line) hand them out, so that
        the part is rejected as unverified instead of vanishing.
    """

    image: np.ndarray
    seq: int
    capture_time: float
    part_id: str
    source: str
    t_mono: float = field(default_factory=time.monotonic)
    error: str | None = None


class Source(Protocol):
    uri: str

    def open(self) -> None: ...

    def read(self, timeout: float | None = None) -> Frame | None: ...

    def close(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class _Pacer:
    """Replay at `rate` frames/s (0 = unpaced). Never bursts to catch up after a slow consumer:
    a real camera does not buffer the frames nobody took."""

    def __init__(self, rate: float):
        self.period = 1.0 / rate if rate > 0 else 0.0
        self.due: float | None = None

    def wait(self, timeout: float | None) -> bool:
        """Sleep until the next frame is due; False (after sleeping `timeout`) if it is later."""
        if not self.period:
            return True
        now = time.monotonic()
        if self.due is None:
            self.due = now
        delay = self.due - now
        if delay > 0:
            if timeout is not None and delay > timeout:
                time.sleep(timeout)
                return False
            time.sleep(delay)
        self.due = max(self.due, now) + self.period
        return True


class _BaseSource:
    def __init__(
        self,
        uri: str,
        *,
        loop: bool = False,
        rate: float = 0.0,
        width: int = 0,
        height: int = 0,
        keep_unreadable: bool = False,
    ):
        self.uri = uri
        # What logs, errors and stats show: the URI without its credentials (rtsp://user:pw@).
        self.label = redact_uri(uri)
        # Triggered line: one frame is one part, so an undecodable one is handed out (with
        # Frame.error) to be rejected as unverified; a continuous line just skips it.
        self.keep_unreadable = keep_unreadable
        self.loop = loop
        self.rate = rate
        self.width = width
        self.height = height
        self._seq = 0
        self._stats: dict[str, Any] = {"frames": 0, "corrupt": 0, "loops": 0}
        self._pacer = _Pacer(rate)

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)

    def _frame(self, image: np.ndarray, part_id: str | None, name: str) -> Frame:
        f = Frame(image, self._seq, time.time(), part_id or str(self._seq), name)
        self._seq += 1
        self._stats["frames"] += 1
        return f

    def _unreadable(self, part_id: str | None, name: str, why: str) -> Frame:
        f = self._frame(np.zeros((0, 0, 3), np.uint8), part_id, name)
        f.error = f"{name}: {why}"
        return f

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()
