"""`Outputs`: the station's publisher when it has outputs besides MQTT. It fans every decided
part out to every output, in decision order, and is an edge.ports.Publisher to the station, so
status, heartbeat, alarms, metrics, flush and close reach the MQTT publisher as before.

    station ──deliver(verdict)──► MqttOutput    (decision thread: publish, spool; as before)
                               └► QueuedOutput  (own bounded queue + thread: OPC UA, ...)

Each output is tried on its own: one that raises is counted and reported after the others had
the verdict, so a failing output never costs another its verdict. Every output's health goes
into the heartbeat on the retained `status` topic, into `metrics` (key "outputs") and into
stats(); its alarms are the publisher's (retained status `alarm`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from edge.errors import OutputError
from edge.outputs.mqtt import MqttOutput

if TYPE_CHECKING:
    from edge.ports import Output, Publisher

log = logging.getLogger("edge.outputs")

STATUS_COUNTERS = ("frames", "rejects", "unverified", "uptime_s", "last_decided", "stalled")


class Outputs:
    def __init__(self, publisher: Publisher, others: list[Output], results: bool = False):
        self.publisher = publisher
        self.outputs: list[Output] = [MqttOutput(publisher, results), *others]
        self.ack_latency = _AllWindows(self.outputs)

    # -- every part ------------------------------------------------------------------------------
    def deliver(self, verdict: dict, t_capture: float | None = None) -> None:
        failed = []
        for out in self.outputs:
            try:
                out.deliver(verdict, t_capture=t_capture)
            except Exception as exc:
                failed.append(f"{out.name}: {exc}")
        if failed:
            raise OutputError("; ".join(failed))

    # -- edge.ports.Publisher: the MQTT publisher's, plus the outputs' health ----------------
    def publish_reject(self, event: dict, t_capture: float | None = None) -> None:
        self.publisher.publish_reject(event, t_capture=t_capture)

    def publish_result(self, event: dict, t_capture: float | None = None) -> bool:
        return self.publisher.publish_result(event, t_capture=t_capture)

    def publish_metrics(self, metrics: dict, /) -> bool:
        return self.publisher.publish_metrics({**metrics, "outputs": self.health()})

    def publish_heartbeat(self, info: dict) -> bool:
        health = self.health()
        status = {
            "state": "online",
            "time": time.time(),
            "alarm": self._alarm_text(),
            **{k: info[k] for k in STATUS_COUNTERS if k in info},
        }
        beat = getattr(self.publisher, "publish_heartbeat", None)
        brief = {k: {"state": h["state"], "queued": h.get("queued")} for k, h in health.items()}
        sent = bool(beat({**info, "outputs": brief})) if beat is not None else False
        for out in self.outputs[1:]:
            try:
                out.publish_status(status)
            except Exception as exc:  # its health says it is down; the heartbeat goes on
                log.error("%s: status not taken: %s", out.name, exc)
        return sent

    def raise_alarm(self, kind: str, text: str) -> None:
        self.publisher.raise_alarm(kind, text)

    def clear_alarm(self, kind: str) -> None:
        self.publisher.clear_alarm(kind)

    def alarm(self, kind: str, text: str | None) -> None:
        """The outputs' alarm sink (edge.outputs.queued.AlarmSink)."""
        if text is None:
            self.clear_alarm(kind)
        else:
            self.raise_alarm(kind, text)

    def flush(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        ok = True
        for out in self.outputs:
            ok = out.flush(max(0.0, deadline - time.monotonic())) and ok
        return ok

    def close(self) -> None:
        # The others first: their last alarms still go out over MQTT.
        for out in self.outputs[1:]:
            out.close()
        self.publisher.close()

    def stats(self) -> dict[str, Any]:
        return {**self.publisher.stats(), "outputs": self.health()}

    def health(self) -> dict[str, dict[str, Any]]:
        return {out.name: out.health() for out in self.outputs}

    def _alarm_text(self) -> str | None:
        alarms = getattr(self.publisher, "alarms", None)
        return "; ".join(alarms().values()) or None if alarms is not None else None

    def __getattr__(self, name: str) -> Any:
        # The rest of the MQTT publisher (connected, spool, topics: tests and `edge check`).
        if name == "publisher":
            raise AttributeError(name)
        return getattr(self.publisher, name)


class _AllWindows:
    """The publisher's capture -> PUBACK windows and each queued output's decision -> written
    window, as one `ack_latency` for the station's latency percentiles."""

    def __init__(self, outputs: list[Output]):
        self.outputs = outputs

    def percentiles(self) -> dict[str, dict[str, float | None]]:
        out: dict[str, dict[str, float | None]] = {}
        mqtt = getattr(self.outputs[0], "publisher", None)
        for windows in [getattr(mqtt, "ack_latency", None)] + [
            getattr(o, "latency", None) for o in self.outputs[1:]
        ]:
            if windows is not None:
                out.update(windows.percentiles())
        return out
