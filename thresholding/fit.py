"""Fit the station's three thresholds on scored images: the algorithm `calibration fit` runs
and `engines quantize` runs for its decision check (engines.qcheck), in a package of its own so
that neither tool imports the other.

    scores (N,), maps (N,H,W)
      image threshold t0: the strategy on the scores alone
      pixel threshold:    from defect masks (F1 over pixels), else tied to t (decision.TiedRule)
      min region area A:  smallest area no good part that passes t0 reaches at that level
      image threshold t:  the strategy refitted on the decision statistic m (device rejects <=> m > t)

No I/O: reading images, scoring them and writing thresholds.yaml are calibration's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edge.bundle import Thresholds
from edge.errors import DataError, InvalidValue
from thresholding.decision import (
    FixedRule,
    RegionRule,
    TiedRule,
    area_levels,
    device_decisions,
    largest_regions,
)
from thresholding.scored import Scored
from thresholding.strategies import CONFIDENCE, cp_upper, make_strategy

DEFAULT_PIXEL_RATIO = 0.5


@dataclass
class View:
    """How the station shows parts to the model: frame crop, ROI, min-area override."""

    crop: tuple[int, int, int, int] | None = None
    roi: np.ndarray | None = None  # (H,W) bool at model resolution
    min_area: int | None = None  # station's postprocess.min_region_area override
    precision: str | None = None
    source: str | None = None  # the station file


@dataclass
class FitResult:
    thresholds: Thresholds
    scored: Scored
    stat: np.ndarray  # (N,) decision statistic m: device rejects <=> m > image threshold
    rejected: np.ndarray  # (N,) bool, edge.postprocess's decision at the fitted thresholds
    view: View
    warnings: list[str] = field(default_factory=list)
    path: Path | None = None
    report_path: Path | None = None


def score_stats(scores: np.ndarray) -> dict:
    s = np.asarray(scores, np.float64)
    if s.size == 0:
        return {"n": 0}
    q = np.quantile(s, [0.5, 0.9, 0.99])
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


def pixel_values(maps: np.ndarray, roi: np.ndarray | None) -> np.ndarray:
    """(N,H,W) maps -> 1-D values of the pixels the device inspects (inside the ROI)."""
    return maps[:, roi].reshape(-1) if roi is not None else maps.reshape(-1)


def pixel_threshold_from_masks(
    maps: np.ndarray, masks: np.ndarray, roi: np.ndarray | None = None
) -> tuple[float, float]:
    """F1-optimal pixel threshold (pixel > t = defective) over the pixels of masked images.

    Args:
        maps: (N,H,W) anomaly maps of the defect images that have masks.
        masks: (N,H,W) bool ground truth.
    Returns:
        (threshold, pixel F1 at it)
    """
    vals = pixel_values(maps, roi).astype(np.float64)
    gt = pixel_values(masks, roi)
    if not gt.any():
        raise DataError("defect masks are all empty inside the inspected area")
    order = np.argsort(-vals, kind="stable")
    v, g = vals[order], gt[order]
    tp = np.cumsum(g)
    fp = np.cumsum(~g)
    # Only the last of a run of equal values is a reachable cut (pixel > t is all or none of it).
    ends = np.flatnonzero(np.append(v[1:] != v[:-1], True))
    f1 = 2 * tp[ends] / (tp[ends] + fp[ends] + gt.sum())
    j = int(np.argmax(f1))
    i = ends[j]
    t = (v[i] + v[i + 1]) / 2 if i + 1 < v.size else float(np.nextafter(v[i], -np.inf))
    return float(t), float(f1[j])


def check_settings(pixel_ratio: float, min_area: int | None) -> None:
    """Pixel ratio and minimum area, checked before any work (fit_thresholds) and in the fit."""
    if not 0.0 < pixel_ratio <= 1.0:
        raise InvalidValue(f"--pixel-ratio: must be in (0, 1], got {pixel_ratio:g}")
    if min_area is not None and min_area < 1:
        raise InvalidValue(f"--min-area: must be >= 1, got {min_area}")


def fit_scored(
    scored: Scored,
    strategy: str = "frr",
    target_frr: float = 0.01,
    max_escape: float = 0.0,
    pixel_ratio: float = DEFAULT_PIXEL_RATIO,
    min_area: int | None = None,
    view: View | None = None,
) -> FitResult:
    """Fit the three thresholds on already scored images (no I/O).

    The returned Thresholds have no model hash or precision yet (fit_thresholds sets them).
    """
    rule_strategy = make_strategy(strategy, target_frr, max_escape)
    check_settings(pixel_ratio, min_area)
    view = view or View()
    is_good = scored.good
    if not is_good.any():
        raise DataError("no good images to fit on")
    warnings: list[str] = []
    s = scored.scores.astype(np.float64)
    s_good, s_def = s[is_good], s[~is_good]

    # 1. Image threshold on the scores alone: the passing good parts bound the region test.
    t0 = rule_strategy.fit(s_good, s_def if s_def.size else None).threshold
    passing_good = is_good & (s <= t0)
    good_px = pixel_values(scored.maps[is_good], view.roi)
    background = float(np.median(good_px))
    masked = ~is_good & np.array([smp.mask is not None for smp in scored.samples])
    area_fixed = view.min_area if view.min_area is not None else min_area

    # 2. Pixel threshold and minimum area.
    region_info: dict = {"background": background}
    if masked.any():
        level0, pix_f1 = pixel_threshold_from_masks(
            scored.maps[masked], scored.masks[masked], view.roi
        )
        region_info.update(
            rule="fixed",
            pixel_method=f"F1-optimal over the pixels of {int(masked.sum())} masked defect images",
            pixel_f1=pix_f1,
        )
    else:
        level0 = TiedRule(background, pixel_ratio, 1).pixel_threshold(t0)
        region_info.update(
            rule="tied",
            ratio=pixel_ratio,
            pixel_method=(
                f"background (median good pixel) + {pixel_ratio:g} x (image threshold - background)"
            ),
        )
    if area_fixed is not None:
        area = int(area_fixed)
        region_info["area_method"] = (
            f"station {view.source} postprocess.min_region_area"
            if view.min_area is not None
            else "given (--min-area)"
        )
    else:
        regions = largest_regions(scored.maps[passing_good], level0, view.roi)
        area = int(regions.max(initial=0)) + 1
        region_info["area_method"] = (
            f"1 + largest region any of the {int(passing_good.sum())} good parts below the image "
            "threshold has at the pixel threshold"
        )
    rule: RegionRule = (
        FixedRule(level0, area) if masked.any() else TiedRule(background, pixel_ratio, area)
    )

    # 3. Refit the image threshold on what the device thresholds.
    levels = area_levels(scored.maps, area, view.roi)
    m = rule.statistic(s, levels)
    fit = rule_strategy.fit(m[is_good], m[~is_good] if s_def.size else None)
    warnings += fit.warnings
    t = fit.threshold
    t_pix = rule.pixel_threshold(t)
    below = m <= t
    if isinstance(rule, TiedRule) and below.any():
        # g > t_pix must fail for every part below t; float rounding of the tie can break that.
        t_pix = max(t_pix, float(levels[below].max()))

    th = Thresholds(
        image_threshold=float(t),
        pixel_threshold=float(t_pix),
        min_region_area=int(area),
        method=strategy,
        targets=_targets(strategy, target_frr, max_escape),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    rejected = device_decisions(scored.maps, scored.scores, th, view.roi)
    mismatch = int(np.sum(rejected != (m > t)))
    if mismatch:
        warnings.append(
            f"edge's decision differs from the fitted statistic on {mismatch} images; the rates "
            "reported are edge's"
        )
    th.stats = _stats(scored, rejected, fit.info, region_info, good_px, view)
    return FitResult(th, scored, m, rejected, view, warnings)


def _targets(strategy: str, target_frr: float, max_escape: float) -> dict:
    if strategy == "frr":
        return {"target_frr": target_frr, "confidence": CONFIDENCE}
    if strategy == "escape":
        return {"max_escape": max_escape}
    return {}


def rates(rejected: np.ndarray, scored: Scored) -> dict:
    """False-reject and escape counts/rates of a decision vector, overall and per defect type."""
    good = scored.good
    n_good, n_def = int(good.sum()), int((~good).sum())
    fr = int((rejected & good).sum())
    esc = int((~rejected & ~good).sum())
    out: dict = {
        "good": n_good,
        "false_rejects": fr,
        "false_reject_rate": fr / n_good if n_good else None,
        "frr_upper_bound": cp_upper(fr, n_good) if n_good else None,
        "defects": n_def,
        "escapes": esc,
        "escape_rate": esc / n_def if n_def else None,
    }
    kinds = sorted({smp.defect for smp in scored.samples if smp.defect})
    if kinds:
        per = {}
        for k in kinds:
            sel = np.array([smp.defect == k for smp in scored.samples])
            e = int((~rejected & sel).sum())
            per[k] = {"images": int(sel.sum()), "escapes": e, "escape_rate": e / int(sel.sum())}
        out["per_defect"] = per
    return out


def _stats(
    scored: Scored,
    rejected: np.ndarray,
    fit_info: dict,
    region_info: dict,
    good_px: np.ndarray,
    view: View,
) -> dict:
    good = scored.good
    q = np.quantile(good_px, [0.5, 0.99, 0.999])
    stats = {
        "good": score_stats(scored.scores[good]),
        "good_pixels": {"p50": float(q[0]), "p99": float(q[1]), "p99.9": float(q[2])},
        "fit": plain(fit_info),
        "region": plain(region_info),
        "fit_set": plain(rates(rejected, scored)),
        "images": sorted({str(Path(smp.path).parent) for smp in scored.samples}),
    }
    if (~good).any():
        stats["defect"] = score_stats(scored.scores[~good])
    if view.crop is not None or view.roi is not None:
        stats["station"] = {
            "file": view.source,
            "crop": list(view.crop or []),
            "roi": bool(view.roi is not None),
        }
    return stats


def plain(obj):
    """numpy scalars -> Python (yaml.safe_dump only takes plain types)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


__all__ = [
    "DEFAULT_PIXEL_RATIO",
    "FitResult",
    "View",
    "check_settings",
    "fit_scored",
    "plain",
    "rates",
    "score_stats",
]
