"""Fit thresholds.yaml for a bundle from good (and optionally defective, masked) images."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from calibration import dataset
from calibration.scoring import Scored, score_samples
from calibration.strategies import make_strategy
from edge.bundle import Bundle, Thresholds
from edge.errors import DataError


@dataclass
class FitResult:
    thresholds: Thresholds
    scored: Scored
    warnings: list[str] = field(default_factory=list)
    path: Path | None = None


def score_stats(scores: np.ndarray) -> dict:
    s = np.asarray(scores, np.float64)
    q = np.quantile(s, [0.5, 0.9, 0.99]) if s.size else [np.nan] * 3
    return {
        "n": int(s.size),
        "mean": float(s.mean()),
        "std": float(s.std()),
        "min": float(s.min()),
        "p50": float(q[0]),
        "p90": float(q[1]),
        "p99": float(q[2]),
        "max": float(s.max()),
    }


def _largest_region(binary: np.ndarray) -> int:
    n, _, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    return int(stats[1:, cv2.CC_STAT_AREA].max()) if n > 1 else 0


def pixel_threshold_from_masks(scored: Scored, good: np.ndarray) -> tuple[float, int]:
    """F1-optimal pixel threshold over the defective images' pixels, and the minimum region area
    that keeps every good calibration image free of regions at that threshold.

    Returns:
        (pixel_threshold, min_region_area)
    """
    maps, masks = scored.maps, scored.masks
    bad = ~good
    vals = maps[bad].reshape(-1)
    gt = masks[bad].reshape(-1)
    order = np.argsort(vals)[::-1]
    tp = np.cumsum(gt[order])
    fp = np.cumsum(~gt[order])
    f1 = 2 * tp / np.maximum(tp + fp + gt.sum(), 1)
    t = float(vals[order][int(np.argmax(f1))])
    area = max((_largest_region(m > t) for m in maps[good]), default=0)
    return t, area + 1 if area else 0


def fit_thresholds(
    bundle_dir: str | Path,
    good: str | Path | None = None,
    data: str | Path | None = None,
    defects: str | Path | None = None,
    masks: str | Path | None = None,
    strategy: str = "frr",
    target_frr: float = 0.01,
    max_escape: float = 0.0,
    precision: str = "fp32",
    backend: str = "onnxruntime",
    write: bool = True,
    progress: bool = True,
) -> FitResult:
    """Score the images with the bundle, fit the thresholds and (if write) save thresholds.yaml.

    Nothing is written unless every input was read and the fit succeeded.
    """
    bundle = Bundle(bundle_dir)
    bundle.model_path(precision)  # verify before spending time on scoring
    if (good is None) == (data is None):
        raise DataError("give exactly one of --good <dir> or --data <MVTec category dir>")
    if data is not None:
        samples = dataset.mvtec_test(data)
    else:
        samples = dataset.folder(good, None)
    if defects is not None:
        samples += dataset.folder(defects, "defect", masks)
    has_masks = any(s.mask is not None for s in samples)
    scored = score_samples(
        bundle, samples, precision, backend, keep_maps=has_masks, progress=progress
    )
    is_good = np.array([s.defect is None for s in samples])
    good_scores, defect_scores = scored.scores[is_good], scored.scores[~is_good]

    fit = make_strategy(strategy, target_frr, max_escape).fit(
        good_scores, defect_scores if defect_scores.size else None
    )
    if has_masks:
        pixel_t, min_area = pixel_threshold_from_masks(scored, is_good)
        pixel_method = "f1 over defect pixels; min area clears every good image"
    else:
        # score = max of the smoothed map, so a pixel threshold equal to the image threshold
        # makes the region test agree with the image test on every part.
        pixel_t, min_area = fit.threshold, 0
        pixel_method = "equal to image threshold (no masks)"
    stats = {"good": score_stats(good_scores), **fit.info, "pixel_method": pixel_method}
    if defect_scores.size:
        stats["defect"] = score_stats(defect_scores)
    targets = {"frr": {"target_frr": target_frr}, "escape": {"max_escape": max_escape}}
    th = Thresholds(
        image_threshold=fit.threshold,
        pixel_threshold=pixel_t,
        min_region_area=int(min_area),
        method=strategy,
        model_sha256=bundle.model_sha256(precision),
        precision=precision,
        targets=targets.get(strategy, {}),
        stats=stats,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    result = FitResult(th, scored, fit.warnings)
    if write:
        result.path = bundle.write_thresholds(th)
    return result
