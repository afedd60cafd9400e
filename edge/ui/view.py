"""The operator view of one station process: feeds on every station, the encoder, the server.

    view = OperatorView(cfg.ui, token)      # binds the port (fails before anything opens)
    view.attach(pipeline.stations)          # a ViewFeed observer on each station
    view.start() ... view.close()

Read-only by construction: nothing here holds a reference that could change the line (no
thresholds writes, no stop); the page only reads what the stations already count.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any

from edge.errors import ConfigError
from edge.ui.feed import Encoder, Hub, ViewFeed, public

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, treat it as exposed


class OperatorView:
    """Args: settings: edge.config.UiConfig (port must be set); token: the credentials file's
    ui_token or None. Raises ConfigError for an exposed address without a token, or a port
    that cannot be bound."""

    def __init__(self, settings: Any, token: str | None = None) -> None:
        from edge.ui.http import ViewServer

        if settings.port is None:
            raise ConfigError("ui.port: not set (give --ui-port N or ui.port in the config)")
        if not is_loopback(settings.host) and not token:
            raise ConfigError(
                f"ui.host {settings.host}: the view is exposed beyond this machine; it needs "
                "ui_token in the station's credentials_file (mode 600)"
            )
        self.settings = settings
        self.hub = Hub()
        self.encoder = Encoder(self.hub, settings.max_width, settings.jpeg_quality, self.status)
        self.feeds: list[ViewFeed] = []
        self.server = ViewServer(self, settings, token)
        self.port = self.server.port
        self.t_start = time.time()

    def attach(self, stations: list[Any]) -> None:
        for i, st in enumerate(stations):
            feed = ViewFeed(i, st, self.encoder, self.settings.fps, self.settings.gallery)
            self.feeds.append(feed)
            st.observers.append(feed.on_part)
        self.encoder.feeds = self.feeds

    def start(self) -> OperatorView:
        self.encoder.start()
        self.server.start()
        return self

    def close(self) -> None:
        self.server.close()
        self.encoder.close()

    # ------------------------------------------------------------------ what the page reads
    def state(self) -> dict[str, Any]:
        """Everything a page needs when it opens; afterwards the event stream updates it."""
        cams = []
        for f in self.feeds:
            cams.append(
                {
                    **self._camera(f),
                    "scores": [list(p) for p in list(f.scores)],
                    "last_frame": f.last_frame,
                }
            )
        rejects = sorted(
            (public(r) for f in self.feeds for r in list(f.rejects)), key=lambda r: r["id"]
        )
        return {"cameras": cams, "rejects": rejects, "status": self.status()}

    def _camera(self, f: ViewFeed) -> dict[str, Any]:
        st = f.station
        th = st.watcher.current if st.watcher is not None else None
        good = ((th.stats if th is not None else None) or {}).get("good") or {}
        return {
            "cam": f.cam,
            "label": st.label,
            "image_threshold": st.post.image_threshold,
            "pixel_threshold": st.post.pixel_threshold,
            "good_band": [good.get("p50"), good.get("p99")] if good else None,
            "evidence": st.evidence is not None
            and getattr(st.evidence, "evidence", None) is not None,
        }

    def status(self) -> dict[str, Any]:
        """Per station: alarms, counters, per-stage latency; the scores since the last status."""
        out = []
        for f in self.feeds:
            st = f.station
            snap = st.snapshot()
            mqtt = snap.get("mqtt") or {}
            alarms = _alarms(st, snap, mqtt)
            new = []
            while f.new_scores:
                new.append(list(f.new_scores.popleft()))
            lat = snap["latency_ms"]
            out.append(
                {
                    **self._camera(f),
                    "ok": not alarms,
                    "alarms": alarms,
                    "fps": snap["fps"],
                    "counters": {
                        k: snap[k] for k in ("frames", "rejects", "unverified", "drops", "captured")
                    },
                    "errors": sum(snap["errors"].values()),
                    "reject_rate": snap["reject_rate"],
                    "latency_ms": {k: v for k, v in lat.items() if v.get("p50") is not None},
                    "broker": {k: mqtt.get(k) for k in ("connected", "spooled", "spool_fill")},
                    "drift": snap.get("drift"),
                    "new_scores": new,
                }
            )
        return {
            "time": time.time(),
            "stations": out,
            "viewers": self.hub.viewers,
            "view": {"encoded": self.encoder.encoded, "dropped": self.encoder.dropped},
        }


def _alarms(st: Any, snap: dict[str, Any], mqtt: dict[str, Any]) -> list[dict[str, str]]:
    """broker, spool, camera, stalled, drift (and any other publisher alarm), worst first."""
    out = []
    if mqtt and not mqtt.get("connected"):
        out.append({"kind": "broker", "text": "not connected to the MQTT broker; rejects spool"})
    held = st.publisher.alarms() if hasattr(st.publisher, "alarms") else {}
    text = mqtt.get("alarm") or ""
    spool = [t for t in text.split("; ") if t.startswith("spool ") and t.endswith("% full")]
    out += [{"kind": "spool", "text": t} for t in spool]
    source = snap.get("source") or {}
    if source.get("connected") is False:
        why = source.get("last_error") or "no frames"
        out.append({"kind": "camera", "text": f"camera not delivering: {why}"})
    if st.liveness.stalled and "stalled" not in held:
        out.append({"kind": "stalled", "text": "stalled: frames captured but not decided"})
    drift = snap.get("drift") or {}
    if drift.get("raised") and "drift" not in held:
        out.append({"kind": "drift", "text": drift.get("text") or "drift"})
    out += [{"kind": k, "text": t} for k, t in held.items()]
    return out
