"""The seams a station runs through, as Protocols: what the runtime needs of each, nothing more.

    Source        a camera or a replay (edge.sources)           read one frame, stats
    Backend       a loaded model (edge.backends)                one batch in, maps + scores out
    Publisher     where decisions go (edge.mqtt.Publisher)      rejects (durable), results,
                                                                metrics, flush, stats
    EvidenceSink  what is kept of each part (edge.evidence)     offer (cheap), start, close
    Output        a receiver of every verdict (edge.outputs:    deliver (in order, never
                  MQTT, OPC UA)                                 blocking), status, health,
                                                                flush, close

Implementations are checked against these by shared contract tests (tests/test_backends.py,
tests/test_sources.py, tests/test_ports.py, tests/test_outputs.py); the runtime (edge.runtime) types its collaborators
with them. Optional members, read with getattr by the runtime, are named in each docstring.
"""

from __future__ import annotations

from typing import Any, Protocol

from edge.backends.base import Backend
from edge.sources import Source

__all__ = ["Backend", "EvidenceSink", "Output", "Publisher", "Source"]


class Publisher(Protocol):
    """Station outputs. publish_reject returns only once the event is durable (spooled or
    acknowledged) and raises when it is not; the others are best effort.

    Optional: `ack_latency` (edge.metrics.LatencyWindows of capture -> PUBACK),
    `publish_heartbeat(info) -> bool`, `raise_alarm(kind, text)`, `clear_alarm(kind)`."""

    def publish_reject(self, event: dict, t_capture: float | None = None) -> None: ...

    def publish_result(self, event: dict, t_capture: float | None = None) -> bool: ...

    def publish_metrics(self, metrics: dict, /) -> bool: ...

    def flush(self, timeout_s: float) -> bool: ...

    def close(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class EvidenceSink(Protocol):
    """Evidence and recalibration samples. `offer` runs on the decision path: it only samples
    and enqueues, and returns the evidence file the event will name (or None)."""

    def offer(self, frame: Any, amap: Any, decision: Any, event: dict, view: Any, th: dict, /):
        """frame, (H,W) anomaly map, Decision, the event, the (x,y,w,h) model view, the
        thresholds in force -> the evidence file the event will name, or None."""
        ...

    def start(self) -> None: ...

    def close(self, timeout_s: float = 10.0) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class Output(Protocol):
    """One destination of the station's verdicts (edge.outputs.Outputs fans every decided part
    out to all of them, in decision order). `deliver` takes a result event (the reject event
    plus "decision": "reject" | "pass") and must not block the decision path: a remote peer is
    served from the output's own bounded queue. It raises only when the verdict was refused
    (counted and alarmed by the output itself). `publish_status` carries the station's status
    (state, heartbeat, counters, alarm text), best effort. `health()` is what `status`,
    metrics and `edge check` show: at least {"output", "state", "alarm"}.

    Optional: `latency` (edge.metrics.LatencyWindows, decision -> delivered)."""

    name: str

    def deliver(self, verdict: dict, t_capture: float | None = None) -> None: ...

    def publish_status(self, status: dict, /) -> None: ...

    def health(self) -> dict[str, Any]: ...

    def flush(self, timeout_s: float) -> bool: ...

    def close(self) -> None: ...
