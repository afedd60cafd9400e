"""Calibration's detection metrics (calibration/metrics.py): AU-PRO against hand-computed cases,
the rest against their definitions. (Edge's runtime metrics are tested in test_edge_metrics.py.)"""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from calibration import metrics


def row(values, mask):
    """One image of shape (1, len) from lists: (maps (1,1,W), masks (1,1,W))."""
    return (
        np.array(values, np.float32).reshape(1, 1, -1),
        np.array(mask, bool).reshape(1, 1, -1),
    )


# One 1x8 image. Components: A = pixels 0-1 (2 px), B = pixel 7 (1 px); normal = pixels 2-6.
# Falling thresholds:  0.9: A half covered           -> FPR 0,   PRO (0.5 + 0) / 2 = 0.25
#                      0.8: a normal pixel            -> FPR 0.2, PRO 0.25
#                      0.6: B covered                 -> FPR 0.2, PRO (0.5 + 1) / 2 = 0.75
#                      0.4: A fully covered           -> FPR 0.2, PRO 1
#                      0.3, 0.2, 0.1, 0.05: normal    -> FPR 0.4, 0.6, 0.8, 1.0; PRO 1
# Area to FPR 0.3: 0.2 * 0.25 + 0.1 * 1 = 0.15 -> / 0.3 = 0.5.
# Area to FPR 1.0: 0.2 * 0.25 + 0.8 * 1 = 0.85.
HAND_MAP, HAND_MASK = row([0.9, 0.4, 0.8, 0.3, 0.2, 0.1, 0.05, 0.6], [1, 1, 0, 0, 0, 0, 0, 1])


def test_pro_curve_hand_case():
    fpr, pro = metrics.pro_curve(HAND_MASK, HAND_MAP)
    np.testing.assert_allclose(fpr, [0, 0, 0.2, 0.2, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(pro, [0, 0.25, 0.25, 0.75, 1, 1, 1, 1, 1])


def test_au_pro_hand_case():
    assert metrics.au_pro(HAND_MASK, HAND_MAP) == pytest.approx(0.5)
    assert metrics.au_pro(HAND_MASK, HAND_MAP, fpr_limit=1.0) == pytest.approx(0.85)


def test_au_pro_ties_take_all_or_nothing():
    # A 1-px defect and a normal pixel share 0.5: the curve jumps diagonally (0,0) -> (0.5,1).
    # Interpolated at FPR 0.3: PRO 0.6; area 0.5 * 0.3 * 0.6 = 0.09 -> / 0.3 = 0.3.
    maps, masks = row([0.5, 0.5, 0.1], [1, 0, 0])
    assert metrics.au_pro(masks, maps) == pytest.approx(0.3)


def test_au_pro_components_count_equally_whatever_their_size():
    # A 9-px defect above every normal pixel, a 1-px defect below every normal pixel: PRO is
    # 0.5 (one of two components) from FPR 0 until every normal pixel is taken.
    rng = np.random.default_rng(0)
    maps = rng.uniform(0.1, 0.9, (2, 4, 4)).astype(np.float32)
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :3, :3] = True
    maps[0, :3, :3] = 1.0
    masks[1, 0, 0] = True
    maps[1, 0, 0] = 0.0
    assert metrics.au_pro(masks, maps) == pytest.approx(0.5)
    # Pixel AUROC, by contrast, is dominated by the big component: 9 of 10 defect pixels first.
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(0.9)


def test_au_pro_perfect_and_absent():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 16, 16)).astype(np.float32)
    masks = np.zeros_like(maps, bool)
    masks[1, 4:8, 4:9] = True
    masks[2, 10:12, 1:3] = True
    perfect = np.where(masks, 2.0 + maps, maps)
    assert metrics.au_pro(masks, perfect) == pytest.approx(1.0)
    assert metrics.au_pro(np.zeros_like(masks), maps) is None  # no defect pixels


def test_pixel_and_image_auroc_match_sklearn_and_none_for_one_class():
    rng = np.random.default_rng(1)
    maps = rng.random((4, 8, 8))
    masks = maps + rng.normal(0, 0.3, maps.shape) > 0.8
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(
        roc_auc_score(masks.reshape(-1), maps.reshape(-1))
    )
    assert metrics.image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.3, 0.2, 0.9])) == 0.75
    assert metrics.image_auroc(np.zeros(3), np.arange(3.0)) is None
    assert metrics.pixel_auroc(np.zeros((1, 2, 2), bool), np.ones((1, 2, 2))) is None


def test_f1_and_best_f1():
    labels = np.array([0, 0, 0, 1, 1])
    # Reject 2 defects + 1 good: tp 2, fp 1, fn 0 -> F1 = 4 / 5.
    assert metrics.f1(labels, np.array([1, 0, 0, 1, 1])) == pytest.approx(0.8)
    assert metrics.f1(np.zeros(3), np.ones(3)) is None
    assert metrics.best_f1(labels, np.array([0.1, 0.2, 0.3, 0.4, 0.5])) == pytest.approx(1.0)
    assert metrics.best_f1(labels, np.array([0.1, 0.2, 0.45, 0.4, 0.5])) == pytest.approx(0.8)


def test_shared_ranking_matches_sklearn_and_subset_arrays():
    rng = np.random.default_rng(3)
    # Quantised values: many ties, as uint8-derived maps have.
    maps = (rng.integers(0, 40, (6, 12, 12)) / 40).astype(np.float32)
    masks = np.zeros(maps.shape, bool)
    masks[3, 2:6, 2:7] = True
    masks[4, 8:11, 1:3] = True
    masks[4, 0:2, 9:12] = True
    maps[masks] += 0.3
    ranking = metrics.PixelRanking(maps)
    assert metrics.pixel_auroc_ranked(masks, ranking) == pytest.approx(
        roc_auc_score(masks.reshape(-1), maps.reshape(-1)), abs=1e-12
    )
    sel = np.array([1, 1, 0, 0, 1, 0], bool)
    assert metrics.pixel_auroc_ranked(masks, ranking, sel) == pytest.approx(
        roc_auc_score(masks[sel].reshape(-1), maps[sel].reshape(-1)), abs=1e-12
    )
    assert metrics.au_pro(masks, maps, 0.3, ranking, sel) == pytest.approx(
        metrics.au_pro(masks[sel], maps[sel]), abs=1e-12
    )
    assert metrics.au_pro(masks, maps, 0.3, ranking, np.array([1, 1, 0, 0, 0, 0], bool)) is None
