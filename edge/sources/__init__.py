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

from typing import Any

from edge.errors import SourceError
from edge.redact import redact_uri
from edge.sources.base import EndOfStream, Frame, Source
from edge.sources.files import FileSource, ImageFolderSource, VideoFileSource
from edge.sources.live import (
    CsiSource,
    GstSource,
    LiveSource,
    RtspSource,
    V4L2Source,
    _has_gstreamer,
)

__all__ = [
    "CsiSource",
    "EndOfStream",
    "FileSource",
    "Frame",
    "GstSource",
    "ImageFolderSource",
    "LiveSource",
    "RtspSource",
    "SOURCES",
    "Source",
    "V4L2Source",
    "VideoFileSource",
    "_has_gstreamer",
    "create_source",
    "open_source",
    "source_options",
]


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
