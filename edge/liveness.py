"""Liveness: heartbeat on `status`, a `stalled` alarm, and the systemd watchdog.

`Liveness.tick()` runs on a station's post thread between frames (so a post thread that is
itself wedged stops the heartbeat: silence is the alarm the gate watches for):
- every `heartbeat_s` a retained `online` status with uptime, the last decided frame and the
  counters (`Publisher.publish_heartbeat`);
- `stalled`: the source delivered frames (captured moved) but none was decided for `stall_s`
  seconds; raised on status as an alarm, cleared when decisions resume.

`sd_notify` writes systemd's notify datagrams when NOTIFY_SOCKET is set (no dependency):
READY=1 once the pipeline runs, WATCHDOG=1 from `Pipeline.run` only while every station is
healthy (deciding, or idle with nothing captured waiting), so a wedged pipeline is restarted
by systemd's WatchdogSec even though the process is alive.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

log = logging.getLogger(__name__)


def sd_notify(message: str) -> bool:
    """Send one datagram to $NOTIFY_SOCKET; False when not under systemd (or it failed)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(addr)
            sock.sendall(message.encode())
    except OSError as exc:
        log.error("sd_notify(%s) to %s failed: %s", message, os.environ["NOTIFY_SOCKET"], exc)
        return False
    return True


class Liveness:
    """Heartbeat and stall watch of one station (see the module doc)."""

    def __init__(self, station: Any, heartbeat_s: float = 5.0, stall_s: float = 10.0) -> None:
        self.st = station
        self.heartbeat_s = heartbeat_s
        self.stall_s = stall_s
        self._next_beat = 0.0
        self._seen = (-1, -1)  # (captured, frames) at the last progress
        self._progress_t = time.monotonic()
        self.stalled = False
        self.last_decided: dict[str, Any] | None = None

    def decided(self, frame: Any) -> None:
        self.last_decided = {
            "frame": frame.seq,
            "part_id": frame.part_id,
            "time": round(time.time(), 3),
        }

    def healthy(self) -> bool:
        return not self.stalled

    def tick(self, now: float) -> None:
        st = self.st
        captured, frames = st.captured, st.frames
        if frames != self._seen[1] or captured <= frames + st.unverified_passed:
            # Deciding, or idle with nothing waiting: healthy.
            self._progress_t = now
            if self.stalled:
                self.stalled = False
                self._alarm(None)
        elif now - self._progress_t >= self.stall_s and not self.stalled:
            self.stalled = True
            self._alarm(
                f"stalled: {captured - frames} captured frame(s) not decided for "
                f"{now - self._progress_t:.0f} s (last decided {self.last_decided})"
            )
        self._seen = (captured, frames)
        if now >= self._next_beat:
            self._next_beat = now + self.heartbeat_s
            beat = getattr(st.publisher, "publish_heartbeat", None)
            if beat is not None:
                beat(
                    {
                        "uptime_s": round(now - st.counters.t_start, 1)
                        if st.counters.t_start
                        else 0.0,
                        "last_decided": self.last_decided,
                        "frames": frames,
                        "captured": captured,
                        "rejects": st.rejects,
                        "unverified": st.unverified,
                        "stalled": self.stalled,
                    }
                )

    def _alarm(self, text: str | None) -> None:
        pub = self.st.publisher
        if text is None:
            log.warning("%s: decisions resumed", self.st.label)
            if hasattr(pub, "clear_alarm"):
                pub.clear_alarm("stalled")
        else:
            log.error("%s: %s", self.st.label, text)
            if hasattr(pub, "raise_alarm"):
                pub.raise_alarm("stalled", text)
