"""The device's decision, and the one number per part that it thresholds.

The device (edge.postprocess) rejects a part when

    score > image_threshold   or   a connected region (8-conn) of >= min_region_area pixels
                                   lies above pixel_threshold (inside the ROI)

Two thresholds make "the false-reject rate at this setting" a 2-D question. Calibration turns it
into a 1-D one, so the order-statistic / Clopper-Pearson argument applies to what the device
really does: for a fixed minimum area A, a part's *area level* g_A is the highest map value at
which it still has a region of A pixels. The region test fires exactly when g_A > pixel_threshold.
A `RegionRule` ties the pixel threshold to the image threshold t, and maps (score, g_A) to one
*decision statistic* m with

    device rejects  <=>  m > t

so fitting t on m fits the device's decision, not just its first half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from edge.bundle import Thresholds
from edge.postprocess import PostProcessor


def largest_region(hot: np.ndarray) -> int:
    """Area (pixels) of the largest 8-connected region of a (H,W) bool mask; 0 if none."""
    if not hot.any():
        return 0
    n, _, stats, _ = cv2.connectedComponentsWithStats(hot.view(np.uint8), connectivity=8)
    return int(stats[1:, cv2.CC_STAT_AREA].max()) if n > 1 else 0


def largest_regions(maps: np.ndarray, level: float, roi: np.ndarray | None = None) -> np.ndarray:
    """(N,) largest region area above `level` per (N,H,W) map, as post-processing counts it."""
    out = np.zeros(len(maps), np.int64)
    for i, m in enumerate(maps):
        hot = m > level
        if roi is not None:
            hot &= roi
        out[i] = largest_region(hot)
    return out


def area_level(amap: np.ndarray, area: int, roi: np.ndarray | None = None) -> float:
    """Highest map value v such that {amap >= v} (inside the ROI) has a region of >= `area` px.

    Then "a region of >= area pixels above t" holds exactly when v > t. -inf when no level has
    such a region (area larger than the ROI). Binary search over the map's distinct values:
    the largest region shrinks as the level rises.
    """
    vals = np.unique(amap[roi] if roi is not None else amap)
    area = max(int(area), 1)

    def big_enough(i: int) -> bool:
        hot = amap >= vals[i]
        if roi is not None:
            hot &= roi
        return largest_region(hot) >= area

    if not big_enough(0):
        return float("-inf")
    lo, hi = 0, len(vals) - 1  # invariant: big_enough(lo)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if big_enough(mid):
            lo = mid
        else:
            hi = mid - 1
    return float(vals[lo])


def area_levels(maps: np.ndarray, area: int, roi: np.ndarray | None = None) -> np.ndarray:
    """(N,) float64 area level per (N,H,W) map."""
    return np.array([area_level(m, area, roi) for m in maps], np.float64)


class RegionRule(Protocol):
    """How the pixel threshold follows the image threshold, and the matching decision statistic."""

    min_area: int
    kind: str

    def pixel_threshold(self, image_threshold: float) -> float: ...

    def statistic(self, scores: np.ndarray, levels: np.ndarray) -> np.ndarray:
        """(N,) scores, (N,) area levels -> (N,) m with: device rejects <=> m > t."""
        ...


@dataclass
class TiedRule:
    """pixel threshold = background + ratio * (image threshold - background).

    Used without masks. `background` is the median good-pixel value, so ratio 0.5 puts the pixel
    threshold at half height between a clean surface and the image threshold: reported regions
    outline a defect at half its height (like a full width at half maximum), and a defect broad
    enough to cover min_area pixels at half height is rejected even when its peak is not.
    """

    background: float
    ratio: float
    min_area: int
    kind: str = "tied"

    def pixel_threshold(self, image_threshold: float) -> float:
        return self.background + self.ratio * (image_threshold - self.background)

    def statistic(self, scores: np.ndarray, levels: np.ndarray) -> np.ndarray:
        # g > b + r (t - b)  <=>  b + (g - b) / r > t   (r > 0)
        with np.errstate(invalid="ignore"):
            via_region = self.background + (levels - self.background) / self.ratio
        return np.maximum(np.asarray(scores, np.float64), via_region)


@dataclass
class FixedRule:
    """pixel threshold fixed in advance (fitted on defect masks); the region test does not move
    with the image threshold, so a part it flags is rejected at every image threshold."""

    pixel: float
    min_area: int
    kind: str = "fixed"

    def pixel_threshold(self, image_threshold: float) -> float:
        return self.pixel

    def statistic(self, scores: np.ndarray, levels: np.ndarray) -> np.ndarray:
        return np.where(levels > self.pixel, np.inf, np.asarray(scores, np.float64))


def device_decisions(
    maps: np.ndarray, scores: np.ndarray, th: Thresholds, roi: np.ndarray | None = None
) -> np.ndarray:
    """(N,) bool reject per part, computed by edge's own PostProcessor (what the device runs).

    Args:
        maps: (N,H,W) float32 anomaly maps. scores: (N,) image scores.
    """
    size = maps.shape[1:]
    post = PostProcessor(th.image_threshold, th.pixel_threshold, th.min_region_area, size, roi=roi)
    frame = (*size, 3)  # bboxes are not used here: the model view is the frame
    return np.array([post(m, s, frame).reject for m, s in zip(maps, scores, strict=True)], bool)
