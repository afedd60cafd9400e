"""Fit thresholds.yaml for a bundle from good (and optionally defective, masked) images.

    images --edge backend--> scores (N,), maps (N,H,W)
      --thresholding.fit.fit_scored--> image threshold, pixel threshold, min region area
    --verify with edge.postprocess--> thresholds.yaml (+ .bak of the old one), report.html

This module reads the images and writes the files; the fit itself is thresholding.fit's (shared
with `engines quantize`'s decision check). Nothing is written unless every input was read,
scored and the fit succeeded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import yaml

from calibration import dataset
from calibration.scoring import score_samples
from edge import typedconfig
from edge.atomic import atomic_write
from edge.bundle import THRESHOLDS, Bundle, Thresholds
from edge.errors import BundleError, DataError
from thresholding.fit import (
    DEFAULT_PIXEL_RATIO,
    FitResult,
    View,
    check_settings,
    fit_scored,
    plain,
)
from thresholding.scored import Scored
from thresholding.strategies import make_strategy

REPORT = "report.html"


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
    check_settings(pixel_ratio, min_area)
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
        result.thresholds.stats["line_sample"] = plain(
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


__all__ = ["fit_thresholds", "line_sample_info", "station_view", "write_thresholds"]
