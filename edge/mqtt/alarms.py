"""The publisher's alarms: the spool fill level (50 %, 90 %, full) and alarms by kind (a spool
write failing, a spool recovered or recreated, no subscriber, the broker not acknowledging, a
stalled pipeline). All of them go out as one text in the retained status `alarm`.

Not locked itself: the publisher holds its lock around every call.
"""

from __future__ import annotations

import logging
from typing import Any

from edge.mqtt.connection import encode_event, utc_now_iso

log = logging.getLogger("lineinspect.mqtt")

ALARM_LEVELS = (50, 90)  # percent of the spool; 100 = full (publish_reject raises)
_ALARM_CLEAR_MARGIN = 5  # percent below a level before its alarm clears (no flapping)


class Alarms:
    def __init__(self) -> None:
        self.level = 0  # spool fill alarm in force: 0, 50, 90 or 100
        self._kinds: dict[str, str] = {}

    def text(self) -> str | None:
        texts = [f"spool {self.level}% full"] if self.level else []
        texts += self._kinds.values()
        return "; ".join(texts) or None

    def get(self, kind: str) -> str | None:
        return self._kinds.get(kind)

    def __contains__(self, kind: str) -> bool:
        return kind in self._kinds

    def kinds(self) -> dict[str, str]:
        return dict(self._kinds)

    def raise_(self, kind: str, text: str) -> bool:
        """Hold `kind` with `text`; False when it already held that very text."""
        if self._kinds.get(kind) == text:
            return False
        self._kinds[kind] = text
        return True

    def clear(self, kind: str) -> bool:
        """False when `kind` was not held."""
        return self._kinds.pop(kind, None) is not None

    def level_for(self, fill_ratio: float) -> int:
        """The fill alarm for this spool fill: a level is raised when reached and cleared only
        well below it (no flapping around the threshold)."""
        percent = 100.0 * fill_ratio
        level = (
            100 if percent >= 100 else max((lv for lv in ALARM_LEVELS if percent >= lv), default=0)
        )
        if level < self.level:
            held = max(
                (lv for lv in ALARM_LEVELS if percent >= lv - _ALARM_CLEAR_MARGIN), default=0
            )
            level = min(self.level, max(level, held))
        return level


class StatusAndAlarms:
    """The publisher's retained status (online, offline, alarm, heartbeat) and its alarms.

    A base of edge.mqtt.publisher.Publisher: works on its state, under its lock."""

    def _status_payload(self, state: str, **extra: Any) -> bytes:
        payload = {"state": state, **self.status_info, "time": utc_now_iso()}
        alarm = self._alarms.text()
        if alarm:
            payload["alarm"] = alarm
        payload.update({k: v for k, v in extra.items() if v is not None})
        return encode_event(payload)

    # -- alarms ------------------------------------------------------------------------------------

    def raise_alarm(self, kind: str, text: str) -> None:
        """Hold an alarm (logged, and at once on the retained status when connected) until
        clear_alarm(kind). Raising the same text again does nothing."""
        with self._lock:
            if not self._alarms.raise_(kind, text):
                return
            self._publish_status_locked()
        log.error("ALARM %s: %s", kind, text)

    def clear_alarm(self, kind: str) -> None:
        with self._lock:
            if not self._alarms.clear(kind):
                return
            self._publish_status_locked()
        log.warning("alarm %s cleared", kind)

    def alarms(self) -> dict[str, str]:
        with self._lock:
            return self._alarms.kinds()

    def _publish_status_locked(self, **extra: Any) -> None:
        if self._connected and not self._closing:
            self._publish_locked(
                self.topics["status"],
                self._status_payload("online", **extra),
                qos=1,
                retain=self.retain_status,
            )

    def publish_heartbeat(self, info: dict) -> bool:
        """The periodic retained `online` status with the station's liveness figures (QoS 0:
        a broker that stops acknowledging must not fill the in-flight window with them)."""
        with self._lock:
            if not self._connected or self._closing:
                return False
            extra = {"heartbeat": {**info, "seq": self._seq, "bd_seq": self.bd_seq}}
            return (
                self._publish_locked(
                    self.topics["status"],
                    self._status_payload("online", **extra),
                    qos=0,
                    retain=self.retain_status,
                )
                is not None
            )

    def _check_spool_file(self) -> None:
        """A deleted or replaced spool file: recreate it and alarm (events only the lost file
        held are gone; those in flight still reach the broker)."""
        if self.spool.check_file():
            with self._lock:
                self._counts["spool_recreated"] += 1
            self.raise_alarm(
                "spool_recreated",
                f"spool {self.spool.path} was deleted or replaced while running; recreated "
                f"({self.spool.recreated} time(s))",
            )

    def _update_alarm_locked(self) -> None:
        self._set_alarm_locked(self._alarms.level_for(self.spool.fill_ratio))

    def _set_alarm_locked(self, level: int) -> None:
        if level == self._alarms.level:
            return
        raised = level > self._alarms.level
        self._alarms.level = level
        if raised:
            log.warning(
                "spool %s is %d%% full (%d of %d reject events not acknowledged by %s)",
                self.spool.path,
                level,
                len(self.spool),
                self.spool.max_events,
                self.address,
            )
        else:
            log.info("spool %s alarm now: %s", self.spool.path, self._alarms.text() or "cleared")
        if self._connected and not self._closing:
            self._publish_locked(
                self.topics["status"],
                self._status_payload("online"),
                qos=1,
                retain=self.retain_status,
            )
