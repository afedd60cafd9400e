"""Labelled image sets for calibration: MVTec AD layout or plain folders.

Only the listing happens here; pixels are read (and unreadable files reported) during scoring,
before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge.errors import DataError
from edge.preprocess import IMAGE_SUFFIXES, list_images
from thresholding.scored import Sample


def skipped_files(folder: str | Path) -> list[Path]:
    """Plain files in `folder` that are not images by suffix (hidden files excepted).

    Listed so the caller can warn: a line's sample folder may hold sidecar files, but a folder of
    misnamed images should not be silently ignored either.
    """
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_SUFFIXES
    )


def mvtec_test(root: str | Path) -> list[Sample]:
    """test/good and test/<defect> images of an MVTec-layout category, with ground-truth masks."""
    root = Path(root)
    test = root / "test"
    if not test.is_dir():
        raise DataError(f"{root}: no test/ folder (expected MVTec AD layout: test/good, ...)")
    samples: list[Sample] = []
    for sub in sorted(p for p in test.iterdir() if p.is_dir()):
        defect = None if sub.name == "good" else sub.name
        for img in list_images(sub):
            mask = None
            if defect is not None:
                cand = root / "ground_truth" / defect / f"{img.stem}_mask.png"
                mask = cand if cand.is_file() else None
            samples.append(Sample(img, defect, mask))
    if not any(s.good for s in samples):
        raise DataError(f"{test}/good: no good test images")
    return samples


def folder(path: str | Path, defect: str | None, masks: str | Path | None = None) -> list[Sample]:
    """A plain folder of good (defect=None) or defective images; masks as <stem>_mask.png.

    Raises DataError when the folder is missing or holds no images, or when `masks` is given but
    is not a folder or matches none of the images.
    """
    if masks is not None and not Path(masks).is_dir():
        raise DataError(f"{masks}: mask folder not found")
    out = []
    for img in list_images(path):
        mask = None
        if masks is not None:
            for cand in (Path(masks) / f"{img.stem}_mask.png", Path(masks) / img.name):
                if cand.is_file():
                    mask = cand
                    break
        out.append(Sample(img, defect, mask))
    if masks is not None and not any(s.mask for s in out):
        raise DataError(f"{masks}: no <name>_mask.png for any image in {path}")
    return out


def read_mask(
    path: Path | None, size: tuple[int, int], crop: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """(H,W) bool at model resolution, cropped like the frame; all False when there is no mask."""
    h, w = size
    if path is None:
        return np.zeros((h, w), bool)
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise DataError(f"{path}: not a readable mask image")
    if crop is not None:
        x, y, cw, ch = crop
        m = m[y : y + ch, x : x + cw]
    # Nearest keeps the mask binary; the frame itself was resized with INTER_AREA.
    return cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST) > 127


__all__ = ["Sample", "mvtec_test", "folder", "read_mask", "skipped_files", "IMAGE_SUFFIXES"]
