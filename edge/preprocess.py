"""Frame -> model input. The graph does normalisation; here we only crop, resize and transpose.

Training (train/), calibration and the device all call these functions, so what the model sees
in training is byte-for-byte what it sees on the line (no train/serve skew).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def to_input(
    frame_bgr: np.ndarray, size: tuple[int, int], crop: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """Camera frame -> model input.

    Args:
        frame_bgr: (H0,W0,3) uint8 BGR (OpenCV order) or (H0,W0) gray.
        size: (H, W) of the graph input.
        crop: optional (x, y, w, h) region of interest in frame pixels, applied before resizing.
    Returns:
        (3,H,W) uint8 RGB, C-contiguous.
    """
    if frame_bgr.ndim == 2:
        frame_bgr = cv2.cvtColor(frame_bgr, cv2.COLOR_GRAY2BGR)
    if crop is not None:
        x, y, w, h = crop
        frame_bgr = frame_bgr[y : y + h, x : x + w]
    h, w = size
    if frame_bgr.shape[:2] != (h, w):
        # INTER_AREA for downscaling avoids aliasing that would look like texture defects.
        frame_bgr = cv2.resize(frame_bgr, (w, h), interpolation=cv2.INTER_AREA)
    rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as (H,W,3) uint8 BGR. Raises DataError naming the file."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: not a readable image")
    return img


def list_images(folder: str | Path) -> list[Path]:
    """Sorted image files in a folder (non-recursive). Raises DataError if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_batch(paths: list[Path], size: tuple[int, int]) -> np.ndarray:
    """Image files -> (B,3,H,W) uint8 RGB."""
    return np.stack([to_input(read_image(p), size) for p in paths])
