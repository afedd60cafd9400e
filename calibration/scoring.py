"""Run a bundle over images through edge's own backends: what is measured is what ships."""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from calibration.dataset import read_mask
from edge.backends import load_backend
from edge.bundle import Bundle
from edge.errors import BackendError, DataError
from edge.preprocess import read_image, to_input
from thresholding.scored import Sample, Scored


def model_view(sample: Sample, size: tuple[int, int], crop=None) -> np.ndarray:
    """(H,W,3) uint8 RGB: the image exactly as the model saw it (for galleries)."""
    return to_input(read_image(sample.path), size, crop).transpose(1, 2, 0)


def score_samples(
    bundle: Bundle,
    samples: list[Sample],
    precision: str = "fp32",
    backend: str = "onnxruntime",
    crop: tuple[int, int, int, int] | None = None,
    progress: bool = True,
) -> Scored:
    """Scores, anomaly maps and masks for each sample, in order.

    Every image and mask is read here, so an unreadable file raises DataError (naming it) before
    the caller writes anything. Non-finite model outputs raise BackendError.
    """
    if not samples:
        raise DataError("no images to score")
    size = bundle.image_size
    # Masks first: they are cheap, and a bad one should fail before minutes of inference.
    masks = np.stack([read_mask(s.mask, size, crop) for s in samples])
    # Decode every image once before the backend loads: a GPU backend may create its engine
    # cache in the bundle, and a bad file must fail before anything is touched.
    for s in samples:
        read_image(s.path)
    be = load_backend(backend, bundle, precision)
    b = be.input_shape[0]
    scores = np.zeros(len(samples), np.float32)
    maps = np.zeros((len(samples), *size), np.float32)
    try:
        for i in tqdm(range(0, len(samples), b), desc="scoring", unit="img", disable=not progress):
            chunk = samples[i : i + b]
            x = np.stack([to_input(read_image(s.path), size, crop) for s in chunk])
            if len(x) < b:  # fixed-batch graphs: pad with the last image, drop its outputs
                x = np.concatenate([x, np.repeat(x[-1:], b - len(x), axis=0)])
            amap, score = be.infer(x)
            scores[i : i + len(chunk)] = score[: len(chunk)]
            maps[i : i + len(chunk)] = amap[: len(chunk), 0]
    finally:
        be.close()
    bad = ~np.isfinite(scores) | ~np.isfinite(maps).all(axis=(1, 2))
    if bad.any():
        names = ", ".join(str(samples[i].path) for i in np.flatnonzero(bad)[:3])
        raise BackendError(
            f"the model produced non-finite outputs for {int(bad.sum())} images: {names}"
        )
    return Scored(samples, scores, maps, masks, crop)
