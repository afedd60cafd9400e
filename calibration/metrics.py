"""Detection metrics (MVTec AD definitions). scikit-learn where it has them; AU-PRO here.

Labels: 1 / True = defective (the positive class), for images and for pixels.
"""

from __future__ import annotations

import cv2
import numpy as np
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """AUROC of image scores; None when only one class is present.

    Args:
        labels: (N,) 1 = defective.
        scores: (N,) image scores.
    """
    labels = np.asarray(labels).astype(int)
    if labels.size == 0 or labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, scores))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float | None:
    """AUROC over all pixels of all images; None without both defective and normal pixels.

    Args:
        masks: (N,H,W) bool ground truth.
        maps: (N,H,W) float anomaly maps.
    """
    y = masks.reshape(-1).astype(np.uint8)
    if y.size == 0 or y.min() == y.max():
        return None
    return float(roc_auc_score(y, maps.reshape(-1)))


def f1(labels: np.ndarray, rejected: np.ndarray) -> float | None:
    """F1 of a reject decision (defect = positive); None without defective images."""
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return None
    return float(f1_score(labels, np.asarray(rejected, bool), zero_division=0.0))


def best_f1(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Highest F1 over all image thresholds (threshold-free); None with a single class."""
    labels = np.asarray(labels).astype(int)
    if labels.size == 0 or labels.min() == labels.max():
        return None
    p, r, _ = precision_recall_curve(labels, scores)
    f = 2 * p * r / np.maximum(p + r, 1e-12)
    return float(f.max())


class PixelRanking:
    """One descending sort of every pixel of (N,H,W) maps, shared by the pixel metrics of any
    subset of the images (per defect type), so each subset costs a filter, not another sort.

    Args:
        maps: (N,H,W) float anomaly maps.
    """

    def __init__(self, maps: np.ndarray):
        self.shape = maps.shape
        self.values = maps.reshape(-1)
        self.order = np.argsort(-self.values, kind="stable")

    def select(self, images: np.ndarray | None = None) -> np.ndarray:
        """Flat pixel indices of the selected images ((N,) bool; None = all), highest first."""
        if images is None:
            return self.order
        per_image = self.shape[1] * self.shape[2]
        return self.order[np.repeat(np.asarray(images, bool), per_image)[self.order]]


def _run_ends(v: np.ndarray) -> np.ndarray:
    """Indices of the last element of each run of equal values in sorted `v`: a threshold takes
    all pixels of one value or none of them."""
    return np.flatnonzero(np.append(v[1:] != v[:-1], True))


def pixel_auroc_ranked(
    masks: np.ndarray, ranking: PixelRanking, images: np.ndarray | None = None
) -> float | None:
    """pixel_auroc over the selected images from a shared ranking (same value as scikit-learn's
    roc_auc_score, which tests check); None without both classes.

    Args:
        masks: (N,H,W) bool ground truth for all N images of the ranking.
        images: (N,) bool selection; None = all.
    """
    order = ranking.select(images)
    pos = masks.reshape(-1)[order]
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ends = _run_ends(ranking.values[order])
    tpr = np.concatenate(([0.0], np.cumsum(pos, dtype=np.float64)[ends] / n_pos))
    fpr = np.concatenate(([0.0], np.cumsum(~pos, dtype=np.float64)[ends] / n_neg))
    return float(np.trapezoid(tpr, fpr))


def pro_curve(
    masks: np.ndarray,
    maps: np.ndarray,
    ranking: PixelRanking | None = None,
    images: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve at every distinct threshold, from the highest down.

    PRO(t) = mean over ground-truth connected components (8-connected, all images) of the share
    of the component's pixels with map > t; FPR(t) = share of normal pixels with map > t. Each
    component counts equally whatever its size, the point of PRO over pixel AUROC.

    Args:
        masks: (N,H,W) bool ground truth.
        maps: (N,H,W) float anomaly maps.
        ranking: a PixelRanking of `maps` to reuse (else one is made).
        images: (N,) bool, only these images count; None = all.
    Returns:
        (fpr, pro), each (K+1,) float64 starting at (0, 0), both non-decreasing.
    """
    masks = np.asarray(masks, bool)
    sel = np.ones(len(masks), bool) if images is None else np.asarray(images, bool)
    # Per-pixel weights whose cumulative sums, in order of falling map value, are FPR and PRO.
    pro_w = np.zeros(masks.shape, np.float64)
    n_comp = 0
    for i in np.flatnonzero(sel):
        if not masks[i].any():
            continue
        n, labels = cv2.connectedComponents(masks[i].view(np.uint8), connectivity=8)
        area = np.bincount(labels.reshape(-1), minlength=n).astype(np.float64)
        pro_w[i] = np.where(labels > 0, 1.0 / area[labels], 0.0)
        n_comp += n - 1
    n_normal = int((~masks[sel]).sum())
    if n_comp == 0 or n_normal == 0:
        raise ValueError("PRO needs both defective (masked) and normal pixels")
    ranking = ranking if ranking is not None else PixelRanking(maps)
    order = ranking.select(None if images is None else sel)
    fpr = np.cumsum(~masks.reshape(-1)[order], dtype=np.float64) / n_normal
    pro = np.cumsum(pro_w.reshape(-1)[order]) / n_comp
    ends = _run_ends(ranking.values[order])
    return np.concatenate(([0.0], fpr[ends])), np.concatenate(([0.0], pro[ends]))


def au_pro(
    masks: np.ndarray,
    maps: np.ndarray,
    fpr_limit: float = 0.3,
    ranking: PixelRanking | None = None,
    images: np.ndarray | None = None,
) -> float | None:
    """Area under the PRO curve for FPR in [0, fpr_limit], divided by fpr_limit (so in [0, 1]).

    Trapezoidal integration; the curve is interpolated linearly at fpr_limit (MVTec AD's
    evaluation code does the same). None without both defective and normal pixels.

    Args:
        masks: (N,H,W) bool ground truth.
        maps: (N,H,W) float anomaly maps.
        ranking, images: see pro_curve.
    """
    masks = np.asarray(masks, bool)
    chosen = masks if images is None else masks[np.asarray(images, bool)]
    if not chosen.any() or chosen.all():
        return None
    fpr, pro = pro_curve(masks, maps, ranking, images)
    inside = fpr <= fpr_limit
    x, y = fpr[inside], pro[inside]
    if x[-1] < fpr_limit:
        x = np.append(x, fpr_limit)
        y = np.append(y, np.interp(fpr_limit, fpr, pro))
    return float(np.trapezoid(y, x) / fpr_limit)
