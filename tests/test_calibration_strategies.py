"""Threshold strategies (one shared test for every registered one), the Clopper-Pearson logic,
and the equivalence between the decision statistic and edge's post-processing."""

import numpy as np
import pytest
from scipy.stats import norm

from edge.bundle import Thresholds
from edge.errors import DataError
from thresholding.decision import (
    FixedRule,
    TiedRule,
    area_level,
    area_levels,
    device_decisions,
    largest_region,
)
from thresholding.strategies import (
    STRATEGIES,
    BestF1,
    EscapeBudget,
    FalseRejectRate,
    cp_upper,
    images_needed,
    make_strategy,
)


def labelled(seed=0, n_good=300, n_def=40):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, n_good), rng.normal(2.5, 1, n_def)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_meets_its_own_promise_on_the_fit_set(name):
    good, defect = labelled()
    strat = make_strategy(name, target_frr=0.02, max_escape=0.1)
    fit = strat.fit(good, defect)
    t = fit.threshold
    assert np.isfinite(t)
    frr, esc = np.mean(good > t), np.mean(defect <= t)
    if name == "frr":
        assert cp_upper(int(np.sum(good > t)), good.size) <= 0.02
        assert fit.info["frr_upper_bound"] <= 0.02
        assert fit.info["false_rejects_on_fit_set"] == int(np.sum(good > t))
    elif name == "escape":
        assert esc <= 0.1
        assert fit.info["escapes_on_fit_set"] == int(np.sum(defect <= t))
        # Highest such threshold: the next defect up would be one escape too many.
        assert np.sum(defect <= np.min(defect[defect > t])) / defect.size > 0.1
    else:
        tp = np.sum(defect > t)
        assert fit.info["f1"] == pytest.approx(
            2 * tp / (2 * tp + np.sum(good > t) + np.sum(defect <= t))
        )
        assert fit.info["frr_on_fit_set"] == pytest.approx(frr)


def test_clopper_pearson_and_images_needed():
    # Zero rejects in n: the bound is 1 - 0.05^(1/n); 149 is the first n under 2%.
    assert images_needed(0.02) == 149
    assert cp_upper(0, 149) <= 0.02 < cp_upper(0, 148)
    assert cp_upper(0, 100) == pytest.approx(1 - 0.05 ** (1 / 100))
    assert cp_upper(5, 5) == 1.0


def test_frr_warns_with_images_needed_when_too_few():
    fit = FalseRejectRate(0.02).fit(np.linspace(0, 1, 100))
    assert fit.threshold == 1.0  # highest good score: nothing rejected
    assert len(fit.warnings) == 1 and "149 are needed" in fit.warnings[0]
    assert not FalseRejectRate(0.02).fit(np.linspace(0, 1, 149)).warnings


def test_frr_bound_holds_on_unseen_parts():
    """Coverage: over many calibration sets, the true FRR exceeds the target in <= 5% of them."""
    rng = np.random.default_rng(0)
    n, target, trials = 300, 0.02, 2000
    exceed = 0
    for _ in range(trials):
        t = FalseRejectRate(target).fit(rng.normal(0, 1, n)).threshold
        exceed += norm.sf(t) > target  # true rate for N(0,1) good scores
    # Nominal 5%; the order-statistic bound is exact, so allow Monte-Carlo noise only.
    assert exceed / trials <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / trials)
    assert exceed > 0  # and it is not absurdly conservative either


def test_strategies_need_defects_and_valid_targets():
    good = np.linspace(0, 1, 10)
    for strat in (BestF1(), EscapeBudget(0.1)):
        with pytest.raises(DataError, match="needs defective images"):
            strat.fit(good, None)
    with pytest.raises(ValueError, match="target-frr"):
        make_strategy("frr", target_frr=1.5)
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("median")


def test_strategies_with_region_caught_parts():
    good = np.array([0.1, 0.2, 0.3, np.inf])  # one good part the region test always rejects
    with pytest.raises(DataError, match="region test alone rejects"):
        FalseRejectRate(0.01).fit(good)
    defect = np.array([0.25, np.inf, np.inf])
    t = EscapeBudget(0.0).fit(good[:3], defect).threshold
    assert t < 0.25 and np.sum(defect <= t) == 0
    assert np.isfinite(BestF1().fit(good[:3], defect).threshold)


# ------------------------------------------------------------------ decision statistic
def smooth_maps(n=20, size=(24, 24), seed=0):
    import cv2

    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(n):
        m = rng.random(size).astype(np.float32)
        maps.append(cv2.GaussianBlur(m, (0, 0), 1.5))
    return np.stack(maps)


def test_area_level_is_where_the_region_test_switches():
    maps = smooth_maps()
    rng = np.random.default_rng(1)
    for m in maps:
        for area in (1, 5, 30):
            g = area_level(m, area)
            for t in rng.uniform(m.min() - 0.01, m.max(), 15):
                assert (largest_region(m > t) >= area) == (g > t)
            assert largest_region(m >= g) >= area
    assert area_level(maps[0], maps[0].size + 1) == -np.inf


@pytest.mark.parametrize("rule_kind", ["tied", "fixed"])
def test_decision_statistic_matches_edge_postprocess(rule_kind):
    maps = smooth_maps(40)
    scores = maps.max(axis=(1, 2)) * np.random.default_rng(2).uniform(0.9, 1.1, len(maps))
    roi = np.ones(maps.shape[1:], bool)
    roi[:, :4] = False
    area = 12
    if rule_kind == "tied":
        rule = TiedRule(background=float(np.median(maps)), ratio=0.5, min_area=area)
    else:
        rule = FixedRule(pixel=float(np.quantile(maps, 0.9)), min_area=area)
    m = rule.statistic(scores.astype(np.float64), area_levels(maps, area, roi))
    for t in np.quantile(m[np.isfinite(m)], [0.1, 0.5, 0.8, 0.95]):
        th = Thresholds(float(t), rule.pixel_threshold(float(t)), area)
        np.testing.assert_array_equal(device_decisions(maps, scores, th, roi), m > t)
