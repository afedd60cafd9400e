"""The station pipeline: source -> preprocess+infer -> postprocess+publish, as three threads.

    capture --q_in--> preprocess + infer --q_out--> postprocess + publish (+ metrics)

Queues are small and bounded. `triggered` mode (one frame per part) never drops: a full queue
blocks the producer (back-pressure up to the source). `continuous` mode drops the OLDEST frame at
the capture queue when inference falls behind, and counts it; latency then stays bounded.

Shutdown: `stop()` (from a signal handler, another thread, or the end of a non-looping file) stops
capture only; every frame already captured still goes through inference and publishing, then the
publisher is flushed and closed. A backend failure is fatal: the pipeline stops, drains what was
already inferred, and `run()` re-raises it.

Only the post thread touches the publisher and the latency windows, so neither needs a lock.
Memory stays flat: bounded queues, bounded deques, counters.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import edge
from edge.backends import load_backend
from edge.bundle import Bundle
from edge.errors import BackendError, LineInspectError, SourceError
from edge.postprocess import Decision, PostProcessor
from edge.postprocess import from_bundle as postprocessor_from_bundle
from edge.preprocess import to_input
from edge.sources import EndOfStream, Frame, open_source

log = logging.getLogger(__name__)

# Latency windows, all measured from monotonic stamps carried with each frame:
#   preprocess = capture -> preprocessed (includes the wait in the capture queue)
#   infer      = preprocessed -> inferred
#   postprocess= inferred -> decided (includes the wait in the output queue)
#   publish    = decided -> published
#   decision   = capture -> decided (what latency_ms in an event reports)
#   total      = capture -> published
STAGES = ("preprocess", "infer", "postprocess", "publish", "decision", "total")
ERROR_STAGES = ("capture", "preprocess", "infer", "postprocess", "publish", "metrics")
POLL_S = 0.1  # how often blocked threads look at the stop/abort flags


@dataclass
class _Item:
    frame: Frame
    t_pre: float = 0.0
    t_inf: float = 0.0
    amap: np.ndarray | None = None  # (1,H,W) float32
    score: float = 0.0


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


def _quantiles(scores: np.ndarray) -> dict[str, float | None]:
    """Recent image scores -> {p50, p95, p99, max} (None while no part was seen)."""
    keys = ("p50", "p95", "p99", "max")
    if not scores.size:
        return dict.fromkeys(keys)
    q = np.quantile(scores, [0.5, 0.95, 0.99, 1.0])
    return {k: round(float(v), 6) for k, v in zip(keys, q, strict=True)}


class LatencyWindows:
    """Rolling windows (bounded deques) of stage latencies in seconds -> percentiles in ms."""

    def __init__(self, stages: tuple[str, ...] = STAGES, maxlen: int = 2048):
        self._w = {s: deque(maxlen=maxlen) for s in stages}

    def add(self, stage: str, seconds: float) -> None:
        self._w[stage].append(max(0.0, seconds))

    def percentiles(self) -> dict[str, dict[str, float]]:
        out = {}
        for stage, win in self._w.items():
            if win:
                p = np.percentile(np.fromiter(win, float, len(win)), [50, 95, 99]) * 1000.0
                out[stage] = {
                    k: round(float(v), 3) for k, v in zip(("p50", "p95", "p99"), p, strict=True)
                }
            else:
                out[stage] = {"p50": None, "p95": None, "p99": None}
        return out


class Pipeline:
    """Owns a source, backend, post-processor and publisher, and runs them as three threads.

    Args:
        source: an opened edge.sources.Source.
        backend: an edge.backends Backend.
        postprocessor: edge.postprocess.PostProcessor for the backend's resolution.
        publisher: edge.mqtt.Publisher (started), or any object with its publish_* / flush /
            close / stats methods.
        size: (H, W) model input. crop: (x, y, w, h) frame crop before resizing, or None.
        station, line: ids written into every event. model: {"name", "sha256"} for events.
        mode: "triggered" (never drop) | "continuous" (drop oldest under overload).
        queue_size: capacity of each inter-stage queue.
        read_timeout_s: source.read timeout (bounds how long stop() waits on an idle camera).
        metrics_interval_s: period of publish_metrics.
        publish_results: also publish_result for every part.
        max_frames: stop capture after this many frames (None = no limit).
        evidence: optional hook (frame, anomaly_map (H,W), decision) -> path or None, called for
            rejects before publishing; its path goes into the event's `evidence`.
        flush_timeout_s: how long shutdown waits for the broker to acknowledge spooled rejects.
        window: length of each rolling latency/score window (bounded memory).
        warm: the backend already ran its warm-up inference (from_config does it).
    """

    def __init__(
        self,
        *,
        source: Any,
        backend: Any,
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
        evidence: Callable[[Frame, np.ndarray, Decision], str | None] | None = None,
        flush_timeout_s: float = 10.0,
        window: int = 2048,
        warm: bool = False,
    ):
        if mode not in ("triggered", "continuous"):
            raise ValueError(f"mode: expected triggered or continuous, got {mode!r}")
        self.source, self.backend, self.post, self.publisher = (
            source,
            backend,
            postprocessor,
            publisher,
        )
        self.size = tuple(size)
        self.crop = tuple(crop) if crop is not None else None
        self.station, self.line = station, line
        self.model = dict(model or {"name": "", "sha256": ""})
        self.mode = mode
        self.read_timeout_s = read_timeout_s
        self.metrics_interval_s = metrics_interval_s
        self.publish_results = publish_results
        self.max_frames = max_frames
        self.evidence = evidence
        self.flush_timeout_s = flush_timeout_s
        self.warm = warm  # False: run() does the warm-up inference first

        self._q_in: queue.Queue[_Item] = queue.Queue(maxsize=queue_size)
        self._q_out: queue.Queue[_Item] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()  # stop capturing, drain the rest
        self._abort = threading.Event()  # fatal error: stop everything now
        self._fatal: BaseException | None = None
        self._threads: dict[str, threading.Thread] = {}

        self.latency = LatencyWindows(STAGES, window)
        self._scores: deque[float] = deque(maxlen=window)
        self.captured = 0
        self.frames = 0
        self.rejects = 0
        self.drops = 0
        self.errors = dict.fromkeys(ERROR_STAGES, 0)
        self._t_start = 0.0
        self._t_first: float | None = None
        self._t_last = 0.0
        self._metrics_frames = 0
        self._metrics_t = 0.0

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
        """Build everything a station config names; fails fast (and cleans up) on any problem.

        Order: bundle (hashes) -> thresholds (refused if missing) -> post-processor -> backend
        (warmed up) -> publisher (started, unless one is given) -> source (opened).
        """
        bundle = Bundle(cfg.bundle)
        thresholds = bundle.thresholds()  # BundleError telling to run calibration if missing
        warn_thresholds_precision(thresholds, bundle, cfg.precision)
        size = bundle.image_size
        post = postprocessor_from_bundle(thresholds, size, cfg.preprocess, cfg.postprocess)
        with contextlib.ExitStack() as undo:
            backend = load_backend(cfg.backend, bundle, cfg.precision, **(backend_opts or {}))
            undo.callback(backend.close)
            warmup(backend)
            model = {"name": bundle.manifest.name, "sha256": bundle.model_sha256(cfg.precision)}
            if publisher is None:
                from edge.mqtt import Publisher

                status = {
                    "station": cfg.station.name,
                    "line": cfg.station.line,
                    "model": model["name"],
                    "model_sha256": model["sha256"],
                    "precision": cfg.precision,
                    "backend": backend.name,
                    "config_sha256": cfg.sha256,
                    "version": edge.__version__,
                }
                publisher = Publisher(cfg.mqtt, cfg.topic_base, status)
                undo.callback(publisher.close)  # releases the spool if start() fails
                publisher.start()  # BrokerError (one line) if unreachable
            if cfg.evidence.dir:
                log.warning("evidence.dir is set but evidence saving is not built in yet")
            # The camera opens last: a live source starts buffering (and dropping) at once.
            source = open_source(cfg.source)
            undo.callback(source.close)
            undo.pop_all()
        return cls(
            source=source,
            backend=backend,
            postprocessor=post,
            publisher=publisher,
            size=size,
            crop=cfg.preprocess.crop,
            station=cfg.station.name,
            line=cfg.station.line,
            model=model,
            mode=cfg.mode,
            queue_size=cfg.queue_size,
            read_timeout_s=cfg.source.timeout_s,
            metrics_interval_s=cfg.metrics.interval_s,
            publish_results=cfg.mqtt.publish_results,
            max_frames=max_frames,
            warm=True,
        )

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """Stop capturing; frames already captured are still processed. Signal-handler safe."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> dict[str, Any]:
        """Run until stop(), end of a file source, max_frames, or a fatal error.

        Returns the summary dict; re-raises a fatal error (e.g. BackendError) after draining.
        """
        try:
            if not self.warm:
                warmup(self.backend)
                self.warm = True
            self._t_start = self._metrics_t = time.monotonic()
            self._threads = {
                # A failed source still lets captured frames drain; a crash elsewhere aborts.
                "capture": threading.Thread(
                    target=self._guard(self._capture_loop, drain=True), name="capture"
                ),
                "infer": threading.Thread(target=self._guard(self._infer_loop), name="infer"),
                "post": threading.Thread(target=self._guard(self._post_loop), name="post"),
            }
            for t in self._threads.values():
                t.daemon = True  # a wedged driver must not keep the process alive after exit
                t.start()
            # Join with a timeout so signal handlers run promptly in the main thread.
            for t in self._threads.values():
                while t.is_alive():
                    t.join(POLL_S)
        finally:
            self._stop.set()
            self._shutdown()
        if self._fatal is not None:
            raise self._fatal
        return self.summary()

    def _shutdown(self) -> None:
        try:
            if not self.publisher.flush(self.flush_timeout_s):
                log.warning(
                    "publisher not flushed within %.0fs; spooled events wait for the next start",
                    self.flush_timeout_s,
                )
        except Exception as exc:
            log.error("publisher flush failed: %s", exc)
        for name, close in (
            ("publisher", self.publisher.close),
            ("source", self.source.close),
            ("backend", self.backend.close),
        ):
            try:
                close()
            except Exception as exc:
                log.error("closing %s failed: %s", name, exc)

    def _guard(self, fn: Callable[[], None], drain: bool = False) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # a failing stage must stop the run, loudly
                if isinstance(exc, LineInspectError):
                    log.error("%s: %s", threading.current_thread().name, exc)
                else:
                    log.exception("%s thread crashed", threading.current_thread().name)
                self._fail(exc, drain)

        return run

    def _fail(self, exc: BaseException, drain: bool = False) -> None:
        """Record a fatal error; stop capture, and unless `drain`, stop inference too."""
        if self._fatal is None:
            self._fatal = exc
        if not drain:
            self._abort.set()
        self._stop.set()

    def _count_error(self, stage: str, exc: BaseException, what: str) -> None:
        self.errors[stage] += 1
        n = self.errors[stage]
        # Log the first few in full, then every 100th, so a persistent fault cannot flood the log.
        if n <= 5 or n % 100 == 0:
            log.error("%s error #%d (%s): %s", stage, n, what, exc)

    # ------------------------------------------------------------------ queues
    def _put(self, q: queue.Queue, item: _Item, drop_oldest: bool) -> bool:
        """Blocking put (back-pressure) or drop-oldest put. False only when aborting."""
        if drop_oldest:
            while True:
                try:
                    q.put_nowait(item)
                    return True
                except queue.Full:
                    try:
                        q.get_nowait()
                        self.drops += 1
                    except queue.Empty:
                        pass
        while not self._abort.is_set():
            try:
                q.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue, upstream: str, timeout: float = POLL_S) -> _Item | None:
        """Next item, or None on timeout. Raises StopIteration once upstream ended and q is empty."""
        try:
            return q.get(timeout=timeout)
        except queue.Empty:
            # Upstream's last put happens-before its exit, so "dead then empty" means done.
            if not self._threads[upstream].is_alive() and q.empty():
                raise StopIteration from None
            return None

    # ------------------------------------------------------------------ stages
    def _capture_loop(self) -> None:
        consecutive_errors = 0
        while not self._stop.is_set():
            if self.max_frames is not None and self.captured >= self.max_frames:
                log.info("max frames (%d) captured; draining", self.max_frames)
                break
            try:
                frame = self.source.read(self.read_timeout_s)
            except EndOfStream:
                log.info("end of stream; draining")
                break
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
            self.captured += 1
            if not self._put(self._q_in, _Item(frame), self.mode == "continuous"):
                break

    def _infer_loop(self) -> None:
        while not self._abort.is_set():
            try:
                item = self._get(self._q_in, "capture")
            except StopIteration:
                break
            if item is None:
                continue
            try:
                x = to_input(item.frame.image, self.size, self.crop)
            except Exception as exc:
                self._count_error("preprocess", exc, f"frame {item.frame.seq}")
                continue
            item.t_pre = time.monotonic()
            try:
                maps, scores = self.backend.infer(x[None])
            except Exception as exc:
                self.errors["infer"] += 1
                err = exc
                if not isinstance(exc, LineInspectError):
                    err = BackendError(f"{self.backend.name}: inference failed: {exc}")
                    err.__cause__ = exc
                log.error("fatal: inference failed on frame %d: %s", item.frame.seq, exc)
                self._fail(err)
                break
            item.t_inf = time.monotonic()
            item.amap, item.score = maps[0], float(scores[0])
            # Never drop after inference: the work is done, and post-processing is the cheap part.
            if not self._put(self._q_out, item, drop_oldest=False):
                break

    def _post_loop(self) -> None:
        self._next_metrics = time.monotonic() + self.metrics_interval_s
        while True:
            now = time.monotonic()
            if now >= self._next_metrics:
                self._publish_metrics()
                self._next_metrics = now + self.metrics_interval_s
            try:
                item = self._get(
                    self._q_out, "infer", min(POLL_S, max(0.0, self._next_metrics - now))
                )
            except StopIteration:
                break
            if item is not None:
                self._decide_and_publish(item)
        self._publish_metrics()

    def _decide_and_publish(self, item: _Item) -> None:
        frame = item.frame
        try:
            decision = self.post(item.amap, item.score, frame.image.shape)
        except Exception as exc:
            self._count_error("postprocess", exc, f"frame {frame.seq}")
            return
        t_dec = time.monotonic()
        evidence = None
        if decision.reject and self.evidence is not None:
            try:
                evidence = self.evidence(frame, item.amap.reshape(self.size), decision)
            except Exception as exc:
                self._count_error("postprocess", exc, f"evidence for frame {frame.seq}")
        event = self.event(frame, decision, t_dec - frame.t_mono, evidence)
        try:
            if decision.reject:
                self.publisher.publish_reject(event)
            if self.publish_results:
                self.publisher.publish_result(
                    {**event, "decision": "reject" if decision.reject else "pass"}
                )
        except Exception as exc:
            # Counted and logged loudly; the spool (if it got that far) still holds the event.
            self._count_error("publish", exc, f"frame {frame.seq} part {frame.part_id}")
        t_pub = time.monotonic()

        self.frames += 1
        self.rejects += int(decision.reject)
        self._scores.append(decision.score)
        if self._t_first is None:
            self._t_first = frame.t_mono
        self._t_last = t_pub
        lat = self.latency
        lat.add("preprocess", item.t_pre - frame.t_mono)
        lat.add("infer", item.t_inf - item.t_pre)
        lat.add("postprocess", t_dec - item.t_inf)
        lat.add("publish", t_pub - t_dec)
        lat.add("decision", t_dec - frame.t_mono)
        lat.add("total", t_pub - frame.t_mono)

    def event(
        self, frame: Frame, decision: Decision, latency_s: float, evidence: str | None = None
    ) -> dict[str, Any]:
        """The reject event payload (the result event adds "decision")."""
        return {
            "event_id": str(uuid.uuid4()),
            "station": self.station,
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

    # ------------------------------------------------------------------ reporting
    def _publish_metrics(self) -> None:
        try:
            self.publisher.publish_metrics(self.metrics())
        except Exception as exc:
            self._count_error("metrics", exc, "publish_metrics")

    def metrics(self) -> dict[str, Any]:
        """Periodic metrics: fps over the last interval, drops, errors, latency and score stats."""
        now = time.monotonic()
        dt = max(now - self._metrics_t, 1e-9)
        fps = (self.frames - self._metrics_frames) / dt
        self._metrics_t, self._metrics_frames = now, self.frames
        scores = np.fromiter(self._scores, float, len(self._scores))
        return {
            "time": time.time(),
            "uptime_s": round(now - self._t_start, 3),
            "fps": round(fps, 3),
            "frames": self.frames,
            "rejects": self.rejects,
            "reject_rate": round(self.rejects / self.frames, 6) if self.frames else 0.0,
            "drops": self._drops_total(),
            "errors": dict(self.errors),
            "queues": [self._q_in.qsize(), self._q_out.qsize()],
            "latency_ms": self.latency.percentiles(),
            "score_quantiles": _quantiles(scores),
        }

    def _drops_total(self) -> int:
        return self.drops + int(self._source_stats().get("dropped", 0))

    def _source_stats(self) -> dict[str, Any]:
        try:
            return self.source.stats()
        except Exception:
            return {}

    def summary(self) -> dict[str, Any]:
        """Run summary: counts, throughput (first capture -> last publish), latency percentiles."""
        busy = (self._t_last - self._t_first) if self._t_first is not None else 0.0
        try:
            pub_stats = self.publisher.stats()
        except Exception:
            pub_stats = {}
        return {
            "frames": self.frames,
            "captured": self.captured,
            "rejects": self.rejects,
            "passes": self.frames - self.rejects,
            "drops": self._drops_total(),
            "drops_queue": self.drops,
            "errors": sum(self.errors.values()),
            "errors_by_stage": dict(self.errors),
            "fps": round(self.frames / busy, 3) if busy > 0 else 0.0,
            "elapsed_s": round(time.monotonic() - self._t_start, 3) if self._t_start else 0.0,
            "latency_ms": self.latency.percentiles(),
            "source": self._source_stats(),
            "publisher": pub_stats,
            "mode": self.mode,
        }


Station = Pipeline  # the name the design uses for "one inspection station's runtime"
