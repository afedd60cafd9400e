"""MQTT as an output (edge.ports.Output): the station's own edge.mqtt.Publisher.

It is served on the decision thread, as before outputs existed: `publish_reject` returns once
the event is on the wire and in the SQLite spool, so the spool is this output's queue (bounded
by mqtt.spool_max_events, alarmed at 50/90/100 %) and a broker outage never blocks the caller.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge.errors import OutputError

if TYPE_CHECKING:
    from edge.ports import Publisher


class MqttOutput:
    name = "mqtt"

    def __init__(self, publisher: Publisher, results: bool = False):
        self.publisher = publisher
        self.results = results  # mqtt.publish_results: every part on <base>/result too

    def deliver(self, verdict: dict, t_capture: float | None = None) -> None:
        """The result first (when enabled), then the reject: separate attempts, so a failed
        result never costs the reject; a reject that cannot be spooled raises."""
        result_error: Exception | None = None
        if self.results:
            try:
                self.publisher.publish_result(verdict, t_capture=t_capture)
            except Exception as exc:  # raised after the reject had its own attempt
                result_error = exc
        if verdict["decision"] == "reject":
            event = {k: v for k, v in verdict.items() if k != "decision"}
            try:
                self.publisher.publish_reject(event, t_capture=t_capture)
            except Exception as exc:
                if result_error is None:
                    raise
                raise OutputError(f"reject: {exc}; result: {result_error}") from exc
        if result_error is not None:
            raise result_error

    def publish_status(self, status: dict, /) -> None:
        """The retained status is the publisher's own (heartbeat, alarms): nothing to add."""

    def health(self) -> dict[str, Any]:
        s = self.publisher.stats()
        state = "up" if s.get("connected") else "down"
        return {
            "output": self.name,
            "state": state,
            "alarm": s.get("alarm"),
            "queued": s.get("spooled", 0),
            "delivered": s.get("acked", 0),
        }

    def flush(self, timeout_s: float) -> bool:
        return self.publisher.flush(timeout_s)

    def close(self) -> None:
        self.publisher.close()
