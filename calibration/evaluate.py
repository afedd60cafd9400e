"""Evaluate a bundle on an MVTec-layout category: threshold-free metrics and, when the bundle has
thresholds, the false-reject and escape rates they give, overall and per defect type."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from calibration import dataset, metrics
from calibration.scoring import score_samples
from edge.bundle import Bundle


def evaluate(
    bundle_dir: str | Path,
    data: str | Path,
    precision: str = "fp32",
    backend: str = "onnxruntime",
    progress: bool = True,
) -> dict:
    """Returns a JSON-able dict: image_auroc, pixel_auroc, pro, f1, rates, per_defect, timing."""
    bundle = Bundle(bundle_dir)
    samples = dataset.mvtec_test(data)
    t0 = time.perf_counter()
    scored = score_samples(bundle, samples, precision, backend, keep_maps=True, progress=progress)
    seconds = time.perf_counter() - t0
    labels = np.array([s.defect is not None for s in samples])
    out: dict = {
        "bundle": str(bundle.root),
        "data": str(data),
        "precision": precision,
        "backend": backend,
        "images": len(samples),
        "good_images": int((~labels).sum()),
        "defect_images": int(labels.sum()),
        "image_auroc": metrics.image_auroc(labels, scored.scores),
        "pixel_auroc": metrics.pixel_auroc(scored.masks, scored.maps),
        "pro": metrics.au_pro(scored.masks, scored.maps),
        "seconds_per_image": seconds / len(samples),
    }
    th = bundle.thresholds(required=False)
    per_defect: dict[str, dict] = {}
    defects = sorted({s.defect for s in samples if s.defect})
    good_scores = scored.scores[~labels]
    for d in defects:
        sel = np.array([s.defect == d for s in samples])
        both = sel | ~labels
        per_defect[d] = {
            "images": int(sel.sum()),
            "image_auroc": metrics.image_auroc(labels[both], scored.scores[both]),
        }
    if th is None:
        # Absent, not zero: a bundle straight from export has no thresholds yet.
        out.update(thresholds=None, false_reject_rate=None, escape_rate=None, f1=None)
    else:
        rejected = scored.scores > th.image_threshold
        tp = int((rejected & labels).sum())
        fp = int((rejected & ~labels).sum())
        fn = int((~rejected & labels).sum())
        out.update(
            thresholds={
                "image": th.image_threshold,
                "pixel": th.pixel_threshold,
                "min_region_area": th.min_region_area,
                "method": th.method,
            },
            false_reject_rate=float(np.mean(good_scores > th.image_threshold)),
            escape_rate=float(np.mean(~rejected[labels])) if labels.any() else None,
            f1=2 * tp / max(2 * tp + fp + fn, 1),
        )
        for d in defects:
            sel = np.array([s.defect == d for s in samples])
            per_defect[d]["escape_rate"] = float(np.mean(~rejected[sel]))
    out["per_defect"] = per_defect
    return out
