"""Anomaly map + score -> reject/pass decision with defect regions.

    map (H,W) at model resolution --ROI mask--> > pixel_threshold --> connected regions (8-conn)
      --> drop regions smaller than min_region_area --> bbox back to frame pixels (crop + resize)
    reject = score > image_threshold  or  any region left

Vectorised numpy + OpenCV only: no Python loop over pixels, nor over regions (OpenCV gives labels,
areas and boxes; peaks come from one np.maximum.at), so a noisy map costs about what a clean one
does. A map with fewer hot pixels than the minimum area (the usual good part) skips labelling
altogether. Worst cases measured at 256x256 on one core (every pixel hot, a checkerboard of
one-pixel regions): under 1 ms.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge.errors import ConfigError
from edge.verdict import Decision, Region, non_finite_cause, unverified

__all__ = ["Decision", "PostProcessor", "Region", "effective_min_area", "from_bundle"]

_CCL = getattr(cv2, "CCL_BBDT", cv2.CCL_DEFAULT)


def load_roi_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """ROI image -> (H,W) bool at model resolution; non-zero pixels are inspected.

    The mask is drawn over the model's view: the crop when one is configured, else the whole
    frame. Any resolution; resized with nearest-neighbour so it stays binary.
    """
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ConfigError(f"{path}: postprocess.roi_mask: not a readable image")
    h, w = size
    if img.shape != (h, w):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST)
    mask = img > 0
    if not mask.any():
        raise ConfigError(f"{path}: postprocess.roi_mask: mask is empty (all zero)")
    return mask


class PostProcessor:
    """Thresholds + regions for one model resolution.

    Args:
        image_threshold: score above this -> reject.
        pixel_threshold: map value above this -> defective pixel.
        min_region_area: regions smaller than this (model pixels) are ignored.
        size: (H, W) of the anomaly map.
        crop: (x, y, w, h) the frame was cropped to before resizing (None = whole frame).
        roi: (H,W) bool mask, True = inspect; None = everywhere.
        max_regions: keep at most this many regions (largest first) in a decision.
    """

    def __init__(
        self,
        image_threshold: float,
        pixel_threshold: float,
        min_region_area: int,
        size: tuple[int, int],
        crop: tuple[int, int, int, int] | list[int] | None = None,
        roi: np.ndarray | None = None,
        max_regions: int = 32,
    ):
        self.image_threshold = float(image_threshold)
        self.pixel_threshold = float(pixel_threshold)
        self.min_region_area = int(min_region_area)
        self.size = tuple(size)
        self.crop = tuple(crop) if crop is not None else None
        if roi is not None and roi.shape != self.size:
            raise ValueError(f"roi mask shape {roi.shape} != map size {self.size}")
        self.roi = roi
        self.max_regions = max_regions
        self._hot = np.empty(self.size, dtype=bool)  # reused: no per-frame allocation

    def set_thresholds(
        self, image_threshold: float, pixel_threshold: float, min_region_area: int
    ) -> None:
        """Swap the thresholds (hot reload). Call from the thread that calls this object."""
        self.image_threshold = float(image_threshold)
        self.pixel_threshold = float(pixel_threshold)
        self.min_region_area = int(min_region_area)

    def view(self, frame_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(x0, y0, w, h) of the frame region the model saw, clipped to the frame as slicing does."""
        fh, fw = frame_shape[:2]
        if self.crop is None:
            return 0, 0, fw, fh
        x, y, w, h = self.crop
        x0, y0 = min(max(x, 0), fw), min(max(y, 0), fh)
        return x0, y0, min(x + w, fw) - x0, min(y + h, fh) - y0

    def __call__(
        self, anomaly_map: np.ndarray, score: float, frame_shape: tuple[int, ...]
    ) -> Decision:
        """anomaly_map (H,W) or (1,H,W) float32, score float, frame_shape (H0,W0[,3]) -> Decision."""
        amap = anomaly_map.reshape(self.size)
        score = float(score)
        bad = non_finite_cause(amap, score)
        if bad is not None:  # NaN > threshold is False: judged normally it would pass
            return unverified(bad, score)
        hot = np.greater(amap, self.pixel_threshold, out=self._hot)
        if self.roi is not None:
            np.logical_and(hot, self.roi, out=hot)
        regions: list[Region] = []
        total = 0
        # No region can be larger than all hot pixels together: when they are fewer than the
        # minimum area (the usual good part), labelling is skipped.
        if np.count_nonzero(hot) >= max(1, self.min_region_area):
            regions, total = self._regions(amap, hot, frame_shape)
        by_score = score > self.image_threshold
        reason = "score" if by_score else "region" if total > 0 else None
        return Decision(by_score or total > 0, score, regions, total, reason=reason)

    def _regions(
        self, amap: np.ndarray, hot: np.ndarray, frame_shape: tuple[int, ...]
    ) -> tuple[list[Region], int]:
        # BBDT: with statistics it took a third of OpenCV's default algorithm's time here
        # (OpenCV 4.x/5.0, 256x256, one thread); same labels, any algorithm is exact.
        n, labels, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(
            hot.view(np.uint8), 8, cv2.CV_32S, _CCL
        )
        stats = stats[1:]  # label 0 is the background
        areas = stats[:, cv2.CC_STAT_AREA]
        lefts = stats[:, cv2.CC_STAT_LEFT]
        tops = stats[:, cv2.CC_STAT_TOP]
        rights = lefts + stats[:, cv2.CC_STAT_WIDTH]
        bottoms = tops + stats[:, cv2.CC_STAT_HEIGHT]

        keep = np.flatnonzero(areas >= self.min_region_area)
        total = int(keep.size)
        if total == 0:
            return [], 0
        if total > self.max_regions:
            keep = keep[np.argsort(-areas[keep], kind="stable")[: self.max_regions]]

        # Peaks of the kept regions only, each within its own box: bounded by the boxes' area,
        # where a pass over every hot pixel (np.maximum.at) cost 0.4 ms on a fully hot map.
        peaks = np.empty(keep.size, np.float32)
        for j, k in enumerate(keep):
            box = np.s_[tops[k] : bottoms[k], lefts[k] : rights[k]]
            peaks[j] = amap[box][labels[box] == k + 1].max()

        # Model pixels -> frame pixels: scale by the view/model ratio, offset by the crop;
        # floor the start and ceil the end so the box always covers the region.
        x0, y0, vw, vh = self.view(frame_shape)
        mh, mw = self.size
        sx, sy = vw / mw, vh / mh
        left = np.floor(lefts[keep] * sx).astype(np.int64) + x0
        top = np.floor(tops[keep] * sy).astype(np.int64) + y0
        right = np.minimum(np.ceil(rights[keep] * sx).astype(np.int64) + x0, x0 + vw)
        bottom = np.minimum(np.ceil(bottoms[keep] * sy).astype(np.int64) + y0, y0 + vh)
        regions = [
            Region([int(a), int(b), int(c - a), int(d - b)], int(ar), float(pk))
            for a, b, c, d, ar, pk in zip(left, top, right, bottom, areas[keep], peaks)
        ]
        regions.sort(key=lambda r: -r.peak)
        return regions, total


def effective_min_area(thresholds, cfg_post) -> int:
    """The station config's min_region_area when set, else thresholds.yaml's."""
    if cfg_post.min_region_area is not None:
        return int(cfg_post.min_region_area)
    return int(thresholds.min_region_area)


def from_bundle(
    thresholds, size: tuple[int, int], cfg_pre, cfg_post, max_regions: int = 32
) -> PostProcessor:
    """PostProcessor from bundle thresholds + station config (min_region_area override, ROI)."""
    min_area = effective_min_area(thresholds, cfg_post)
    roi = load_roi_mask(cfg_post.roi_mask, size) if cfg_post.roi_mask else None
    return PostProcessor(
        thresholds.image_threshold,
        thresholds.pixel_threshold,
        min_area,
        size,
        crop=cfg_pre.crop,
        roi=roi,
        max_regions=max_regions,
    )
