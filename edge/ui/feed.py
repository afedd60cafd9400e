"""What the operator view shows, produced off the line's threads.

    post thread --Station.observers--> ViewFeed.on_part   (cheap: a time check, appends)
                       |  bounded drop-oldest handoff (Encoder.jobs)
                       v
    ui-encode thread (nice 10): JPEG-encode live frames (at most `fps` per camera, only while
                       a viewer is connected) and rejects (always: the gallery is there when
                       someone opens the page); once a second the status of every station
                       |
                       v
    Hub: a bounded queue per connected viewer (Server-Sent Events); a slow viewer loses its
         oldest messages, never holds anyone up. Images are fetched by URL from small rings.

Nothing here can block the post thread: `on_part` takes one short lock (no I/O, no encoding),
and a full handoff drops the oldest job (counted in `dropped`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from edge.evidence import heatmap_overlay

log = logging.getLogger(__name__)

HANDOFF = 8  # parts waiting for the encoder (each holds a frame reference), oldest dropped
LIVE_KEEP = 4  # encoded live frames kept per camera (a viewer fetches the one it was told of)
SCORES_KEEP = 600  # parts in the strip chart's history
VIEWER_QUEUE = 64  # messages waiting for one viewer; beyond, its oldest are dropped
THUMB_WIDTH = 320


class Hub:
    """Broadcast of server-sent events to the connected viewers, each with its own bounded
    queue. `subscribe` -> a Viewer; the HTTP thread of that viewer drains it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._viewers: set[Viewer] = set()
        self.dropped = 0  # messages a slow viewer never got

    @property
    def viewers(self) -> int:
        return len(self._viewers)

    def subscribe(self) -> Viewer:
        v = Viewer(self)
        with self._lock:
            self._viewers.add(v)
        return v

    def unsubscribe(self, v: Viewer) -> None:
        with self._lock:
            self._viewers.discard(v)

    def publish(self, event: str, data: Any) -> None:
        msg = f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
        with self._lock:
            viewers = list(self._viewers)
        for v in viewers:
            self.dropped += v.put(msg)


class Viewer:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._q: deque[bytes] = deque()
        self._cv = threading.Condition()

    def put(self, msg: bytes) -> int:
        with self._cv:
            dropped = 0
            if len(self._q) >= VIEWER_QUEUE:
                self._q.popleft()
                dropped = 1
            self._q.append(msg)
            self._cv.notify()
        return dropped

    def take(self, timeout: float) -> list[bytes]:
        """Everything queued, waiting up to `timeout` for something ([] on timeout)."""
        with self._cv:
            if not self._q:
                self._cv.wait(timeout)
            out = list(self._q)
            self._q.clear()
        return out


@dataclass
class _Job:
    cam: int
    frame: Any
    amap: np.ndarray | None
    decision: Any
    event: dict
    live: bool
    reject: bool


class ViewFeed:
    """One camera's tap (a Station observer) and what the view keeps of it."""

    def __init__(self, cam: int, station: Any, encoder: Encoder, fps: float, gallery: int) -> None:
        self.cam, self.station, self.encoder = cam, station, encoder
        self.interval = 1.0 / fps
        self._next_live = 0.0
        self.scores: deque[tuple[float, float, bool]] = deque(maxlen=SCORES_KEEP)
        self.new_scores: deque[tuple[float, float, bool]] = deque(maxlen=SCORES_KEEP)
        self.live: deque[tuple[int, bytes, bytes]] = deque(maxlen=LIVE_KEEP)
        self.rejects: deque[dict] = deque(maxlen=gallery)
        self.last_frame: dict | None = None

    def on_part(self, frame: Any, amap: Any, decision: Any, event: dict) -> None:
        """Post thread, after the part was published: record its score; hand over a frame when
        one is due (a viewer is watching) or the part was rejected."""
        point = (round(time.time(), 3), float(decision.score), bool(decision.reject))
        self.scores.append(point)
        self.new_scores.append(point)
        now = time.monotonic()
        live = self.encoder.hub.viewers > 0 and now >= self._next_live
        if live:
            self._next_live = now + self.interval
        if live or decision.reject:
            self.encoder.offer(_Job(self.cam, frame, amap, decision, event, live, decision.reject))


class Encoder:
    """The view's one worker thread: encodes the feeds' jobs, publishes status every second."""

    def __init__(
        self, hub: Hub, max_width: int, jpeg_quality: int, status: Any, status_s: float = 1.0
    ) -> None:
        self.hub = hub
        self.max_width = max_width
        self.quality = int(jpeg_quality)
        self.status = status  # () -> dict, built on this thread
        self.status_s = status_s
        self.feeds: list[ViewFeed] = []
        self._jobs: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.encoded = 0
        self.errors = 0
        self._next_reject = 1

    def offer(self, job: _Job) -> None:
        with self._cv:
            if len(self._jobs) >= HANDOFF:
                self._jobs.popleft()
                self.dropped += 1
            self._jobs.append(job)
            self._cv.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ui-encode", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            # Encoding takes a core for milliseconds: inference and decisions come first.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (OSError, AttributeError) as exc:
            log.info("ui encoder keeps normal priority: %s", exc)
        next_status = 0.0
        while True:
            with self._cv:
                wait = max(0.0, next_status - time.monotonic())
                if not self._jobs and not self._stop:
                    self._cv.wait(wait)
                if self._stop:
                    return
                job = self._jobs.popleft() if self._jobs else None
            try:
                if job is not None:
                    self._encode(job)
                if time.monotonic() >= next_status:
                    next_status = time.monotonic() + self.status_s
                    if self.hub.viewers:
                        self.hub.publish("status", self.status())
            except Exception as exc:  # the view must never take the line down; counted, logged
                self.errors += 1
                if self.errors <= 5 or self.errors % 100 == 0:
                    log.error("ui: encoding/status failed (#%d): %s", self.errors, exc)

    # ------------------------------------------------------------------ encoding
    def _jpeg(self, img: np.ndarray) -> bytes:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise OSError("JPEG encoding failed")
        return buf.tobytes()

    def _images(self, job: _Job, width: int, boxes: bool) -> tuple[np.ndarray, np.ndarray, float]:
        """(plain, overlay, scale): the frame scaled to at most `width`, and with the heatmap
        (and the region boxes when `boxes`) drawn over the model's view."""
        img = job.frame.image
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        scale = min(1.0, width / img.shape[1])
        small = (
            img
            if scale >= 1.0
            else cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        )
        if job.amap is None:
            return small, small, scale
        st = self.feeds[job.cam].station
        x0, y0, w, h = st.post.view(job.frame.image.shape)
        view = (round(x0 * scale), round(y0 * scale), round(w * scale), round(h * scale))
        regions = (
            [[round(v * scale) for v in r.bbox] for r in job.decision.regions] if boxes else []
        )
        amap = job.amap.reshape(st.size)
        return small, heatmap_overlay(small, amap, view, st.post.pixel_threshold, regions), scale

    def _encode(self, job: _Job) -> None:
        feed = self.feeds[job.cam]
        d, ev = job.decision, job.event
        meta = {
            "cam": job.cam,
            "seq": job.frame.seq,
            "part": job.frame.part_id,
            "score": _finite(d.score),
            "reject": bool(d.reject),
            "reason": d.reason,
            "regions": [list(r.bbox) for r in d.regions],
            "image_threshold": ev.get("image_threshold"),
            "time": ev.get("capture_time"),
        }
        if job.live:
            plain, overlay, scale = self._images(job, self.max_width, boxes=False)
            feed.live.append((job.frame.seq, self._jpeg(plain), self._jpeg(overlay)))
            meta.update(width=plain.shape[1], height=plain.shape[0], scale=scale)
            feed.last_frame = meta
            self.hub.publish("frame", meta)
        if job.reject:
            _, full, _ = self._images(job, self.max_width, boxes=True)
            thumb = cv2.resize(
                full,
                None,
                fx=min(1.0, THUMB_WIDTH / full.shape[1]),
                fy=min(1.0, THUMB_WIDTH / full.shape[1]),
                interpolation=cv2.INTER_AREA,
            )
            evidence = ev.get("evidence")
            item = {
                **meta,
                "id": self._next_reject,
                "pixel_threshold": ev.get("pixel_threshold"),
                "cause": ev.get("cause"),
                "event_id": ev.get("event_id"),
                "evidence": os.path.basename(evidence) if evidence else None,
                "_event": ev,
                "_thumb": self._jpeg(thumb),
                "_full": self._jpeg(full),
            }
            self._next_reject += 1
            feed.rejects.append(item)
            self.hub.publish("reject", public(item))
        self.encoded += 1


def public(item: dict) -> dict:
    """A gallery item without its images and event (served by URL)."""
    return {k: v for k, v in item.items() if not k.startswith("_")}


def _finite(x: float) -> float | None:
    return float(x) if x == x and abs(x) != float("inf") else None
