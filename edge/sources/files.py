"""File sources: an image folder (sorted by name) or a video file, replayed at a rate."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2

from edge.errors import SourceError
from edge.preprocess import IMAGE_SUFFIXES
from edge.sources.base import EndOfStream, Frame, _BaseSource

log = logging.getLogger("edge.sources")


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
