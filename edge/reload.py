"""Hot reload of a bundle's thresholds.yaml: recalibrate the line without restarting it.

The station's post-processing thread calls `poll()` between frames: at most every
`check_interval_s` it stats the file, and when its (mtime, size, inode) changed, or after
`request()` (SIGHUP), it loads and validates the new file. A valid file is applied to the next
frame and logged with the old and new values; an invalid one (malformed, missing key, not
finite, fitted for another model, or missing while being replaced) is refused with an error log
and the thresholds in force stay. The file is not read again until it changes (or SIGHUP).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

from edge.bundle import Bundle, Thresholds
from edge.errors import BundleError, LineInspectError

log = logging.getLogger(__name__)


def validate_thresholds(th: Thresholds, path: Any) -> None:
    """Raise BundleError unless the values are usable on the line: finite numbers, and the hash
    of the model they were fitted on (Bundle.thresholds refuses another model's; without a hash
    nothing ties the numbers to this graph, so they are refused too)."""
    if not str(th.model_sha256 or "").strip():
        raise BundleError(
            f"{path}: model_sha256: missing or empty; thresholds must name the model hash they "
            "were fitted on (re-run `calibration fit`)"
        )
    for key in ("image_threshold", "pixel_threshold"):
        v = getattr(th, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise BundleError(f"{path}: {key}: must be a finite number, got {v!r}")


def _signature(path: os.PathLike | str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ThresholdsWatcher:
    """Watches `bundle`'s thresholds.yaml and calls `apply(thresholds)` with each valid change.

    Args:
        bundle: edge.bundle.Bundle.
        apply: callback run in the polling thread with the new Thresholds.
        current: the Thresholds in force (for the log's old -> new).
        watch: check the file's mtime; False = reload only on request().
        check_interval_s: seconds between two stats of the file.
        label: prefix of the log lines (the station's name).
    """

    def __init__(
        self,
        bundle: Bundle,
        apply: Callable[[Thresholds], None],
        current: Thresholds,
        *,
        watch: bool = True,
        check_interval_s: float = 1.0,
        label: str = "",
    ):
        self.bundle = bundle
        self.path = bundle.thresholds_path
        self.apply = apply
        self.current = current
        self.watch = watch
        self.check_interval_s = check_interval_s
        self.label = f"{label}: " if label else ""
        self.reloads = 0
        self.refused = 0
        self._sig = _signature(self.path)
        self._next = 0.0
        self._requested = False

    def request(self) -> None:
        """Reload at the next poll even if the file looks unchanged. Signal-handler safe."""
        self._requested = True

    def poll(self, now: float | None = None) -> bool:
        """Check (rate-limited) and reload if needed. True when new thresholds were applied."""
        requested = self._requested
        if not requested:
            if not self.watch:
                return False
            now = time.monotonic() if now is None else now
            if now < self._next:
                return False
            self._next = now + self.check_interval_s
        sig = _signature(self.path)
        if sig == self._sig and not requested:
            return False
        self._requested = False
        self._sig = sig
        if sig is None:
            self.refused += 1
            log.error(
                "%s%s: disappeared; keeping the thresholds in force (%s)",
                self.label,
                self.path,
                self._describe(self.current),
            )
            return False
        try:
            th = self.bundle.thresholds()
            validate_thresholds(th, self.path)
        except LineInspectError as exc:
            self.refused += 1
            log.error(
                "%snew thresholds refused: %s; keeping the thresholds in force (%s)",
                self.label,
                " ".join(str(exc).split()),
                self._describe(self.current),
            )
            return False
        old = self.current
        self.apply(th)
        self.current = th
        self.reloads += 1
        log.info(
            "%sthresholds reloaded from %s: %s (was %s)",
            self.label,
            self.path,
            self._describe(th),
            self._describe(old),
        )
        return True

    @staticmethod
    def _describe(th: Thresholds) -> str:
        return (
            f"image {th.image_threshold:.6g}, pixel {th.pixel_threshold:.6g}, "
            f"min area {th.min_region_area}, method {th.method}"
        )
