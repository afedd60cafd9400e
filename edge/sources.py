"""Frame sources chosen by URI (the jetson-inference convention).

    file://video.mp4, file:///abs/dir/, bare paths   video file, or image folder (sorted by name)
    v4l2:///dev/video0                               USB/V4L2 camera
    csi://0                                          Jetson CSI camera (nvarguscamerasrc, GStreamer)
    rtsp://host/stream                               IP camera
    gst://<pipeline>                                 any GStreamer pipeline ending in appsink

Contract (`Source`): `open()` then `read(timeout)` repeatedly, then `close()`.
`read` returns a `Frame`, or `None` when no frame arrived within `timeout` seconds (a live camera
that is idle or reconnecting), and raises `EndOfStream` when a non-looping file source is
exhausted. End of stream is an exception, not a second sentinel value, so it can never be mistaken
for a timeout by a caller that only checks `is None`.

An unopenable source raises `SourceError` naming the URI. Unreadable frames are counted in
`stats()` and skipped; a live source that fails after opening reconnects with exponential backoff.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from edge.errors import SourceError
from edge.preprocess import IMAGE_SUFFIXES
from edge.redact import redact_uri

log = logging.getLogger(__name__)


class EndOfStream(Exception):  # noqa: N818 - a signal, not an error
    """Raised by `Source.read()` when a non-looping source has no more frames."""


@dataclass
class Frame:
    """One captured frame.

    image: (H,W,3) uint8 BGR. seq: monotonic per source (gaps = frames dropped at the source).
    capture_time: epoch seconds (time.time()) when the frame was captured/read.
    part_id: part identifier (file stem for image folders, else str(seq)).
    source: file name for folders/videos, else the URI.
    t_mono: time.monotonic() at capture, for latency maths immune to wall-clock steps.
    error: set (and image empty) for a part whose image could not be decoded; only sources
        asked to keep such parts (`keep_unreadable`, a triggered line) hand them out, so that
        the part is rejected as unverified instead of vanishing.
    """

    image: np.ndarray
    seq: int
    capture_time: float
    part_id: str
    source: str
    t_mono: float = field(default_factory=time.monotonic)
    error: str | None = None


class Source(Protocol):
    uri: str

    def open(self) -> None: ...

    def read(self, timeout: float | None = None) -> Frame | None: ...

    def close(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class _Pacer:
    """Replay at `rate` frames/s (0 = unpaced). Never bursts to catch up after a slow consumer:
    a real camera does not buffer the frames nobody took."""

    def __init__(self, rate: float):
        self.period = 1.0 / rate if rate > 0 else 0.0
        self.due: float | None = None

    def wait(self, timeout: float | None) -> bool:
        """Sleep until the next frame is due; False (after sleeping `timeout`) if it is later."""
        if not self.period:
            return True
        now = time.monotonic()
        if self.due is None:
            self.due = now
        delay = self.due - now
        if delay > 0:
            if timeout is not None and delay > timeout:
                time.sleep(timeout)
                return False
            time.sleep(delay)
        self.due = max(self.due, now) + self.period
        return True


class _BaseSource:
    def __init__(
        self,
        uri: str,
        *,
        loop: bool = False,
        rate: float = 0.0,
        width: int = 0,
        height: int = 0,
        keep_unreadable: bool = False,
    ):
        self.uri = uri
        # What logs, errors and stats show: the URI without its credentials (rtsp://user:pw@).
        self.label = redact_uri(uri)
        # Triggered line: one frame is one part, so an undecodable one is handed out (with
        # Frame.error) to be rejected as unverified; a continuous line just skips it.
        self.keep_unreadable = keep_unreadable
        self.loop = loop
        self.rate = rate
        self.width = width
        self.height = height
        self._seq = 0
        self._stats: dict[str, Any] = {"frames": 0, "corrupt": 0, "loops": 0}
        self._pacer = _Pacer(rate)

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)

    def _frame(self, image: np.ndarray, part_id: str | None, name: str) -> Frame:
        f = Frame(image, self._seq, time.time(), part_id or str(self._seq), name)
        self._seq += 1
        self._stats["frames"] += 1
        return f

    def _unreadable(self, part_id: str | None, name: str, why: str) -> Frame:
        f = self._frame(np.zeros((0, 0, 3), np.uint8), part_id, name)
        f.error = f"{name}: {why}"
        return f

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()


def _uri_path(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri).expanduser()


class FileSource(_BaseSource):
    """`file://` and bare paths: an image folder or a video file, decided by what the path is."""

    def __new__(cls, uri: str, **kwargs: Any):
        if cls is FileSource:
            cls = ImageFolderSource if _uri_path(uri).is_dir() else VideoFileSource
        return super().__new__(cls)

    def __init__(self, uri: str, **kwargs: Any):
        super().__init__(uri, **kwargs)
        self.path = _uri_path(uri)


class ImageFolderSource(FileSource):
    """Sorted image files of one folder (non-recursive); re-listed at every loop pass."""

    def _list(self) -> list[Path]:
        try:
            return sorted(
                p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
        except OSError as exc:
            raise SourceError(f"{self.label}: cannot list folder: {exc.strerror or exc}") from exc

    def open(self) -> None:
        if not self.path.is_dir():
            raise SourceError(f"{self.label}: no such folder")
        self._files = self._list()
        if not self._files:
            raise SourceError(f"{self.label}: no images in folder ({', '.join(IMAGE_SUFFIXES)})")
        self._idx = 0
        self._good_this_pass = 0

    def read(self, timeout: float | None = None) -> Frame | None:
        if not self._pacer.wait(timeout):
            return None
        while True:
            if self._idx >= len(self._files):
                # A looping folder with no readable image would spin forever: end instead.
                if not self.loop or self._good_this_pass == 0:
                    raise EndOfStream(self.label)
                self._files = self._list()
                self._idx = 0
                self._good_this_pass = 0
                self._stats["loops"] += 1
                continue
            p = self._files[self._idx]
            self._idx += 1
            img = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if img is None or img.size == 0:
                self._stats["corrupt"] += 1
                if self.keep_unreadable:
                    log.warning("%s: unreadable image: the part is rejected as unverified", p)
                    return self._unreadable(p.stem, p.name, "unreadable image")
                log.warning("%s: unreadable image skipped", p)
                continue
            self._good_this_pass += 1
            return self._frame(img, p.stem, p.name)

    def close(self) -> None:
        self._files = []


class VideoFileSource(FileSource):
    """A video file decoded by OpenCV (FFmpeg). A truncated file ends early, cleanly."""

    MAX_CONSECUTIVE_FAILURES = 3

    def open(self) -> None:
        if not self.path.is_file():
            raise SourceError(f"{self.label}: no such file or folder")
        self._stats.setdefault("truncated", 0)
        self._cap = self._open_cap()
        self._good_this_pass = 0

    def _open_cap(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"{self.label}: cannot open as video (not a video, or codec missing)")
        return cap

    def read(self, timeout: float | None = None) -> Frame | None:
        if not self._pacer.wait(timeout):
            return None
        failures = 0
        while True:
            ok, img = self._cap.read()
            if ok and img is not None:
                self._good_this_pass += 1
                return self._frame(img, None, self.path.name)
            pos = self._cap.get(cv2.CAP_PROP_POS_FRAMES)
            count = self._cap.get(cv2.CAP_PROP_FRAME_COUNT)
            failures += 1
            # A failed read before the container's frame count is a corrupt/truncated frame:
            # retry a few times, then treat it as the end (a truncated file ends there).
            if 0 < pos < count - 1 and failures < self.MAX_CONSECUTIVE_FAILURES:
                self._stats["corrupt"] += 1
                continue
            if 0 < pos < count - 1:
                self._stats["truncated"] += 1
                log.warning(
                    "%s: video ends after frame %d of the %d its header announces "
                    "(truncated or corrupt file)",
                    self.label,
                    int(pos),
                    int(count),
                )
            if not self.loop or self._good_this_pass == 0:
                raise EndOfStream(self.label)
            # Reopen rather than seek to 0: seeking is unreliable for some codecs/containers.
            self._cap.release()
            self._cap = self._open_cap()
            self._good_this_pass = 0
            self._stats["loops"] += 1
            failures = 0

    def close(self) -> None:
        cap = getattr(self, "_cap", None)
        if cap is not None:
            cap.release()
            self._cap = None


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
SOURCES: dict[str, type] = {
    "file": FileSource,
    "v4l2": V4L2Source,
    "csi": CsiSource,
    "rtsp": RtspSource,
    "rtsps": RtspSource,
    "gst": GstSource,
}


def create_source(uri: str, **opts: Any) -> Source:
    """Source for `uri` (not yet opened). opts: loop, rate, width, height (+ class specifics)."""
    scheme, sep, _ = uri.partition("://")
    if not sep:
        scheme = "file"
    cls = SOURCES.get(scheme)
    if cls is None:
        raise SourceError(
            f"{redact_uri(uri)}: unknown source scheme {scheme!r}, expected one of {list(SOURCES)}"
        )
    return cls(uri, **opts)


def source_options(
    cfg: Any, *, retry_open: bool | None = None, triggered: bool = False
) -> dict[str, Any]:
    """create_source options from a `config.SourceConfig` (live-only ones only for live URIs).

    triggered: one frame per part: keep undecodable frames (rejected downstream as unverified)
    and, for live sources, block instead of dropping the oldest frame."""
    opts: dict[str, Any] = dict(
        loop=cfg.loop,
        rate=cfg.rate,
        width=cfg.width,
        height=cfg.height,
        keep_unreadable=triggered,
    )
    scheme, sep, _ = cfg.uri.partition("://")
    cls = SOURCES.get(scheme if sep else "file")
    if cls is not None and issubclass(cls, LiveSource):
        opts.update(
            buffer=cfg.buffer,
            reconnect_min_s=cfg.reconnect_min_s,
            reconnect_max_s=cfg.reconnect_max_s,
            retry_open=cfg.retry_open if retry_open is None else retry_open,
            block=triggered,
        )
    return opts


def open_source(cfg: Any, *, retry_open: bool | None = None, triggered: bool = False) -> Source:
    """Create and open the source of a `config.SourceConfig`.

    retry_open overrides the config (`edge check` wants to know now, not wait for the camera)."""
    src = create_source(cfg.uri, **source_options(cfg, retry_open=retry_open, triggered=triggered))
    src.open()
    return src
