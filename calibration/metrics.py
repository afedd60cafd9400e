"""Threshold-free detection metrics: image AUROC, pixel AUROC, AU-PRO (MVTec AD definitions)."""

from __future__ import annotations

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """AUROC of image scores; None when only one class is present.

    Args:
        labels: (N,) 1 = defective.
        scores: (N,) image scores.
    """
    labels = np.asarray(labels).astype(int)
    if labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, scores))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float | None:
    """AUROC over all pixels of all images.

    Args:
        masks: (N,H,W) bool ground truth.
        maps: (N,H,W) float anomaly maps.
    """
    y = masks.reshape(-1).astype(np.uint8)
    if y.min() == y.max():
        return None
    return float(roc_auc_score(y, maps.reshape(-1)))


def au_pro(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, steps: int = 400
) -> float | None:
    """Area under the per-region-overlap curve up to `fpr_limit`, normalised to [0, 1].

    PRO at a threshold = mean over ground-truth connected components of the fraction of the
    component's pixels above the threshold; FPR = fraction of normal pixels above it. Each
    component counts equally whatever its size (the point of PRO over pixel AUROC).

    Args:
        masks: (N,H,W) bool ground truth.
        maps: (N,H,W) float anomaly maps.
    """
    masks = masks.astype(bool)
    if not masks.any() or masks.all():
        return None
    normal = np.sort(maps[~masks])
    # Thresholds from high to low, spaced so FPR spans [0, fpr_limit] finely.
    fprs_wanted = np.linspace(0.0, fpr_limit, steps)
    idx = np.clip(((1.0 - fprs_wanted) * (normal.size - 1)).round().astype(int), 0, normal.size - 1)
    thresholds = normal[idx]
    fpr = 1.0 - np.searchsorted(normal, thresholds, side="right") / normal.size
    pros = np.zeros_like(thresholds, dtype=np.float64)
    n_comp = 0
    for mask, amap in zip(masks, maps, strict=True):
        if not mask.any():
            continue
        n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        for c in range(1, n):
            vals = np.sort(amap[labels == c])
            pros += 1.0 - np.searchsorted(vals, thresholds, side="right") / vals.size
            n_comp += 1
    pros /= n_comp
    # Integrate PRO over FPR in [0, limit] (trapezoid); fpr is increasing along `thresholds`.
    order = np.argsort(fpr)
    fpr, pros = fpr[order], pros[order]
    keep = fpr <= fpr_limit
    fpr, pros = (
        np.append(fpr[keep], fpr_limit),
        np.append(pros[keep], np.interp(fpr_limit, fpr, pros)),
    )
    return float(np.trapezoid(pros, fpr) / fpr_limit)
