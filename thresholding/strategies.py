"""Image-threshold strategies. One small Protocol, an explicit registry, one shared test.

A part is rejected when its decision statistic (thresholding.decision; the image score when the
region test is off) is strictly above the threshold. Values may be +inf: a part that the fixed
region test rejects at any image threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from scipy.stats import beta

from edge.errors import DataError, InvalidValue

CONFIDENCE = 0.95


@dataclass
class Fit:
    threshold: float
    info: dict = field(default_factory=dict)  # what a quality engineer needs to defend it
    warnings: list[str] = field(default_factory=list)


class ThresholdStrategy(Protocol):
    name: str

    def fit(self, good: np.ndarray, defect: np.ndarray | None) -> Fit:
        """good: (N,) scores of good parts; defect: (M,) scores of defective parts or None."""


def cp_upper(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound of a binomial rate with k events in n trials."""
    if k >= n:
        return 1.0
    return float(beta.ppf(confidence, k + 1, n - k))


def images_needed(target: float, confidence: float = CONFIDENCE) -> int:
    """Good images needed to show FRR <= target with zero false rejects observed."""
    return math.ceil(math.log(1.0 - confidence) / math.log(1.0 - target))


@dataclass
class FalseRejectRate:
    """Lowest threshold whose false-reject rate is <= target with 95% confidence (Clopper-Pearson).

    Lowest, because every step up lets more defects escape; the bound, not the point estimate,
    because a quality engineer must defend the rate on parts not yet seen.
    """

    target_frr: float = 0.01
    name: str = "frr"

    def fit(self, good: np.ndarray, defect: np.ndarray | None = None) -> Fit:
        s = np.sort(np.asarray(good, dtype=np.float64))
        n = s.size
        if n == 0:
            raise DataError("frr: no good scores to fit on")
        # With the threshold at s[n-1-k], exactly k good parts (those above it) are rejected.
        k = 0
        while k + 1 < n and cp_upper(k + 1, n) <= self.target_frr:
            k += 1
        if not np.isfinite(s[n - 1 - k]):
            raise DataError(
                f"frr: the region test alone rejects {int(np.isinf(s).sum())} of {n} good parts, "
                f"more than the {k} the target allows; raise the minimum region area"
            )
        fit = Fit(
            threshold=float(s[n - 1 - k]),
            info={
                "target_frr": self.target_frr,
                "confidence": CONFIDENCE,
                "good_images": n,
                # Fewer than k when good scores tie at the threshold; the bound stays that of
                # the order statistic the threshold sits on.
                "false_rejects_on_fit_set": int(np.sum(s > s[n - 1 - k])),
                "frr_upper_bound": cp_upper(k, n),
            },
        )
        if cp_upper(0, n) > self.target_frr:
            need = images_needed(self.target_frr)
            fit.warnings.append(
                f"{n} good images cannot show FRR <= {self.target_frr:g} at {CONFIDENCE:.0%} "
                f"confidence (upper bound {cp_upper(0, n):.3f}); {need} are needed. "
                "Threshold set at the highest good score."
            )
        if defect is not None and len(defect):
            fit.info["escape_rate_on_fit_set"] = float(np.mean(np.asarray(defect) <= fit.threshold))
        return fit


@dataclass
class BestF1:
    """Threshold maximising F1 (defect = positive) on labelled good and defective parts."""

    name: str = "f1"

    def fit(self, good: np.ndarray, defect: np.ndarray | None) -> Fit:
        if defect is None or len(defect) == 0:
            raise DataError("f1: needs defective images (--defects or --data with test defects)")
        good, defect = np.asarray(good, float), np.asarray(defect, float)
        both = np.concatenate([good, defect])
        cands = np.unique(both[np.isfinite(both)])
        if cands.size == 0:
            raise DataError("f1: every part is rejected by the region test alone")
        tp = len(defect) - np.searchsorted(np.sort(defect), cands, side="right")
        fp = len(good) - np.searchsorted(np.sort(good), cands, side="right")
        fn = len(defect) - tp
        f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
        i = int(np.argmax(f1))
        # Midway to the next candidate: same F1 on this set, margin on both sides.
        t = float(cands[i] if i + 1 == len(cands) else (cands[i] + cands[i + 1]) / 2)
        return Fit(
            t,
            {
                "f1": float(f1[i]),
                "frr_on_fit_set": float(fp[i] / len(good)),
                "escape_rate_on_fit_set": float(fn[i] / len(defect)),
            },
        )


@dataclass
class EscapeBudget:
    """Highest threshold whose escape rate (defects passed) on the labelled set is <= max_escape."""

    max_escape: float = 0.0
    name: str = "escape"

    def fit(self, good: np.ndarray, defect: np.ndarray | None) -> Fit:
        if defect is None or len(defect) == 0:
            raise DataError(
                "escape: needs defective images (--defects or --data with test defects)"
            )
        d = np.sort(np.asarray(defect, float))
        g = np.asarray(good, float)
        # The floor(max_escape * n) lowest-scoring defects may pass; the tiny epsilon keeps a
        # budget that is an exact multiple of 1/n (0.2 of 5) from rounding down to one fewer.
        allowed = min(int(math.floor(self.max_escape * len(d) + 1e-9)), len(d))
        if allowed == len(d):
            # Every defect may escape: only parts above every good one need rejecting.
            t = float(g.max()) if g.size else float(d[-1])
        elif np.isfinite(d[allowed]):
            # Reject if m > t: t just below the first defect that must be caught.
            t = float(np.nextafter(d[allowed], -np.inf))
        else:
            # The rest are caught by the region test whatever t is: spare the good parts.
            finite = np.concatenate([d[np.isfinite(d)], g[np.isfinite(g)]])
            if finite.size == 0:
                raise DataError("escape: every part is rejected by the region test alone")
            t = float(finite.max())
        return Fit(
            t,
            {
                "max_escape": self.max_escape,
                "escapes_on_fit_set": int(np.sum(d <= t)),
                "frr_on_fit_set": float(np.mean(g > t)) if g.size else None,
            },
        )


STRATEGIES = {"frr": FalseRejectRate, "f1": BestF1, "escape": EscapeBudget}


def make_strategy(
    name: str, target_frr: float = 0.01, max_escape: float = 0.0
) -> ThresholdStrategy:
    if not 0.0 < target_frr < 1.0:
        raise InvalidValue(f"--target-frr: must be in (0, 1), got {target_frr:g}")
    if not 0.0 <= max_escape < 1.0:
        raise InvalidValue(f"--max-escape: must be in [0, 1), got {max_escape:g}")
    if name == "frr":
        return FalseRejectRate(target_frr=target_frr)
    if name == "escape":
        return EscapeBudget(max_escape=max_escape)
    if name in STRATEGIES:
        return STRATEGIES[name]()
    raise InvalidValue(f"unknown strategy {name!r}, expected one of {list(STRATEGIES)}")
