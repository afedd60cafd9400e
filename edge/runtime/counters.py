"""One station's counters under one lock, and the three reports read from them.

The capture, engine and post threads write the counts; the post thread's periodic MQTT
metrics, the Prometheus endpoint (another thread) and the run summary read them. Every read
takes one consistent `Counters.snapshot()`, so the three reports never disagree, and a report
never changes a count (a failed `source.stats()` or `publisher.stats()` is counted as a
`metrics` error through the same lock).

    metrics(st)    the periodic MQTT metrics (advances the fps interval; edge/schemas/metrics.json)
    snapshot(st)   the same without side effects, plus the publisher's stats (Prometheus)
    summary(st)    the run summary (counts, throughput, latency percentiles)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from edge.metrics import quantiles

if TYPE_CHECKING:
    from edge.runtime.station import Station

ERROR_STAGES = (
    "capture",
    "preprocess",
    "infer",
    "postprocess",
    "evidence",
    "publish",
    "metrics",
    "observer",  # a Station.observers hook (drift watch, operator view) failed
)
COUNTS = (
    "captured",  # frames read from the source
    "frames",  # parts decided (published, or let through by on_error: pass)
    "rejects",
    "unverified",  # parts without a valid verdict (rejected, or passed by on_error)
    "unverified_passed",  # of those, let through by on_error: pass (no decision)
    "drops",  # frames dropped from a full inbox (continuous mode)
    "drained_after_stop",  # buffered frames inspected after stop (triggered mode)
)


class Counters:
    """Counts, error counts per stage, and the recent-decision windows of one station."""

    def __init__(self, window: int = 2048) -> None:
        self._lock = threading.Lock()
        self._n = dict.fromkeys(COUNTS, 0)
        self._errors = dict.fromkeys(ERROR_STAGES, 0)
        self._last_cause: str | None = None
        self._good_scores: deque[float] = deque(maxlen=window)
        self._recent: deque[bool] = deque(maxlen=window)  # reject flags of recent parts
        self.t_start = 0.0
        self._t_first: float | None = None
        self._t_last = 0.0
        self._fps = 0.0
        self._fps_t = 0.0
        self._fps_frames = 0

    def __getitem__(self, name: str) -> int:
        return self._n[name]

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._n[name] += n

    def error(self, stage: str) -> int:
        """Count one error of `stage`; returns how many that stage has had."""
        with self._lock:
            self._errors[stage] += 1
            return self._errors[stage]

    @property
    def errors(self) -> dict[str, int]:
        with self._lock:
            return dict(self._errors)

    @property
    def last_cause(self) -> str | None:
        return self._last_cause

    def unverified(self, cause: str | None, passed: bool) -> None:
        with self._lock:
            self._n["unverified"] += 1
            self._n["unverified_passed"] += int(passed)
            if cause is not None:
                self._last_cause = cause

    def decided(self, reject: bool, score: float, t_capture: float, t_done: float) -> None:
        with self._lock:
            self._n["frames"] += 1
            self._n["rejects"] += int(reject)
            self._recent.append(reject)
            if not reject:
                self._good_scores.append(score)
            if self._t_first is None:
                self._t_first = t_capture
            self._t_last = t_done

    def start(self, t0: float) -> None:
        self.t_start = self._fps_t = t0

    def tick_fps(self, now: float) -> None:
        """Close the metrics interval: fps = parts decided since the last tick / its length."""
        with self._lock:
            dt = now - self._fps_t
            if dt > 0:
                self._fps = (self._n["frames"] - self._fps_frames) / dt
            self._fps_t, self._fps_frames = now, self._n["frames"]

    def snapshot(self) -> dict[str, Any]:
        """Every count at one instant, plus the windows' figures."""
        with self._lock:
            recent = list(self._recent)
            good = list(self._good_scores)
            out: dict[str, Any] = dict(self._n)
            out.update(
                errors=dict(self._errors),
                last_cause=self._last_cause,
                fps_interval=self._fps,
                t_first=self._t_first,
                t_last=self._t_last,
            )
        out["reject_rate"] = round(sum(recent) / len(recent), 6) if recent else 0.0
        out["score_quantiles"] = quantiles(good)
        return out


# ------------------------------------------------------------------------------ the reports
def _since(t0: float) -> float:
    return round(time.monotonic() - t0, 3) if t0 else 0.0


def _guarded(st: Station, what: str, fn: Any, default: Any) -> Any:
    try:
        return fn()
    except Exception as exc:
        st.count_error("metrics", exc, what)
        return default


def metrics(st: Station) -> dict[str, Any]:
    """Periodic metrics (also advances the fps interval). The publisher adds its own counters
    under "mqtt" (edge/schemas/metrics.json)."""
    st.counters.tick_fps(time.monotonic())
    return snapshot(st, publisher_stats=False)


def snapshot(st: Station, publisher_stats: bool = True) -> dict[str, Any]:
    """Current metrics without side effects on the counts (safe from another thread).

    publisher_stats: include the publisher's stats() under "mqtt"."""
    c = st.counters.snapshot()
    source = _guarded(st, "source.stats", st.source.stats, {})
    out = {
        "time": time.time(),
        "station": st.name,
        "line": st.line,
        "uptime_s": _since(st.counters.t_start),
        "fps": round(c["fps_interval"], 3),
        "frames": c["frames"],
        "captured": c["captured"],
        "rejects": c["rejects"],
        "unverified": c["unverified"],
        "reject_rate": c["reject_rate"],
        "drops": c["drops"] + int(source.get("dropped", 0)),
        "errors": c["errors"],
        "queues": st.queue_sizes(),
        "latency_ms": st.latency_percentiles(),
        "score_quantiles": c["score_quantiles"],
        "source": source,
        "thresholds": st.snapshot_thresholds(),
    }
    if st.evidence is not None:
        out["evidence"] = st.evidence.stats()
    if st.drift is not None:
        out["drift"] = st.drift.state()
    if publisher_stats:
        mqtt = _guarded(st, "publisher.stats", st.publisher.stats, None)
        if mqtt is not None:
            out["mqtt"] = mqtt
    return out


def summary(st: Station) -> dict[str, Any]:
    """Run summary: counts, throughput (first capture -> last publish), latency percentiles."""
    c = st.counters.snapshot()
    busy = (c["t_last"] - c["t_first"]) if c["t_first"] is not None else 0.0
    pub_stats = _guarded(st, "publisher.stats", st.publisher.stats, {})
    source = _guarded(st, "source.stats", st.source.stats, {})
    frames = c["frames"]
    eng = st.engine
    out = {
        "station": st.name,
        "line": st.line,
        "frames": frames,
        "captured": c["captured"],
        "rejects": c["rejects"],
        "passes": frames - c["rejects"],
        "unverified": c["unverified"],
        "last_unverified_cause": c["last_cause"],
        "drops": c["drops"] + int(source.get("dropped", 0)),
        "drops_queue": c["drops"],
        "drained_after_stop": c["drained_after_stop"],
        "errors": sum(c["errors"].values()),
        "errors_by_stage": c["errors"],
        # frames-1 intervals between the first capture and the last publish
        "fps": round((frames - 1) / busy, 3) if busy > 0 and frames > 1 else 0.0,
        "elapsed_s": _since(st.counters.t_start),
        "latency_ms": st.latency_percentiles(),
        "score_quantiles": c["score_quantiles"],
        "thresholds": st.snapshot_thresholds(),
        "source": source,
        "publisher": pub_stats,
        "mode": st.mode,
        "batch_mean": round(eng.batched_frames / eng.batches, 3) if eng and eng.batches else 0,
    }
    if st.evidence is not None:
        out["evidence"] = st.evidence.stats()
    return out
