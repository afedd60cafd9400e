"""One camera's runtime: the capture thread (read, decode, crop/resize) and the post thread
(regions, decision, evidence, publish). Inference happens between them, on the engine
(edge/runtime/engine.py) the station is attached to.

No verdict means reject (edge/verdict.py): a frame that cannot be decoded (triggered mode) or
preprocessed, a failed inference, a non-finite model output or a failed post-processing gives
the part an `unverified` reject with the cause, published like any other reject and counted
(`unverified`); `on_error: pass` (explicit, warned at start) lets such parts through instead.
Counts live in one locked `Counters` (edge/runtime/counters.py), which also builds the reports.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from edge.errors import InvalidValue, SourceError
from edge.liveness import Liveness
from edge.metrics import LatencyWindows
from edge.outputs.mqtt import MqttOutput
from edge.postprocess import Decision, PostProcessor
from edge.preprocess import to_input
from edge.reload import ThresholdsWatcher
from edge.runtime import counters
from edge.runtime.counters import Counters
from edge.runtime.inbox import POLL_S, Control, Item
from edge.sources import EndOfStream, Frame
from edge.verdict import ON_ERROR, unverified

if TYPE_CHECKING:
    from edge.ports import EvidenceSink, Publisher, Source
    from edge.runtime.engine import Engine

log = logging.getLogger("edge.pipeline")

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


@dataclass
class StationSettings:
    """What a station is told besides its collaborators (edge.runtime.plan fills it from a
    StationConfig; tests write it as keyword arguments of Station or Pipeline).

    size: (H, W) model input. crop: (x, y, w, h) frame crop before resizing, or None.
    station, line: ids written into every event. model: {"name", "sha256"} for events.
    mode: "triggered" (never drop) | "continuous" (drop oldest under overload).
    queue_size: capacity of the station's inbox and output queue.
    read_timeout_s: source.read timeout (bounds how long stop() waits on an idle camera).
    metrics_interval_s: period of publish_metrics. publish_results: also publish_result for
    every part. max_frames: stop capture after this many frames (None = no limit).
    window: length of each rolling latency/score window (bounded memory).
    on_error: "reject" (a part without a valid verdict is rejected as unverified) or "pass"
    (it is only counted: the part goes through). heartbeat_s, stall_s: edge/liveness.py.
    """

    size: tuple[int, int]
    station: str = "station1"
    line: str = "line1"
    model: dict[str, str] | None = None
    crop: tuple[int, int, int, int] | list[int] | None = None
    mode: str = "triggered"
    queue_size: int = 4
    read_timeout_s: float = 1.0
    metrics_interval_s: float = 10.0
    publish_results: bool = False
    max_frames: int | None = None
    window: int = 2048
    on_error: str = "reject"
    heartbeat_s: float = 5.0
    stall_s: float = 10.0

    def __post_init__(self) -> None:
        if self.mode not in ("triggered", "continuous"):
            raise InvalidValue(f"mode: expected triggered or continuous, got {self.mode!r}")
        if self.on_error not in ON_ERROR:
            raise InvalidValue(f"on_error: expected one of {ON_ERROR}, got {self.on_error!r}")
        self.size = tuple(self.size)
        self.crop = tuple(self.crop) if self.crop is not None else None
        self.model = dict(self.model or {"name": "", "sha256": ""})


class Station:
    """One camera's runtime: capture (+preprocess) and post-processing (+publish) threads.

    Args:
        source: an opened source (edge.ports.Source).
        postprocessor: edge.postprocess.PostProcessor for the model's resolution.
        publisher: edge.mqtt.Publisher (started), or any edge.ports.Publisher.
        evidence: edge.evidence.EvidenceWriter (an edge.ports.EvidenceSink) or None.
        watcher: edge.reload.ThresholdsWatcher or None (no hot reload).
        settings: StationSettings, or its fields as keyword arguments.
    """

    def __init__(
        self,
        *,
        source: Source,
        postprocessor: PostProcessor,
        publisher: Publisher,
        evidence: EvidenceSink | None = None,
        watcher: ThresholdsWatcher | None = None,
        settings: StationSettings | None = None,
        **fields: Any,
    ):
        s = settings if settings is not None else StationSettings(**fields)
        self.settings = s
        self.source, self.post, self.publisher = source, postprocessor, publisher
        # edge.outputs.Outputs delivers every part to every output; a bare publisher (tests,
        # MQTT only) is served as the MQTT output would serve it.
        self.deliver: Callable[..., None] = getattr(publisher, "deliver", None) or (
            MqttOutput(publisher, s.publish_results).deliver
        )
        self.evidence = evidence
        self.watcher = watcher
        self.on_error = s.on_error
        self.size, self.crop = s.size, s.crop
        self.name, self.line, self.model = s.station, s.line, s.model
        self.mode = s.mode
        self.queue_size = s.queue_size
        self.read_timeout_s = s.read_timeout_s
        self.metrics_interval_s = s.metrics_interval_s
        self.max_frames = s.max_frames
        self.engine: Engine | None = None
        self.key = -1
        self.q_out: queue.Queue[Item] = queue.Queue(maxsize=s.queue_size)
        self.latency = LatencyWindows(STAGES, s.window)
        self.counters = Counters(s.window)
        self.liveness = Liveness(self, s.heartbeat_s, s.stall_s)
        self.threads: dict[str, threading.Thread] = {}
        # After each part is published: (frame, (H*W,) map or None, Decision, event) -> None.
        # The drift watch and the operator view's tap; each must be cheap and never block
        # (edge/drift.py, edge/ui/feed.py). A failing one is counted, the line goes on.
        self.observers: list[Callable[[Frame, Any, Decision, dict], None]] = []
        self.drift: Any = None  # edge.drift.DriftWatch when the station watches for drift

    @property
    def label(self) -> str:
        return f"{self.line}/{self.name}"

    # Counts, read by liveness, the reports and tests; written only through self.counters.
    captured = property(lambda self: self.counters["captured"])
    frames = property(lambda self: self.counters["frames"])
    rejects = property(lambda self: self.counters["rejects"])
    unverified = property(lambda self: self.counters["unverified"])
    unverified_passed = property(lambda self: self.counters["unverified_passed"])
    drops = property(lambda self: self.counters["drops"])
    drained_after_stop = property(lambda self: self.counters["drained_after_stop"])
    errors = property(lambda self: self.counters.errors)
    last_cause = property(lambda self: self.counters.last_cause)

    def count_error(self, stage: str, exc: BaseException, what: str) -> None:
        n = self.counters.error(stage)
        # Log the first few in full, then every 100th, so a persistent fault cannot flood the log.
        if n <= 5 or n % 100 == 0:
            log.error("%s: %s error #%d (%s): %s", self.label, stage, n, what, exc)

    # ------------------------------------------------------------------ capture thread
    def capture_loop(self, ctl: Control) -> None:
        try:
            self._capture(ctl)
        finally:
            self.engine.inbox.close(self.key)

    def _capture(self, ctl: Control) -> None:
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
                self.count_error("capture", exc, "source.read")
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

    def _take_buffered(self, ctl: Control) -> None:
        """After stop on a triggered line: inspect the frames a live camera already delivered."""
        stop_capture = getattr(self.source, "stop_capture", None)
        if stop_capture is None:
            return  # a file has no "already captured" frames beyond what we read
        stop_capture()
        while self.max_frames is None or self.captured < self.max_frames:
            try:
                frame = self.source.read(0)
            except Exception as exc:
                self.count_error("capture", exc, "reading buffered frames after stop")
                break
            if frame is None or not self._submit(frame, ctl):
                break
            self.counters.add("drained_after_stop")
        if self.drained_after_stop:
            log.info(
                "%s: %d buffered frame(s) inspected after stop", self.label, self.drained_after_stop
            )

    def _submit(self, frame: Frame, ctl: Control) -> bool:
        """Preprocess and queue one captured frame. False only when aborting."""
        self.counters.add("captured")
        x, cause = None, None
        if getattr(frame, "error", None):
            cause = f"undecodable frame: {frame.error}"
            self.count_error("capture", SourceError(frame.error), f"frame {frame.seq}")
        else:
            try:
                x = to_input(frame.image, self.size, self.crop)
            except Exception as exc:
                self.count_error("preprocess", exc, f"frame {frame.seq}")
                cause = f"preprocess failed: {' '.join(str(exc).split())[:300]}"
        if cause is not None and self.on_error == "pass":
            self.counters.unverified(cause, passed=True)
            return True  # on_error: pass: counted, the part gets no reject
        # An unverified item still queues in frame order; the engine passes it on uninferred.
        item = Item(frame, self, x, t_pre=time.monotonic(), cause=cause)
        ok, dropped = self.engine.inbox.put(self.key, item, self.mode == "continuous", ctl.abort)
        if dropped:
            self.counters.add("drops", dropped)
        return ok

    # ------------------------------------------------------------------ engine -> post
    def put_out(self, item: Item, ctl: Control) -> bool:
        while not ctl.abort.is_set():
            try:
                self.q_out.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    # ------------------------------------------------------------------ post thread
    def post_loop(self, ctl: Control) -> None:
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

    def _decide_and_publish(self, item: Item) -> None:
        frame = item.frame
        item.t_post0 = time.monotonic()
        cpu0 = time.thread_time()
        if item.cause is not None:
            decision = unverified(item.cause)
        else:
            try:
                decision = self.post(item.amap, item.score, frame.image.shape)
            except Exception as exc:
                self.count_error("postprocess", exc, f"frame {frame.seq}")
                decision = unverified(f"postprocess failed: {' '.join(str(exc).split())[:300]}")
        if decision.cause is not None:
            passed = self.on_error == "pass"
            self.counters.unverified(decision.cause, passed)
            if passed:
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
                self.count_error("evidence", exc, f"frame {frame.seq}")
        # One way out for every part: the outputs' deliver (edge.outputs: the MQTT result first,
        # then the reject, spooled; then OPC UA and the other configured outputs).
        verdict = {**event, "decision": "reject" if decision.reject else "pass"}
        self._send(self.deliver, verdict, frame)
        t_pub = time.monotonic()

        self.counters.decided(decision.reject, decision.score, frame.t_mono, t_pub)
        self.liveness.decided(frame)
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
        for observe in self.observers:
            try:
                observe(frame, item.amap, decision, event)
            except Exception as exc:
                self.count_error("observer", exc, f"frame {frame.seq}")

    def _send(self, publish: Callable[..., Any], event: dict, frame: Frame) -> None:
        try:
            publish(event, t_capture=frame.t_mono)
        except Exception as exc:
            # Counted and logged loudly; the spool (if it got that far) still holds the event.
            self.count_error("publish", exc, f"frame {frame.seq} part {frame.part_id}")

    @staticmethod
    def _stages_ms(item: Item) -> dict[str, float]:
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
            self.count_error("metrics", exc, "publish_metrics")

    def metrics(self) -> dict[str, Any]:
        """Periodic metrics (also advances the fps interval): edge.runtime.counters.metrics."""
        return counters.metrics(self)

    def snapshot(self, publisher_stats: bool = True) -> dict[str, Any]:
        """Current metrics without side effects (safe from another thread, e.g. Prometheus)."""
        return counters.snapshot(self, publisher_stats)

    def summary(self) -> dict[str, Any]:
        """Run summary: counts, throughput, latency percentiles."""
        return counters.summary(self)

    def queue_sizes(self) -> list[int]:
        return [self.engine.inbox.qsize(self.key) if self.engine else 0, self.q_out.qsize()]

    def latency_percentiles(self) -> dict[str, dict[str, float | None]]:
        """The stage windows plus the publisher's capture -> PUBACK windows (when it has them)."""
        out = self.latency.percentiles()
        acks = getattr(self.publisher, "ack_latency", None)
        if acks is not None:
            out.update(acks.percentiles())
        return out

    def snapshot_thresholds(self) -> dict[str, Any]:
        """Thresholds in force and the hot-reload counters."""
        th = self.thresholds_dict()
        w = self.watcher
        th.update(reloads=w.reloads if w else 0, refused=w.refused if w else 0)
        return th
