"""One loaded model and the thread that feeds it, shared by the stations on the same bundle.

When the graph takes a batch, frames waiting from different stations go through in one
inference (opportunistic: the engine never waits for a batch to fill, so batching adds no
latency). The engine thread does nothing but feed the backend; a failed inference marks its
parts unverified, and FATAL_INFER_FAILURES in a row give the backend up (the run drains).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from edge.errors import BackendError, LineInspectError
from edge.runtime.inbox import POLL_S, Control, Inbox, Item

if TYPE_CHECKING:
    from edge.ports import Backend
    from edge.runtime.station import Station

log = logging.getLogger("edge.pipeline")

# A wedged accelerator fails every call: after this many failed inferences in a row the run
# stops (and systemd restarts it) instead of rejecting every part as unverified forever.
FATAL_INFER_FAILURES = 10


def warmup(backend: Backend) -> None:
    """One inference on zeros: engines allocate and tune on the first call, not on a part."""
    b, c, h, w = backend.input_shape
    t = time.monotonic()
    try:
        backend.infer(np.zeros((max(b, 1), c, h, w), np.uint8))
    except LineInspectError:
        raise
    except Exception as exc:
        raise BackendError(f"{backend.name}: warm-up inference failed: {exc}") from exc
    log.debug("warm-up inference %.1f ms", (time.monotonic() - t) * 1000)


class Engine:
    """One loaded model and the thread that feeds it, for one or more stations.

    max_batch: most frames per inference for a dynamic-batch graph (0 = one per station
    attached). A fixed-batch graph always takes input_shape[0] frames: a partial batch is
    padded with zeros (the padding's outputs are discarded).
    """

    def __init__(self, backend: Backend, max_batch: int = 0, name: str = "infer"):
        self.backend = backend
        self.name = name
        self.dynamic = bool(getattr(backend, "dynamic_batch", False))
        self.fixed_batch = None if self.dynamic else int(backend.input_shape[0])
        self._max_batch_cfg = max_batch
        self.inbox = Inbox()
        self.stations: list[Station] = []
        self.thread: threading.Thread | None = None
        self.batches = 0
        self.batched_frames = 0
        self.failed_in_a_row = 0
        self.broken: str | None = None  # set once the backend is given up: no more inference

    @property
    def max_batch(self) -> int:
        if self.fixed_batch is not None:
            return self.fixed_batch
        return max(1, self._max_batch_cfg or len(self.stations))

    def attach(self, station: Station) -> None:
        station.engine = self
        station.key = self.inbox.add(station.queue_size)
        self.stations.append(station)

    def loop(self, ctl: Control) -> None:
        b, c, h, w = self.backend.input_shape
        while not ctl.abort.is_set():
            items = self.inbox.get_batch(self.max_batch, POLL_S)
            if items is None:
                break  # every station's capture ended and everything was inferred
            if not items:
                continue
            live = [it for it in items if it.cause is None]
            if self.broken is not None:
                for it in live:
                    it.cause = self.broken
                live = []
            if live:
                self._infer(live, (c, h, w), ctl)
            # Every item goes on, in order: the unverified ones are rejected by the post thread.
            for it in items:
                it.x = None  # the input is no longer needed: free it early
                # Never drop after inference: the work is done, post-processing is cheap.
                if not it.station.put_out(it, ctl):
                    return

    def _infer(self, items: list[Item], chw: tuple[int, int, int], ctl: Control) -> None:
        """Infer one batch; on failure mark its items unverified (and give up after a run)."""
        n = len(items)
        if n == 1 and self.fixed_batch in (None, 1):
            x = items[0].x[None]
        else:
            x = np.zeros((max(n, self.fixed_batch or 0), *chw), np.uint8)
            for i, it in enumerate(items):
                x[i] = it.x
        t0 = time.monotonic()
        try:
            maps, scores = self.backend.infer(x)
        except Exception as exc:
            self.failed_in_a_row += 1
            cause = f"inference failed: {' '.join(str(exc).split())[:300]}"
            for it in items:
                it.cause = cause
                it.station.count_error("infer", exc, f"frame {it.frame.seq}")
            if self.failed_in_a_row >= FATAL_INFER_FAILURES:
                err = exc
                if not isinstance(exc, LineInspectError):
                    err = BackendError(f"{self.backend.name}: inference failed: {exc}")
                    err.__cause__ = exc
                log.error(
                    "fatal: %d inferences in a row failed (last on frame %d of %s): %s; "
                    "stopping capture, what was captured is rejected as unverified",
                    self.failed_in_a_row,
                    items[0].frame.seq,
                    items[0].station.name,
                    exc,
                )
                self.broken = f"backend given up after {self.failed_in_a_row} failures: {cause}"
                ctl.fail(err, drain=True)
            return
        self.failed_in_a_row = 0
        t1 = time.monotonic()
        # A backend may hand out views of buffers it reuses (pinned host memory): copy the
        # (small) maps before the next inference can overwrite them.
        maps = np.array(maps[:n], dtype=np.float32, copy=True)
        scores = np.asarray(scores[:n], dtype=np.float32)
        self.batches += 1
        self.batched_frames += n
        for i, it in enumerate(items):
            it.t_inf0, it.t_inf, it.batch = t0, t1, n
            it.amap, it.score = maps[i], float(scores[i])
