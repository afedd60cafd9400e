"""The station pipeline: camera -> decision -> MQTT, as concurrent stages with small queues.

    capture + preprocess --inbox--> infer (shared) --q_out--> postprocess + publish (+ evidence)
       (one per station)            (one per model)            (one per station)

A `Station` is one camera: its source, post-processor, thresholds, publisher and evidence. An
`Engine` is one loaded model with its own thread; several stations may share it, and when the
graph takes a batch, frames waiting from different stations go through in one inference
(opportunistic: the engine never waits for a batch to fill, so batching adds no latency).

Decode and resize run on the capture thread, post-processing and publishing on the post
thread, so the engine thread does nothing but feed the backend: the pipeline's own work overlaps
with inference instead of adding to it.

Queues are small and bounded. `triggered` mode (one frame per part) never drops: a full inbox
blocks capture (back-pressure up to the source). `continuous` mode drops the OLDEST frame
waiting for the engine, and counts it; latency then stays bounded. After inference nothing is
dropped. Every frame carries its stage timestamps (capture, preprocessed, inference start/end,
post start, decided, published); they feed the latency windows and each event's `stages_ms`.

No verdict means reject (edge/verdict.py): a frame that cannot be decoded (triggered mode) or
preprocessed, a failed inference, a non-finite model output or a failed post-processing gives
the part an `unverified` reject with the cause, published like any other reject and counted
(`unverified`); `on_error: pass` (explicit, warned at start) lets such parts through instead.

Shutdown: `stop()` (a signal handler, another thread, end of a file, max_frames) stops capture
only. On a triggered line the frames a live camera had already buffered are still taken. Every
captured frame then goes through inference and publishing, evidence is written, publishers are
flushed (the spool waits for the broker's acknowledgements) and closed. A backend failure is
fatal after FATAL_INFER_FAILURES failed inferences in a row: capture stops, every frame already
captured still gets a verdict (inferred ones their own, the rest `unverified`), and `run()`
re-raises it.

Memory stays flat: bounded queues, bounded deques, counters, and disk quotas for evidence.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

import edge
from edge.backends import load_backend
from edge.bundle import Bundle
from edge.errors import BackendError, ConfigError, LineInspectError, SourceError
from edge.liveness import Liveness, sd_notify
from edge.metrics import LatencyWindows, quantiles
from edge.postprocess import Decision, PostProcessor, effective_min_area
from edge.postprocess import from_bundle as postprocessor_from_bundle
from edge.preprocess import to_input
from edge.reload import ThresholdsWatcher, validate_thresholds
from edge.sources import EndOfStream, Frame, open_source
from edge.verdict import ON_ERROR, unverified

log = logging.getLogger(__name__)

# Latency windows, from the monotonic stamps each frame carries:
#   preprocess  capture -> preprocessed (resize/crop/RGB on the capture thread)
#   wait        preprocessed -> inference start (queueing for the backend)
#   infer       inference start -> end (the whole batch's inference)
#   handoff     inference end -> post thread takes it
#   postprocess threshold, regions, decision (the 2 ms budget), wall clock
#   postprocess_cpu  the same, in CPU time of the post thread: the algorithm's cost without the
#               waits for a core that a loaded machine adds to the wall clock
#   publish     decided -> handed to the publisher (reject: sent, then synced to the spool)
#   decision    capture -> decided (what latency_ms in an event reports)
#   total       capture -> published
# and, from the publisher's PUBACKs (edge.mqtt.ACK_WINDOWS), the end-to-end latencies:
#   reject_acked  capture -> the broker acknowledged the reject event
#   result_acked  capture -> the broker acknowledged the result event (mqtt.result_qos: 1)
STAGES = (
    "preprocess",
    "wait",
    "infer",
    "handoff",
    "postprocess",
    "postprocess_cpu",
    "publish",
    "decision",
    "total",
)
ERROR_STAGES = ("capture", "preprocess", "infer", "postprocess", "evidence", "publish", "metrics")
POLL_S = 0.1  # how often blocked threads look at the stop/abort flags
# A wedged accelerator fails every call: after this many failed inferences in a row the run
# stops (and systemd restarts it) instead of rejecting every part as unverified forever.
FATAL_INFER_FAILURES = 10


@dataclass
class _Item:
    frame: Frame
    station: Station
    x: np.ndarray | None = None  # (3,H,W) uint8 RGB model input
    t_pre: float = 0.0
    t_inf0: float = 0.0
    t_inf: float = 0.0
    t_post0: float = 0.0
    amap: np.ndarray | None = None  # (1,H,W) float32
    score: float = 0.0
    batch: int = 1
    cause: str | None = None  # set when the part cannot get a real verdict (edge.verdict)


def warn_thresholds_precision(thresholds: Any, bundle: Bundle, precision: str) -> bool:
    """Warn when thresholds were fitted on another graph of the bundle (e.g. fp32 vs int8):
    quantisation shifts the score distribution, so the false-reject rate may differ."""
    fitted = thresholds.model_sha256
    if fitted and fitted != bundle.model_sha256(precision):
        log.warning(
            "%s: fitted on the %s graph, running %s; recalibrate for %s to keep the target rates",
            bundle.thresholds_path,
            thresholds.precision,
            precision,
            precision,
        )
        return True
    return False


def warmup(backend: Any) -> None:
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


class _Control:
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
        self._q: list[deque[_Item]] = []
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
        self, key: int, item: _Item, drop_oldest: bool, abort: threading.Event
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

    def get_batch(self, n: int, timeout: float) -> list[_Item] | None:
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
            out: list[_Item] = []
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


class Engine:
    """One loaded model and the thread that feeds it, for one or more stations.

    max_batch: most frames per inference for a dynamic-batch graph (0 = one per station
    attached). A fixed-batch graph always takes input_shape[0] frames: a partial batch is
    padded with zeros (the padding's outputs are discarded).
    """

    def __init__(self, backend: Any, max_batch: int = 0, name: str = "infer"):
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

    def loop(self, ctl: _Control) -> None:
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

    def _infer(self, items: list[_Item], chw: tuple[int, int, int], ctl: _Control) -> None:
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
                it.station._count_error("infer", exc, f"frame {it.frame.seq}")
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


class Station:
    """One camera's runtime: capture (+preprocess) and post-processing (+publish) threads.

    Args:
        source: an opened edge.sources.Source.
        postprocessor: edge.postprocess.PostProcessor for the model's resolution.
        publisher: edge.mqtt.Publisher (started), or any object with its publish_* / flush /
            close / stats methods.
        size: (H, W) model input. crop: (x, y, w, h) frame crop before resizing, or None.
        station, line: ids written into every event. model: {"name", "sha256"} for events.
        mode: "triggered" (never drop) | "continuous" (drop oldest under overload).
        queue_size: capacity of the station's inbox and output queue.
        read_timeout_s: source.read timeout (bounds how long stop() waits on an idle camera).
        metrics_interval_s: period of publish_metrics.
        publish_results: also publish_result for every part.
        max_frames: stop capture after this many frames (None = no limit).
        evidence: edge.evidence.EvidenceWriter or None.
        watcher: edge.reload.ThresholdsWatcher or None (no hot reload).
        window: length of each rolling latency/score window (bounded memory).
        on_error: "reject" (a part without a valid verdict is rejected as unverified) or
            "pass" (it is only counted: the part goes through).
    """

    def __init__(
        self,
        *,
        source: Any,
        postprocessor: PostProcessor,
        publisher: Any,
        size: tuple[int, int],
        crop: tuple[int, int, int, int] | list[int] | None = None,
        station: str = "station1",
        line: str = "line1",
        model: dict[str, str] | None = None,
        mode: str = "triggered",
        queue_size: int = 4,
        read_timeout_s: float = 1.0,
        metrics_interval_s: float = 10.0,
        publish_results: bool = False,
        max_frames: int | None = None,
        evidence: Any = None,
        watcher: ThresholdsWatcher | None = None,
        window: int = 2048,
        on_error: str = "reject",
        heartbeat_s: float = 5.0,
        stall_s: float = 10.0,
    ):
        if mode not in ("triggered", "continuous"):
            raise ValueError(f"mode: expected triggered or continuous, got {mode!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error: expected one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.source, self.post, self.publisher = source, postprocessor, publisher
        self.size = tuple(size)
        self.crop = tuple(crop) if crop is not None else None
        self.name, self.line = station, line
        self.model = dict(model or {"name": "", "sha256": ""})
        self.mode = mode
        self.queue_size = queue_size
        self.read_timeout_s = read_timeout_s
        self.metrics_interval_s = metrics_interval_s
        self.publish_results = publish_results
        self.max_frames = max_frames
        self.evidence = evidence
        self.watcher = watcher
        self.engine: Engine | None = None
        self.key = -1
        self.q_out: queue.Queue[_Item] = queue.Queue(maxsize=queue_size)
        self.latency = LatencyWindows(STAGES, window)
        self._good_scores: deque[float] = deque(maxlen=window)
        self._recent: deque[bool] = deque(maxlen=window)  # reject flags of recent parts
        self.captured = 0
        self.frames = 0
        self.rejects = 0
        self.unverified = 0  # parts without a valid verdict (rejected, or passed by on_error)
        self.last_cause: str | None = None
        self.unverified_passed = 0  # of those, let through by on_error: pass (no decision)
        self.liveness = Liveness(self, heartbeat_s, stall_s)
        self.drops = 0
        self.drained_after_stop = 0
        self.errors = dict.fromkeys(ERROR_STAGES, 0)
        self.threads: dict[str, threading.Thread] = {}
        self._t_start = 0.0
        self._t_first: float | None = None
        self._t_last = 0.0
        self._metrics_frames = 0
        self._metrics_t = 0.0
        self._fps = 0.0

    @property
    def label(self) -> str:
        return f"{self.line}/{self.name}"

    def _count_error(self, stage: str, exc: BaseException, what: str) -> None:
        self.errors[stage] += 1
        n = self.errors[stage]
        # Log the first few in full, then every 100th, so a persistent fault cannot flood the log.
        if n <= 5 or n % 100 == 0:
            log.error("%s: %s error #%d (%s): %s", self.label, stage, n, what, exc)

    # ------------------------------------------------------------------ capture thread
    def capture_loop(self, ctl: _Control) -> None:
        try:
            self._capture(ctl)
        finally:
            self.engine.inbox.close(self.key)

    def _capture(self, ctl: _Control) -> None:
        consecutive_errors = 0
        while not ctl.stop.is_set():
            if self.max_frames is not None and self.captured >= self.max_frames:
                log.info("%s: max frames (%d) captured; draining", self.label, self.max_frames)
                return
            try:
                frame = self.source.read(self.read_timeout_s)
            except EndOfStream:
                log.info("%s: end of stream; draining", self.label)
                return
            except Exception as exc:
                consecutive_errors += 1
                self._count_error("capture", exc, "source.read")
                if consecutive_errors >= 10:
                    raise SourceError(f"source failed 10 times in a row: {exc}") from exc
                time.sleep(POLL_S)
                continue
            consecutive_errors = 0
            if frame is None:
                continue  # timeout: idle line or camera reconnecting
            if not self._submit(frame, ctl):
                return
        if not ctl.abort.is_set() and self.mode == "triggered":
            self._take_buffered(ctl)

    def _take_buffered(self, ctl: _Control) -> None:
        """After stop on a triggered line: inspect the frames a live camera already delivered."""
        stop_capture = getattr(self.source, "stop_capture", None)
        if stop_capture is None:
            return  # a file has no "already captured" frames beyond what we read
        stop_capture()
        while self.max_frames is None or self.captured < self.max_frames:
            try:
                frame = self.source.read(0)
            except Exception as exc:
                self._count_error("capture", exc, "reading buffered frames after stop")
                break
            if frame is None or not self._submit(frame, ctl):
                break
            self.drained_after_stop += 1
        if self.drained_after_stop:
            log.info(
                "%s: %d buffered frame(s) inspected after stop", self.label, self.drained_after_stop
            )

    def _submit(self, frame: Frame, ctl: _Control) -> bool:
        """Preprocess and queue one captured frame. False only when aborting."""
        self.captured += 1
        x, cause = None, None
        if getattr(frame, "error", None):
            cause = f"undecodable frame: {frame.error}"
            self._count_error("capture", SourceError(frame.error), f"frame {frame.seq}")
        else:
            try:
                x = to_input(frame.image, self.size, self.crop)
            except Exception as exc:
                self._count_error("preprocess", exc, f"frame {frame.seq}")
                cause = f"preprocess failed: {' '.join(str(exc).split())[:300]}"
        if cause is not None and self.on_error == "pass":
            self.unverified += 1
            self.unverified_passed += 1
            return True  # on_error: pass: counted, the part gets no reject
        # An unverified item still queues in frame order; the engine passes it on uninferred.
        item = _Item(frame, self, x, t_pre=time.monotonic(), cause=cause)
        ok, dropped = self.engine.inbox.put(self.key, item, self.mode == "continuous", ctl.abort)
        self.drops += dropped
        return ok

    # ------------------------------------------------------------------ engine -> post
    def put_out(self, item: _Item, ctl: _Control) -> bool:
        while not ctl.abort.is_set():
            try:
                self.q_out.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    # ------------------------------------------------------------------ post thread
    def post_loop(self, ctl: _Control) -> None:
        next_metrics = time.monotonic() + self.metrics_interval_s
        engine_thread = self.engine.thread
        while True:
            now = time.monotonic()
            if now >= next_metrics:
                self._publish_metrics()
                next_metrics = now + self.metrics_interval_s
            if self.watcher is not None:
                self.watcher.poll(now)  # between frames: never mid-decision
            self.liveness.tick(now)
            try:
                item = self.q_out.get(timeout=min(POLL_S, max(0.0, next_metrics - now)))
            except queue.Empty:
                # The engine's last put happens-before its exit, so "dead then empty" means done.
                if (engine_thread is None or not engine_thread.is_alive()) and self.q_out.empty():
                    break
                continue
            self._decide_and_publish(item)
        self._publish_metrics()

    def _decide_and_publish(self, item: _Item) -> None:
        frame = item.frame
        item.t_post0 = time.monotonic()
        cpu0 = time.thread_time()
        if item.cause is not None:
            decision = unverified(item.cause)
        else:
            try:
                decision = self.post(item.amap, item.score, frame.image.shape)
            except Exception as exc:
                self._count_error("postprocess", exc, f"frame {frame.seq}")
                decision = unverified(f"postprocess failed: {' '.join(str(exc).split())[:300]}")
        if decision.cause is not None:
            self.unverified += 1
            self.last_cause = decision.cause
            if self.on_error == "pass":
                self.unverified_passed += 1
                return  # counted (and logged where it failed); the part is let through
        t_dec = time.monotonic()
        post_cpu = time.thread_time() - cpu0
        event = self.event(frame, decision, t_dec - frame.t_mono, stages=self._stages_ms(item))
        if self.evidence is not None and item.amap is not None and decision.cause is None:
            try:
                event["evidence"] = self.evidence.offer(
                    frame,
                    item.amap.reshape(self.size),
                    decision,
                    event,
                    self.post.view(frame.image.shape),
                    self.thresholds_dict(),
                )
            except Exception as exc:
                self._count_error("evidence", exc, f"frame {frame.seq}")
        # The result first: a reject's spool sync (inside publish_reject) must not hold back the
        # result stream; the reject itself is on the wire before that sync. Separate attempts,
        # so a failed result can never cost the reject.
        if self.publish_results:
            result = {**event, "decision": "reject" if decision.reject else "pass"}
            self._send(self.publisher.publish_result, result, frame)
        if decision.reject:
            self._send(self.publisher.publish_reject, event, frame)
        t_pub = time.monotonic()

        self.frames += 1
        self.liveness.decided(frame)
        self.rejects += int(decision.reject)
        self._recent.append(decision.reject)
        if not decision.reject:
            self._good_scores.append(decision.score)
        if self._t_first is None:
            self._t_first = frame.t_mono
        self._t_last = t_pub
        lat = self.latency
        if item.t_inf:  # a part that was never inferred has no stage times to add
            lat.add("preprocess", item.t_pre - frame.t_mono)
            lat.add("wait", item.t_inf0 - item.t_pre)
            lat.add("infer", item.t_inf - item.t_inf0)
            lat.add("handoff", item.t_post0 - item.t_inf)
            lat.add("postprocess", t_dec - item.t_post0)
            lat.add("postprocess_cpu", post_cpu)
        lat.add("publish", t_pub - t_dec)
        lat.add("decision", t_dec - frame.t_mono)
        lat.add("total", t_pub - frame.t_mono)

    def _send(self, publish: Callable[..., Any], event: dict, frame: Frame) -> None:
        try:
            publish(event, t_capture=frame.t_mono)
        except Exception as exc:
            # Counted and logged loudly; the spool (if it got that far) still holds the event.
            self._count_error("publish", exc, f"frame {frame.seq} part {frame.part_id}")

    @staticmethod
    def _stages_ms(item: _Item) -> dict[str, float]:
        t = item.frame.t_mono
        marks = (
            ("preprocess", item.t_pre),
            ("wait", item.t_inf0),
            ("infer", item.t_inf),
            ("handoff", item.t_post0),
        )
        out = {}
        for name, mark in marks:
            out[name] = round(max(0.0, mark - t) * 1000.0, 3)
            t = mark
        out["batch"] = item.batch
        return out

    def event(
        self,
        frame: Frame,
        decision: Decision,
        latency_s: float,
        evidence: str | None = None,
        stages: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """The reject event payload (the result event adds "decision")."""
        ev = {
            "event_id": str(uuid.uuid4()),
            "station": self.name,
            "line": self.line,
            "part_id": frame.part_id,
            "frame": frame.seq,
            "capture_time": frame.capture_time,
            "score": decision.score,
            "image_threshold": self.post.image_threshold,
            "pixel_threshold": self.post.pixel_threshold,
            "regions": [r.to_dict() for r in decision.regions],
            "model": dict(self.model),
            "latency_ms": round(latency_s * 1000.0, 3),
            "evidence": evidence,
        }
        if decision.reason is not None:
            ev["reason"] = decision.reason
        if decision.cause is not None:
            ev["cause"] = decision.cause
        if stages is not None:
            ev["stages_ms"] = stages
        return ev

    def thresholds_dict(self) -> dict[str, Any]:
        return {
            "image_threshold": self.post.image_threshold,
            "pixel_threshold": self.post.pixel_threshold,
            "min_region_area": self.post.min_region_area,
        }

    # ------------------------------------------------------------------ reporting
    def _publish_metrics(self) -> None:
        try:
            self.publisher.publish_metrics(self.metrics())
        except Exception as exc:
            self._count_error("metrics", exc, "publish_metrics")

    def metrics(self) -> dict[str, Any]:
        """Periodic metrics (also advances the fps interval)."""
        now = time.monotonic()
        dt = now - self._metrics_t
        if dt > 0:
            self._fps = (self.frames - self._metrics_frames) / dt
        self._metrics_t, self._metrics_frames = now, self.frames
        # The publisher adds its own counters under "mqtt" (edge/schemas/metrics.json).
        return self.snapshot(publisher_stats=False)

    def snapshot(self, publisher_stats: bool = True) -> dict[str, Any]:
        """Current metrics without side effects (safe from another thread, e.g. Prometheus).

        publisher_stats: include the publisher's stats() under "mqtt"."""
        recent = list(self._recent)
        out = {
            "time": time.time(),
            "station": self.name,
            "line": self.line,
            "uptime_s": round(time.monotonic() - self._t_start, 3) if self._t_start else 0.0,
            "fps": round(self._fps, 3),
            "frames": self.frames,
            "captured": self.captured,
            "rejects": self.rejects,
            "unverified": self.unverified,
            "reject_rate": round(sum(recent) / len(recent), 6) if recent else 0.0,
            "drops": self._drops_total(),
            "errors": dict(self.errors),
            "queues": [self.engine.inbox.qsize(self.key) if self.engine else 0, self.q_out.qsize()],
            "latency_ms": self.latency_percentiles(),
            "score_quantiles": quantiles(list(self._good_scores)),
            "source": self._source_stats(),
            "thresholds": self.snapshot_thresholds(),
        }
        if self.evidence is not None:
            out["evidence"] = self.evidence.stats()
        if publisher_stats:
            try:
                out["mqtt"] = self.publisher.stats()
            except Exception as exc:
                self._count_error("metrics", exc, "publisher.stats")
        return out

    def latency_percentiles(self) -> dict[str, dict[str, float | None]]:
        """The stage windows plus the publisher's capture -> PUBACK windows (when it has them)."""
        out = self.latency.percentiles()
        acks = getattr(self.publisher, "ack_latency", None)
        if acks is not None:
            out.update(acks.percentiles())
        return out

    def _drops_total(self) -> int:
        return self.drops + int(self._source_stats().get("dropped", 0))

    def _source_stats(self) -> dict[str, Any]:
        try:
            return self.source.stats()
        except Exception as exc:
            self._count_error("metrics", exc, "source.stats")
            return {}

    def summary(self) -> dict[str, Any]:
        """Run summary: counts, throughput (first capture -> last publish), latency percentiles."""
        busy = (self._t_last - self._t_first) if self._t_first is not None else 0.0
        try:
            pub_stats = self.publisher.stats()
        except Exception as exc:
            self._count_error("metrics", exc, "publisher.stats")
            pub_stats = {}
        eng = self.engine
        out = {
            "station": self.name,
            "line": self.line,
            "frames": self.frames,
            "captured": self.captured,
            "rejects": self.rejects,
            "passes": self.frames - self.rejects,
            "unverified": self.unverified,
            "last_unverified_cause": self.last_cause,
            "drops": self._drops_total(),
            "drops_queue": self.drops,
            "drained_after_stop": self.drained_after_stop,
            "errors": sum(self.errors.values()),
            "errors_by_stage": dict(self.errors),
            # frames-1 intervals between the first capture and the last publish
            "fps": round((self.frames - 1) / busy, 3) if busy > 0 and self.frames > 1 else 0.0,
            "elapsed_s": round(time.monotonic() - self._t_start, 3) if self._t_start else 0.0,
            "latency_ms": self.latency_percentiles(),
            "score_quantiles": quantiles(list(self._good_scores)),
            "thresholds": self.snapshot_thresholds(),
            "source": self._source_stats(),
            "publisher": pub_stats,
            "mode": self.mode,
            "batch_mean": round(eng.batched_frames / eng.batches, 3) if eng and eng.batches else 0,
        }
        if self.evidence is not None:
            out["evidence"] = self.evidence.stats()
        return out

    def snapshot_thresholds(self) -> dict[str, Any]:
        """Thresholds in force and the hot-reload counters."""
        th = self.thresholds_dict()
        w = self.watcher
        th.update(reloads=w.reloads if w else 0, refused=w.refused if w else 0)
        return th


class Pipeline:
    """Stations and engines run as one unit: `run()` until stopped, then drain and flush.

    The keyword constructor builds the common case, one station on its own backend (see
    `Station` for the arguments; `backend`, `max_batch`, `flush_timeout_s` and `warm` are the
    engine's and the run's). `from_config` / `from_configs` build from station YAML files;
    several stations on the same bundle share one loaded model.
    """

    def __init__(
        self,
        *,
        backend: Any,
        max_batch: int = 0,
        flush_timeout_s: float = 10.0,
        warm: bool = False,
        **station_kwargs: Any,
    ):
        engine = Engine(backend, max_batch)
        station = Station(**station_kwargs)
        engine.attach(station)
        self._setup([station], [engine], flush_timeout_s, warm)

    @classmethod
    def from_stations(
        cls,
        stations: list[Station],
        engines: list[Engine],
        *,
        flush_timeout_s: float = 10.0,
        warm: bool = False,
    ) -> Pipeline:
        self = cls.__new__(cls)
        self._setup(stations, engines, flush_timeout_s, warm)
        return self

    def _setup(
        self, stations: list[Station], engines: list[Engine], flush_timeout_s: float, warm: bool
    ) -> None:
        if not stations:
            raise ValueError("a pipeline needs at least one station")
        self.stations = stations
        self.engines = engines
        self.flush_timeout_s = flush_timeout_s
        self.warm = warm
        self._ctl = _Control()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ single-station view
    @property
    def station(self) -> Station:
        return self.stations[0]

    @property
    def errors(self) -> dict[str, int]:
        return self.station.errors

    @property
    def latency(self) -> LatencyWindows:
        return self.station.latency

    @property
    def max_frames(self) -> int | None:
        return self.station.max_frames

    @max_frames.setter
    def max_frames(self, n: int | None) -> None:
        for st in self.stations:
            st.max_frames = n

    def metrics(self) -> dict[str, Any]:
        return self.station.metrics()

    def snapshots(self) -> list[dict[str, Any]]:
        """Every station's current metrics (for the Prometheus endpoint)."""
        return [st.snapshot() for st in self.stations]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        cfg: Any,
        *,
        max_frames: int | None = None,
        publisher: Any = None,
        backend_opts: dict[str, Any] | None = None,
    ) -> Pipeline:
        """One station from a StationConfig (see from_configs)."""
        return cls.from_configs(
            [cfg],
            max_frames=max_frames,
            publishers=None if publisher is None else [publisher],
            backend_opts=backend_opts,
        )

    @classmethod
    def from_configs(
        cls,
        cfgs: list[Any],
        *,
        max_frames: int | None = None,
        publishers: list[Any] | None = None,
        backend_opts: dict[str, Any] | None = None,
    ) -> Pipeline:
        """Build every station the configs name; fails fast (and cleans up) on any problem.

        Order: bundles (hashes) -> thresholds (refused if missing) -> post-processors ->
        backends (one per distinct bundle/backend/precision/threads, warmed up) -> publishers
        (started, unless given) -> evidence folders -> sources (opened last: a live camera
        starts buffering at once).
        """
        _check_distinct(cfgs)
        threads = {c.runtime.opencv_threads for c in cfgs}
        if len(threads) > 1:
            log.warning("runtime.opencv_threads differs between stations; using the largest")
        # Decode/resize/post run on their own threads, one core each: an OpenCV pool per call
        # would only take cores from inference.
        cv2.setNumThreads(max(threads))
        engines: dict[tuple, Engine] = {}
        parts: list[dict[str, Any]] = []
        with contextlib.ExitStack() as undo:
            for i, cfg in enumerate(cfgs):
                bundle = Bundle(cfg.bundle)
                th = bundle.thresholds()  # BundleError telling to run calibration if missing
                validate_thresholds(th, bundle.thresholds_path)
                warn_thresholds_precision(th, bundle, cfg.precision)
                size = bundle.image_size
                post = postprocessor_from_bundle(th, size, cfg.preprocess, cfg.postprocess)
                rt = cfg.runtime
                key = (
                    str(bundle.root.resolve()),
                    cfg.backend,
                    cfg.precision,
                    rt.inference_threads,
                    rt.spin,
                )
                if key not in engines:
                    opts = {"intra_op_threads": rt.inference_threads, "spin": rt.spin}
                    opts.update(backend_opts or {})
                    backend = load_backend(cfg.backend, bundle, cfg.precision, **opts)
                    undo.callback(backend.close)
                    warmup(backend)
                    engines[key] = Engine(backend, rt.max_batch, name=f"infer-{len(engines)}")
                engine = engines[key]
                model = {
                    "name": bundle.manifest.name,
                    "sha256": bundle.model_sha256(cfg.precision),
                }
                publisher = publishers[i] if publishers is not None else None
                if publisher is None:
                    from edge.mqtt import Publisher

                    status = {
                        "station": cfg.station.name,
                        "line": cfg.station.line,
                        "model": model["name"],
                        "model_sha256": model["sha256"],
                        "precision": cfg.precision,
                        "backend": engine.backend.name,
                        "config_sha256": cfg.sha256,
                        "version": edge.__version__,
                    }
                    publisher = Publisher(cfg.mqtt, cfg.topic_base, status)
                    undo.callback(publisher.close)  # releases the spool if start() fails
                    # BrokerError (one line) if unreachable, unless the config says to
                    # inspect and spool until the broker comes.
                    publisher.start(required=cfg.mqtt.require_broker_at_start)
                from edge import evidence as evidence_mod

                writer = evidence_mod.from_config(
                    cfg,
                    info={
                        "station": cfg.station.name,
                        "line": cfg.station.line,
                        "bundle": str(bundle.root),
                        "model_sha256": model["sha256"],
                        "model_input": list(size),
                        "crop": cfg.preprocess.crop,
                        "note": "raw frames (BGR PNG) of accepted parts; apply `crop` before "
                        "edge.preprocess.to_input, as the station does",
                    },
                )
                parts.append(
                    dict(
                        cfg=cfg,
                        bundle=bundle,
                        th=th,
                        post=post,
                        engine=engine,
                        model=model,
                        publisher=publisher,
                        evidence=writer,
                    )
                )
            stations = []
            for p in parts:
                cfg = p["cfg"]
                source = open_source(cfg.source, triggered=cfg.mode == "triggered")
                undo.callback(source.close)
                label = f"{cfg.station.line}/{cfg.station.name}"
                if cfg.on_error == "pass":
                    log.warning(
                        "%s: on_error: pass: parts without a valid verdict (undecodable frame, "
                        "failed inference, NaN output) are let through, only counted",
                        label,
                    )
                watcher = ThresholdsWatcher(
                    p["bundle"],
                    _threshold_applier(p["post"], cfg, p["bundle"], label),
                    p["th"],
                    watch=cfg.thresholds.watch,
                    check_interval_s=cfg.thresholds.check_interval_s,
                    label=label,
                )
                st = Station(
                    source=source,
                    postprocessor=p["post"],
                    publisher=p["publisher"],
                    size=p["bundle"].image_size,
                    crop=cfg.preprocess.crop,
                    station=cfg.station.name,
                    line=cfg.station.line,
                    model=p["model"],
                    mode=cfg.mode,
                    queue_size=cfg.queue_size,
                    read_timeout_s=cfg.source.timeout_s,
                    metrics_interval_s=cfg.metrics.interval_s,
                    publish_results=cfg.mqtt.publish_results,
                    max_frames=max_frames,
                    evidence=p["evidence"],
                    watcher=watcher,
                    window=cfg.metrics.window,
                    on_error=cfg.on_error,
                    heartbeat_s=cfg.heartbeat_s,
                    stall_s=cfg.stall_s,
                )
                p["engine"].attach(st)
                stations.append(st)
            undo.pop_all()
        return cls.from_stations(stations, list(engines.values()), warm=True)

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """Stop capturing; frames already captured are still processed. Signal-handler safe."""
        self._ctl.stop.set()

    @property
    def stopping(self) -> bool:
        return self._ctl.stop.is_set()

    def request_reload(self) -> None:
        """Re-read thresholds.yaml at the next frame of every station (SIGHUP). Signal-safe."""
        for st in self.stations:
            if st.watcher is not None:
                st.watcher.request()

    def run(self) -> dict[str, Any]:
        """Run until stop(), end of every file source, max_frames, or a fatal error.

        Returns the summary dict; re-raises a fatal error (e.g. BackendError) after draining.
        """
        ctl = self._ctl
        try:
            if not self.warm:
                for eng in self.engines:
                    warmup(eng.backend)
                self.warm = True
            t0 = time.monotonic()
            threads: list[threading.Thread] = []
            for eng in self.engines:
                eng.thread = threading.Thread(
                    target=self._guard(eng.loop, ctl), name=eng.name, daemon=True
                )
            for st in self.stations:
                st._t_start = st._metrics_t = t0
                if st.evidence is not None:
                    st.evidence.start()
                suffix = f"-{st.name}" if len(self.stations) > 1 else ""
                # A failed source still lets captured frames drain; a crash elsewhere aborts.
                st.threads = {
                    "capture": threading.Thread(
                        target=self._guard(st.capture_loop, ctl, drain=True),
                        name=f"capture{suffix}",
                        daemon=True,
                    ),
                    "post": threading.Thread(
                        target=self._guard(st.post_loop, ctl), name=f"post{suffix}", daemon=True
                    ),
                }
                threads += st.threads.values()
            threads += [eng.thread for eng in self.engines]
            self._threads = threads
            # daemon: a wedged driver must not keep the process alive after exit
            for t in threads:
                t.start()
            # systemd (Type=notify): ready once every thread runs; the watchdog is fed only
            # while every station decides or idles with nothing waiting (edge/liveness.py).
            sd_notify("READY=1")
            next_dog = 0.0
            # Join with a timeout so signal handlers run promptly in the main thread.
            for t in threads:
                while t.is_alive():
                    t.join(POLL_S)
                    now = time.monotonic()
                    if now >= next_dog and all(st.liveness.healthy() for st in self.stations):
                        sd_notify("WATCHDOG=1")
                        next_dog = now + 1.0
        finally:
            ctl.stop.set()
            self._shutdown()
        if ctl.fatal is not None:
            raise ctl.fatal
        return self.summary()

    def _shutdown(self) -> None:
        for st in self.stations:
            if st.evidence is not None:
                st.evidence.close(self.flush_timeout_s)
        deadline = time.monotonic() + self.flush_timeout_s
        for st in self.stations:
            try:
                if not st.publisher.flush(max(0.0, deadline - time.monotonic())):
                    log.warning(
                        "%s: publisher not flushed within %.0fs; spooled events wait for the "
                        "next start",
                        st.label,
                        self.flush_timeout_s,
                    )
            except Exception as exc:
                log.error("%s: publisher flush failed: %s", st.label, exc)
        closers: list[tuple[str, Callable[[], Any]]] = []
        for st in self.stations:
            closers += [(f"{st.label} publisher", st.publisher.close)]
            closers += [(f"{st.label} source", st.source.close)]
        closers += [(f"{eng.name} backend", eng.backend.close) for eng in self.engines]
        for name, close in closers:
            try:
                close()
            except Exception as exc:
                log.error("closing %s failed: %s", name, exc)

    def _guard(
        self, fn: Callable[[_Control], None], ctl: _Control, drain: bool = False
    ) -> Callable[[], None]:
        def run() -> None:
            try:
                fn(ctl)
            except BaseException as exc:  # a failing stage must stop the run, loudly
                if isinstance(exc, LineInspectError):
                    log.error("%s: %s", threading.current_thread().name, exc)
                else:
                    log.exception("%s thread crashed", threading.current_thread().name)
                ctl.fail(exc, drain)

        return run

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict[str, Any]:
        """One station: its summary. Several: totals plus "stations": {line/name: summary}."""
        if len(self.stations) == 1:
            return self.station.summary()
        per = {st.label: st.summary() for st in self.stations}
        total = {
            k: sum(s[k] for s in per.values())
            for k in ("frames", "captured", "rejects", "passes", "unverified", "drops", "errors")
        }
        total["fps"] = round(sum(s["fps"] for s in per.values()), 3)
        total["engines"] = [
            {
                "name": eng.name,
                "backend": eng.backend.name,
                "stations": [st.label for st in eng.stations],
                "max_batch": eng.max_batch,
                "batches": eng.batches,
                "batch_mean": round(eng.batched_frames / eng.batches, 3) if eng.batches else 0,
            }
            for eng in self.engines
        ]
        total["stations"] = per
        return total


def _threshold_applier(
    post: PostProcessor, cfg: Any, bundle: Bundle, label: str
) -> Callable[[Any], None]:
    def apply(th: Any) -> None:
        warn_thresholds_precision(th, bundle, cfg.precision)
        post.set_thresholds(
            th.image_threshold, th.pixel_threshold, effective_min_area(th, cfg.postprocess)
        )

    return apply


def _check_distinct(cfgs: list[Any]) -> None:
    """Stations in one process must not share ids, MQTT client ids, spools or folders."""
    seen: dict[str, dict[Any, str]] = {}
    for cfg in cfgs:
        checks = {
            "station (line/name)": (cfg.station.line, cfg.station.name),
            "mqtt.client_id": cfg.mqtt.client_id,
            "mqtt.spool": os.path.realpath(cfg.mqtt.spool),
            "evidence.dir": cfg.evidence.dir and os.path.realpath(cfg.evidence.dir),
            "recalibration.dir": cfg.recalibration.dir and os.path.realpath(cfg.recalibration.dir),
        }
        for what, value in checks.items():
            if value is None:
                continue
            other = seen.setdefault(what, {}).get(value)
            if other is not None:
                raise ConfigError(
                    f"{cfg.path}: {what} {value!r} is also used by {other}; stations in one "
                    "process need their own"
                )
            seen[what][value] = cfg.path
