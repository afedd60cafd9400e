"""Evaluate a bundle on an MVTec-layout category: threshold-free metrics and, when the bundle has
thresholds, the false-reject and escape rates of the device's decision (edge.postprocess),
overall and per defect type."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration import dataset, metrics
from calibration.fit import station_view
from calibration.scoring import score_samples
from edge.bundle import Bundle, Thresholds
from thresholding.decision import (
    FixedRule,
    RegionRule,
    TiedRule,
    area_levels,
    device_decisions,
)
from thresholding.fit import View, rates
from thresholding.scored import Scored


@dataclass
class Evaluation:
    summary: dict  # the JSON document
    scored: Scored
    thresholds: Thresholds | None
    stat: np.ndarray | None  # (N,) decision statistic (None without thresholds)
    rejected: np.ndarray | None  # (N,) bool, edge's decision (None without thresholds)
    view: View = field(default_factory=View)


def rule_from_thresholds(th: Thresholds) -> RegionRule:
    """The RegionRule that calibration fitted (recorded in stats.region), else a fixed one."""
    region = th.stats.get("region", {}) if isinstance(th.stats, dict) else {}
    if region.get("rule") == "tied" and "background" in region and "ratio" in region:
        return TiedRule(float(region["background"]), float(region["ratio"]), th.min_region_area)
    return FixedRule(th.pixel_threshold, th.min_region_area)


def _threshold_free(scored: Scored, ranking: metrics.PixelRanking, sel=None) -> dict:
    """Threshold-free metrics of all images, or of the selected ones ((N,) bool)."""
    labels = ~scored.good
    scores = scored.scores
    if sel is None:
        # scikit-learn for the headline number; per subset the shared ranking (same value).
        pixel = metrics.pixel_auroc(scored.masks, scored.maps)
    else:
        labels, scores = labels[sel], scores[sel]
        pixel = metrics.pixel_auroc_ranked(scored.masks, ranking, sel)
    return {
        "image_auroc": metrics.image_auroc(labels, scores),
        "pixel_auroc": pixel,
        "pro": metrics.au_pro(scored.masks, scored.maps, 0.3, ranking, sel),
        "f1_max": metrics.best_f1(labels, scores),
    }


def evaluate(
    bundle_dir: str | Path,
    data: str | Path,
    precision: str | None = None,
    backend: str = "onnxruntime",
    station: str | Path | None = None,
    progress: bool = True,
) -> Evaluation:
    """Score test/ of an MVTec-layout category with the bundle and compute the metrics.

    Threshold-dependent entries (f1, false_reject_rate, escape_rate, ...) are None, not zero,
    when the bundle has no thresholds.yaml (e.g. straight after export).
    """
    bundle = Bundle(bundle_dir)
    view = station_view(station, bundle.image_size)
    precision = precision or view.precision or "fp32"
    bundle.model_path(precision)
    th = bundle.thresholds(required=False)
    samples = dataset.mvtec_test(data)
    t0 = time.perf_counter()
    scored = score_samples(bundle, samples, precision, backend, view.crop, progress)
    seconds = time.perf_counter() - t0
    labels = ~scored.good
    ranking = metrics.PixelRanking(scored.maps)  # one sort of every pixel, for every subset
    out: dict = {
        "bundle": str(bundle.root),
        "data": str(data),
        "precision": precision,
        "backend": backend,
        "images": len(samples),
        "good_images": int((~labels).sum()),
        "defect_images": int(labels.sum()),
        "masked_images": int(sum(s.mask is not None for s in samples)),
        **_threshold_free(scored, ranking),
        "pro_fpr_limit": 0.3,
        "seconds_per_image": seconds / len(samples),
    }
    per_defect: dict[str, dict] = {}
    kinds = sorted({s.defect for s in samples if s.defect})
    for k in kinds:
        sel = np.array([s.defect == k for s in samples])
        # This defect type against every good part.
        per_defect[k] = {
            "images": int(sel.sum()),
            **_threshold_free(scored, ranking, sel | ~labels),
        }

    stat = rejected = None
    if th is None:
        # Absent, not zero: a bundle straight from export has no thresholds yet.
        out.update(
            thresholds=None,
            f1=None,
            false_reject_rate=None,
            frr_upper_bound=None,
            escape_rate=None,
            false_rejects=None,
            escapes=None,
        )
        for k in kinds:
            per_defect[k].update(escape_rate=None, escapes=None)
    else:
        rejected = device_decisions(scored.maps, scored.scores, _with_station(th, view), view.roi)
        rule = rule_from_thresholds(_with_station(th, view))
        stat = rule.statistic(
            scored.scores.astype(np.float64), area_levels(scored.maps, rule.min_area, view.roi)
        )
        r = rates(rejected, scored)
        out.update(
            thresholds={
                "image": th.image_threshold,
                "pixel": th.pixel_threshold,
                "min_region_area": _with_station(th, view).min_region_area,
                "method": th.method,
                "precision": th.precision,
                "created": th.created,
            },
            f1=metrics.f1(labels, rejected),
            false_reject_rate=r["false_reject_rate"],
            frr_upper_bound=r["frr_upper_bound"],
            escape_rate=r["escape_rate"],
            false_rejects=r["false_rejects"],
            escapes=r["escapes"],
        )
        for k, v in r.get("per_defect", {}).items():
            per_defect[k].update(escape_rate=v["escape_rate"], escapes=v["escapes"])
        if th.precision != precision:
            out["warning"] = (
                f"thresholds were fitted on the {th.precision} graph, evaluated on {precision}"
            )
    out["per_defect"] = per_defect
    return Evaluation(out, scored, th, stat, rejected, view)


def _with_station(th: Thresholds, view: View) -> Thresholds:
    """The thresholds as the station applies them (its min_region_area overrides the file's)."""
    if view.min_area is None or view.min_area == th.min_region_area:
        return th
    from dataclasses import replace

    return replace(th, min_region_area=view.min_area)
