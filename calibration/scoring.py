"""Run a bundle over images through edge's own backends: what is measured is what ships."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from calibration.dataset import Sample, read_mask
from edge.backends import load_backend
from edge.bundle import Bundle
from edge.preprocess import read_image, to_input


@dataclass
class Scored:
    samples: list[Sample]
    scores: np.ndarray  # (N,) float32
    maps: np.ndarray | None  # (N,H,W) float32 when kept (needed for pixel metrics)
    masks: np.ndarray | None  # (N,H,W) bool


def score_samples(
    bundle: Bundle,
    samples: list[Sample],
    precision: str = "fp32",
    backend: str = "onnxruntime",
    keep_maps: bool = False,
    progress: bool = True,
) -> Scored:
    """Scores (and optionally anomaly maps and masks) for each sample, in order.

    Raises DataError naming an unreadable image before any output is written.
    """
    be = load_backend(backend, bundle, precision)
    size = bundle.image_size
    b = be.input_shape[0]
    scores = np.zeros(len(samples), np.float32)
    maps = np.zeros((len(samples), *size), np.float32) if keep_maps else None
    masks = np.stack([read_mask(s.mask, size) for s in samples]) if keep_maps else None
    try:
        for i in tqdm(range(0, len(samples), b), desc="scoring", unit="img", disable=not progress):
            chunk = samples[i : i + b]
            x = np.stack([to_input(read_image(s.path), size) for s in chunk])
            if len(x) < b:  # fixed-batch graphs: pad with the last image, drop its outputs
                x = np.concatenate([x, np.repeat(x[-1:], b - len(x), axis=0)])
            amap, score = be.infer(x)
            scores[i : i + len(chunk)] = score[: len(chunk)]
            if maps is not None:
                maps[i : i + len(chunk)] = amap[: len(chunk), 0]
    finally:
        be.close()
    return Scored(samples, scores, maps, masks)
