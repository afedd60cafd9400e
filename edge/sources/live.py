"""Live sources: V4L2/USB, Jetson CSI (GStreamer), RTSP and any GStreamer pipeline, read by a
grabber thread into a small buffer, reconnecting with backoff."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import cv2

from edge.errors import SourceError
from edge.redact import redact_uri
from edge.sources.base import Frame, _BaseSource

log = logging.getLogger("edge.sources")


class LiveSource(_BaseSource):
    """An OpenCV VideoCapture read by a grabber thread into a small buffer.

    The thread keeps the driver's buffers drained (so latency stays one frame), lets `read` honour
    its timeout, and reconnects with exponential backoff when the camera fails. When the consumer
    falls behind, the oldest buffered frame is dropped and counted (`stats()['dropped']`), unless
    `block` (a triggered line, one frame per part): then the grabber waits for room and never
    drops a part (back-pressure to the driver). A frame the driver hands over empty is counted
    (`corrupt`) and skipped (with keep_unreadable: handed out with Frame.error); a failed read
    means the camera is gone and starts a reconnect.

    retry_open: when the camera cannot be opened at start, keep trying in the background
    (`read` times out meanwhile) instead of raising SourceError. Every state change is logged and
    counted in `stats()`: connected, reconnects, reconnect_attempts, read_failures, last_error.
    """

    api = cv2.CAP_ANY

    def __init__(
        self,
        uri: str,
        *,
        buffer: int = 4,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 10.0,
        retry_open: bool = False,
        block: bool = False,
        **kwargs: Any,
    ):
        super().__init__(uri, **kwargs)
        self.block = block
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.retry_open = retry_open
        self._q: queue.Queue[Frame] = queue.Queue(maxsize=max(1, buffer))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cap: Any = None
        self._fatal: BaseException | None = None
        self._stats.update(
            dropped=0,
            read_failures=0,
            reconnects=0,
            reconnect_attempts=0,
            connected=False,
            last_error=None,
        )

    # Subclasses say what to open; tests replace _open_capture with a fake camera.
    def _target(self) -> str | int:
        raise NotImplementedError

    def _hint(self) -> str:
        return "check the device/URL"

    def _open_capture(self) -> Any:
        cap = cv2.VideoCapture(self._target(), self.api)
        if not cap.isOpened():
            cap.release()
            return None
        if self.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        if self.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        if self.rate:
            cap.set(cv2.CAP_PROP_FPS, self.rate)
        return cap

    def open(self) -> None:
        self._cap = self._open_capture()
        if self._cap is None:
            msg = f"{self.label}: cannot open ({self._hint()})"
            if not self.retry_open:
                raise SourceError(msg)
            self._stats["last_error"] = msg
            log.warning(
                "%s; retrying every %.3g-%.3gs", msg, self.reconnect_min_s, self.reconnect_max_s
            )
        else:
            self._stats["connected"] = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._grab_loop, name="grabber", daemon=True)
        self._thread.start()

    def _reconnect(self, backoff: float) -> float:
        """One reconnect attempt after waiting `backoff`; returns the next backoff."""
        if self._stop.wait(backoff):
            return backoff
        self._stats["reconnect_attempts"] += 1
        self._cap = self._open_capture()
        if self._cap is None:
            n = self._stats["reconnect_attempts"]
            nxt = min(backoff * 2, self.reconnect_max_s)
            # Powers of two only: a camera gone for a day must not flood the log.
            if n & (n - 1) == 0:
                log.warning(
                    "%s: still unavailable after %d attempt(s); next in %.1fs", self.label, n, nxt
                )
            return nxt
        log.info("%s: connected after %d attempt(s)", self.label, self._stats["reconnect_attempts"])
        self._stats["reconnects"] += 1
        self._stats["connected"] = True
        return self.reconnect_min_s

    def _grab_loop(self) -> None:
        backoff = self.reconnect_min_s
        try:
            while not self._stop.is_set():
                if self._cap is None:
                    backoff = self._reconnect(backoff)
                    continue
                ok, img = self._cap.read()
                if not ok:
                    self._stats["read_failures"] += 1
                    self._stats["connected"] = False
                    self._stats["last_error"] = "read failed"
                    log.warning("%s: read failed; reconnecting in %.1fs", self.label, backoff)
                    self._cap.release()
                    self._cap = None
                    continue
                if img is None or img.size == 0:
                    self._stats["corrupt"] += 1
                    if not self.keep_unreadable:
                        continue
                    frame = self._unreadable(None, self.label, "empty frame from the driver")
                else:
                    frame = self._frame(img, None, self.label)
                if self.block:
                    self._put_blocking(frame)
                    continue
                while True:
                    try:
                        self._q.put_nowait(frame)
                        break
                    except queue.Full:
                        try:
                            self._q.get_nowait()
                            self._stats["dropped"] += 1
                        except queue.Empty:
                            pass
        except BaseException as exc:  # surfaced by read(); never die silently
            self._fatal = exc
        finally:
            if self._cap is not None:
                self._cap.release()
                self._cap = None
            self._stats["connected"] = False

    def _put_blocking(self, frame: Frame) -> None:
        """Wait for room (triggered line: a part is never dropped); give up only on stop."""
        while not self._stop.is_set():
            try:
                self._q.put(frame, timeout=0.1)
                return
            except queue.Full:
                continue
        # Stopped while full: the part was seen but can no longer be queued; say so loudly.
        self._stats["dropped"] += 1
        log.error(
            "%s: frame %d not queued: capture stopped while the buffer was full",
            self.label,
            frame.seq,
        )

    def read(self, timeout: float | None = None) -> Frame | None:
        if self._fatal is not None:
            raise SourceError(f"{self.label}: capture thread failed: {redact_uri(self._fatal)}")
        try:
            if timeout is not None and timeout <= 0:
                return self._q.get_nowait()
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    def stop_capture(self) -> None:
        """Stop grabbing new frames; those already buffered can still be read (with timeout 0).

        A triggered line calls this at shutdown so that every part the camera already saw is
        still inspected."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                log.warning("%s: grabber thread did not stop within 5s (driver stuck)", self.label)
            self._thread = None

    def close(self) -> None:
        self.stop_capture()


def _has_gstreamer() -> bool:
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line
    return False


class V4L2Source(LiveSource):
    """`v4l2:///dev/video0` (or `v4l2://0`)."""

    api = cv2.CAP_V4L2

    def _target(self) -> str | int:
        dev = self.uri[len("v4l2://") :]
        return int(dev) if dev.isdigit() else dev

    def _hint(self) -> str:
        return "no such V4L2 device, or it is busy; list with `v4l2-ctl --list-devices`"


class _GstSource(LiveSource):
    api = cv2.CAP_GSTREAMER

    def open(self) -> None:
        if not _has_gstreamer():
            raise SourceError(
                f"{self.label}: this OpenCV build has no GStreamer support (pip wheels have none; "
                "use the JetPack OpenCV)"
            )
        super().open()

    def _hint(self) -> str:
        return f"GStreamer pipeline did not start: {self._target()}"


class CsiSource(_GstSource):
    """`csi://0`: Jetson CSI sensor through nvarguscamerasrc, converted to BGR for OpenCV."""

    def _target(self) -> str:
        sensor = self.uri[len("csi://") :] or "0"
        w, h = self.width or 1920, self.height or 1080
        fps = int(self.rate) or 30
        # appsink drop=false: our grabber thread drains it, so any frame drop is ours and counted.
        return (
            f"nvarguscamerasrc sensor-id={sensor} ! "
            f"video/x-raw(memory:NVMM), width={w}, height={h}, framerate={fps}/1 ! "
            "nvvidconv ! video/x-raw, format=BGRx ! videoconvert ! video/x-raw, format=BGR ! "
            "appsink drop=false sync=false"
        )


class GstSource(_GstSource):
    """`gst://<pipeline>`; an appsink delivering BGR is appended when the pipeline has none."""

    def _target(self) -> str:
        pipe = self.uri[len("gst://") :]
        if "appsink" not in pipe:
            pipe += " ! videoconvert ! video/x-raw, format=BGR ! appsink drop=false sync=false"
        return pipe


class RtspSource(LiveSource):
    """`rtsp://...` through FFmpeg, with open/read timeouts so a dead camera cannot hang us."""

    api = cv2.CAP_FFMPEG

    def _target(self) -> str:
        return self.uri

    def _hint(self) -> str:
        return "camera unreachable or stream path wrong"

    def _open_capture(self) -> Any:
        params: list[int] = []
        if hasattr(cv2, "CAP_PROP_OPEN_TIMEOUT_MSEC"):
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 5000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 5000]
        cap = cv2.VideoCapture(self.uri, self.api, params)
        if not cap.isOpened():
            cap.release()
            return None
        return cap


# Explicit registry: URI scheme -> class. Bare paths (no scheme) are "file".
