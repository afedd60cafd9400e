"""Parity of two implementations of the same graph on real images (no torch: runs on the device).

Used for torch vs ONNX Runtime at export and for a TensorRT engine vs ONNX Runtime after a build.
The anomaly-map difference is judged against the map's range over the images (a map in [0, 0.3]
and one in [0, 2] need different absolute tolerances); scores relative to themselves, or to their
image's map range when that is larger (a normalised score near 0 has no relative precision).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Tuple

import numpy as np

from edge.errors import LineInspectError
from edge.preprocess import load_batch

# typing.Tuple: evaluated at import, and the device side runs on Python 3.8 (JetPack 5)
Infer = Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]  # (B,3,H,W) uint8 -> maps, scores


class ParityError(LineInspectError):
    """Two implementations of the graph disagree beyond tolerance."""


@dataclass
class ParityReport:
    images: int
    map_max_abs: float  # max over images and pixels of |map_ref - map_test|
    map_range: float  # max - min of the reference maps over all images
    score_max_rel: float  # max over images of |s_ref - s_test| / max(|s_ref|, map range)
    worst_image: str  # the image furthest beyond (or closest to) its tolerance
    worst_map_abs: float  # that image's map difference
    worst_score_rel: float  # that image's score difference
    map_tol: float  # allowed map difference, as a fraction of map_range
    score_rtol: float  # allowed relative score difference

    @property
    def map_limit(self) -> float:
        return self.map_tol * max(self.map_range, 1e-12)

    @property
    def ok(self) -> bool:
        return self.map_max_abs <= self.map_limit and self.score_max_rel <= self.score_rtol

    def summary(self) -> str:
        return (
            f"{self.images} images: map max abs diff {self.map_max_abs:.3g} "
            f"(limit {self.map_limit:.3g} = {self.map_tol:g} x range {self.map_range:.3g}), "
            f"score rel diff {self.score_max_rel:.3g} (limit {self.score_rtol:g})"
        )

    def failure(self, what: str) -> str:
        return (
            f"{what}: {self.summary()}; worst image {self.worst_image} "
            f"(map diff {self.worst_map_abs:.3g}, score rel diff {self.worst_score_rel:.3g})"
        )

    def as_dict(self) -> dict:
        return {
            "images": self.images,
            "map_max_abs": self.map_max_abs,
            "map_range": self.map_range,
            "score_max_rel": self.score_max_rel,
            "map_tol": self.map_tol,
            "score_rtol": self.score_rtol,
            "worst_image": self.worst_image,
        }


def compare(
    ref: Infer,
    test: Infer,
    files: list[Path],
    size: tuple[int, int],
    batch: int,
    map_tol: float,
    score_rtol: float,
) -> ParityReport:
    """Run `ref` and `test` on the same uint8 batches of `files` and measure the differences.

    Fixed-batch graphs get the last chunk padded with its last image (outputs dropped).
    """
    if not files:
        raise ParityError("parity: no images to compare on")
    map_diff, score_rel = [], []
    lo, hi = np.inf, -np.inf
    for i in range(0, len(files), batch):
        chunk = files[i : i + batch]
        x = load_batch(chunk, size)
        if len(x) < batch:
            x = np.concatenate([x, np.repeat(x[-1:], batch - len(x), axis=0)])
        r_map, r_score = (np.asarray(a, np.float32) for a in ref(x))
        t_map, t_score = (np.asarray(a, np.float32) for a in test(x))
        r_score, t_score = r_score.reshape(-1), t_score.reshape(-1)
        for j in range(len(chunk)):
            map_diff.append(float(np.abs(r_map[j] - t_map[j]).max()))
            # Relative to the score, or to the image's map range when that is larger: a
            # quantile-normalised map puts a good part's score near 0, where a relative
            # difference measures nothing but rounding.
            span = float(r_map[j].max() - r_map[j].min())
            den = max(abs(float(r_score[j])), span, 1e-12)
            score_rel.append(abs(float(r_score[j]) - float(t_score[j])) / den)
            lo, hi = min(lo, float(r_map[j].min())), max(hi, float(r_map[j].max()))
    rng = hi - lo
    # Worst = furthest beyond its limit on either measure, so the image printed on a failure is
    # the one that failed, whichever of the two tests it failed.
    ratio = [
        max(m / (map_tol * max(rng, 1e-12)), s / score_rtol)
        for m, s in zip(map_diff, score_rel)  # equal lengths; no strict= on Python 3.8
    ]
    w = int(np.argmax(ratio))
    return ParityReport(
        images=len(files),
        map_max_abs=max(map_diff),
        map_range=rng,
        score_max_rel=max(score_rel),
        worst_image=str(files[w]),
        worst_map_abs=map_diff[w],
        worst_score_rel=score_rel[w],
        map_tol=map_tol,
        score_rtol=score_rtol,
    )
