"""Fit thresholds.yaml for a bundle from good (and optionally defective, masked) images.

    images --edge backend--> scores (N,), maps (N,H,W)
      image threshold t0: the strategy on the scores alone
      pixel threshold:    from defect masks (F1 over pixels), else tied to t (decision.TiedRule)
      min region area A:  smallest area no good part that passes t0 reaches at that level
      image threshold t:  the strategy refitted on the decision statistic m (device rejects <=> m > t)
    --verify with edge.postprocess--> thresholds.yaml (+ .bak of the old one), report.html

Nothing is written unless every input was read, scored and the fit succeeded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

from calibration import dataset
from calibration.decision import (
    FixedRule,
    RegionRule,
    TiedRule,
    area_levels,
    device_decisions,
    largest_regions,
)
from calibration.scoring import Scored, score_samples
from calibration.strategies import CONFIDENCE, cp_upper, make_strategy
from edge import typedconfig
from edge.atomic import atomic_write
from edge.bundle import THRESHOLDS, Bundle, Thresholds
from edge.errors import BundleError, DataError, InvalidValue

REPORT = "report.html"
DEFAULT_PIXEL_RATIO = 0.5


@dataclass
class View:
    """How the station shows parts to the model: frame crop, ROI, min-area override."""

    crop: tuple[int, int, int, int] | None = None
    roi: np.ndarray | None = None  # (H,W) bool at model resolution
    min_area: int | None = None  # station's postprocess.min_region_area override
    precision: str | None = None
    source: str | None = None  # the station file


def station_view(station: str | Path | None, size: tuple[int, int]) -> View:
    """The crop, ROI and min-area override of a station config (edge.config), or none."""
    if station is None:
        return View()
    from edge import config as edge_config
    from edge.postprocess import load_roi_mask

    cfg = edge_config.load(station)
    crop = tuple(cfg.preprocess.crop) if cfg.preprocess.crop else None
    roi = load_roi_mask(cfg.postprocess.roi_mask, size) if cfg.postprocess.roi_mask else None
    return View(crop, roi, cfg.postprocess.min_region_area, cfg.precision, str(station))


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


def _collect(
    good: str | Path | None,
    data: str | Path | None,
    defects: str | Path | None,
    masks: str | Path | None,
) -> tuple[list[dataset.Sample], list[str]]:
    if (good is None) == (data is None):
        raise DataError("give exactly one of --good <dir> or --data <MVTec category dir>")
    if masks is not None and defects is None:
        raise DataError("--masks needs --defects")
    warnings = []
    if data is not None:
        samples = dataset.mvtec_test(data)
    else:
        samples = dataset.folder(good, None)
        warnings += _skipped_warning(good)
    if defects is not None:
        samples += dataset.folder(defects, "defect", masks)
        warnings += _skipped_warning(defects)
    return samples, warnings


LINE_SAMPLE = "recalibration.json"  # written by edge.evidence beside the accepted frames


def line_sample_info(folder: str | Path | None) -> dict | None:
    """The sidecar a station writes beside its sample of accepted frames (crop, model), or None.

    Raises DataError when the sidecar is there but unreadable or has a malformed crop.
    """
    if folder is None:
        return None
    path = Path(folder) / LINE_SAMPLE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable line-sample sidecar: {exc}") from exc
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected a JSON object")
    crop = info.get("crop")
    if crop is not None and not (
        isinstance(crop, list) and len(crop) == 4 and all(isinstance(v, int) for v in crop)
    ):
        raise DataError(f"{path}: crop: expected [x, y, w, h] integers, got {crop!r}")
    return info


def _skipped_warning(folder: str | Path) -> list[str]:
    skipped = [p for p in dataset.skipped_files(folder) if p.name != LINE_SAMPLE]
    if not skipped:
        return []
    names = ", ".join(p.name for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    return [f"{folder}: ignored {len(skipped)} files that are not images by name ({names})"]


def _check_settings(pixel_ratio: float, min_area: int | None) -> None:
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
    _check_settings(pixel_ratio, min_area)
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


def fit_thresholds(
    bundle_dir: str | Path,
    good: str | Path | None = None,
    data: str | Path | None = None,
    defects: str | Path | None = None,
    masks: str | Path | None = None,
    strategy: str = "frr",
    target_frr: float = 0.01,
    max_escape: float = 0.0,
    precision: str | None = None,
    backend: str = "onnxruntime",
    pixel_ratio: float = DEFAULT_PIXEL_RATIO,
    min_area: int | None = None,
    station: str | Path | None = None,
    write: bool = True,
    report: bool = True,
    progress: bool = True,
    report_section: Callable[[FitResult], str] | None = None,
) -> FitResult:
    """Score the images with the bundle, fit the thresholds and (if write) save thresholds.yaml
    (previous one kept as thresholds.yaml.bak) and, if report, report.html beside it, with
    `report_section(result)` (HTML) at its top when given.

    Raises:
        BundleError: missing or tampered bundle file. DataError: empty/unreadable input.
        ValueError: impossible settings (target outside (0,1), strategy needs defects, ...).
    """
    make_strategy(strategy, target_frr, max_escape)  # bad settings fail before any work
    _check_settings(pixel_ratio, min_area)
    bundle = Bundle(bundle_dir)
    bundle.verify_all()  # a tampered file anywhere in the bundle stops us before any work
    view = station_view(station, bundle.image_size)
    precision = precision or view.precision or "fp32"
    bundle.model_path(precision)
    samples, warnings = _collect(good, data, defects, masks)
    sample_info = line_sample_info(good)
    if sample_info is not None:
        # Frames kept by a station are raw: crop them as that station did.
        crop = tuple(sample_info["crop"]) if sample_info.get("crop") else None
        if station is None:
            view.crop = crop
        elif crop != view.crop:
            warnings.append(
                f"{Path(good) / LINE_SAMPLE} says the frames were cropped to {crop}, the station "
                f"config {station} to {view.crop}; using the station config's"
            )
    scored = score_samples(bundle, samples, precision, backend, view.crop, progress)
    result = fit_scored(scored, strategy, target_frr, max_escape, pixel_ratio, min_area, view)
    if sample_info is not None:
        warnings += _truncation_warning(bundle, scored)
    result.warnings[:0] = warnings
    if sample_info is not None:
        result.thresholds.stats["line_sample"] = _plain(
            {k: sample_info[k] for k in ("station", "line", "crop") if k in sample_info}
        )
    result.thresholds.model_sha256 = bundle.model_sha256(precision)
    result.thresholds.precision = precision
    if write:
        html = None
        if report:
            from calibration.report import fit_report

            html = fit_report(bundle, result)  # rendered before anything is written
            if report_section is not None:
                html = html.replace("</div>", "</div>" + report_section(result), 1)
        result.path = write_thresholds(bundle, result.thresholds)
        if html is not None:
            result.report_path = write_with_backup(bundle.root / REPORT, html)
    return result


def _truncation_warning(bundle: Bundle, scored: Scored) -> list[str]:
    """A station's sample holds only parts the thresholds in force accepted: its scores stop at
    the old image threshold, so a fit on it alone can only keep or lower that threshold."""
    try:
        old = bundle.thresholds(required=False)
    except BundleError:
        return []  # an unreadable old file says nothing about the sample; fit replaces it
    if old is None or scored.scores.max() > old.image_threshold:
        return []
    return [
        f"every frame scores at or below the image threshold in force ({old.image_threshold:.5g}): "
        "a sample of accepted parts is cut off there, so this fit cannot raise the threshold; "
        "add good parts the line rejected (checked by a person) to see the high tail"
    ]


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
        "fit": _plain(fit_info),
        "region": _plain(region_info),
        "fit_set": _plain(rates(rejected, scored)),
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


def _plain(obj):
    """numpy scalars -> Python (yaml.safe_dump only takes plain types)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def write_with_backup(path: Path, text: str) -> Path:
    """Atomically replace `path`, first copying the old file to <name>.bak.

    A copy, not a rename: the file never disappears, so `edge run` watching it never sees a gap.
    """
    mode = 0o644
    if path.is_file():
        mode = path.stat().st_mode & 0o777
        atomic_write(path.with_name(path.name + ".bak"), path.read_bytes(), mode)
    atomic_write(path, text, mode)
    return path


def write_thresholds(bundle: Bundle, th: Thresholds) -> Path:
    text = yaml.safe_dump(typedconfig.to_dict(th), sort_keys=False)
    # Round-trip through the loader the device uses: never write a file edge would refuse.
    typedconfig.from_dict(Thresholds, yaml.safe_load(text), source=THRESHOLDS)
    return write_with_backup(bundle.thresholds_path, text)


__all__ = ["FitResult", "View", "fit_scored", "fit_thresholds", "rates", "station_view"]
