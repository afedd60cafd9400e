"""Does a reduced-precision graph decide like FP32? A check that needs no defect images.

On held-out good images (ones the INT8 calibration did not see) the FP32 graph is run and the
station's thresholds are fitted on its outputs exactly as `calibration fit` does (frr strategy;
the fit is thresholding.fit's, which both use).
Then the FP16 or INT8 graph runs on the same images and is compared at the level that matters
on the line:

* score error: |score - score_fp32| relative to the image threshold's margin (threshold minus
  the median good score): how far towards (or away from) a reject the precision moves a part;
* map error: the 99.9th percentile over all pixels of |map - map_fp32|, relative to the pixel
  threshold's margin (threshold minus the median good pixel): whether noise can light a region;
* decision flips: the fraction of images whose decision (edge's own post-processing) changes,
  not counting parts that sit within the score budget of the threshold (reported apart).

Margins, not raw thresholds: a teacher-student map sits on a background well above zero, and
an error is only dangerous against the distance to the threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edge.bundle import Thresholds
from edge.postprocess import PostProcessor
from edge.preprocess import load_batch


@dataclass(frozen=True)
class Budget:
    """What a reduced-precision graph may change against FP32 (defaults; `quantize` flags)."""

    max_flip_rate: float = 0.01  # decisions that differ from FP32 on good images
    max_score_error: float = 0.05  # max over images, in units of the image threshold's margin
    max_map_error: float = 0.10  # p99.9 over pixels, in units of the pixel threshold's margin


@dataclass
class Check:
    """Figures of one precision against FP32 (JSON-ready via `as_dict`)."""

    precision: str
    images: int
    flips: int
    flip_rate: float
    score_error: float
    map_error: float
    image_threshold: float
    pixel_threshold: float
    min_region_area: int
    borderline_flips: int  # flips of parts within the score budget of the threshold
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def line(self) -> str:
        verdict = "ok" if self.passed else "OVER BUDGET: " + "; ".join(self.failures)
        return (
            f"{self.precision}: decisions changed {self.flips}/{self.images} "
            f"({100 * self.flip_rate:.1f} %; {self.borderline_flips} more at the threshold), score error {self.score_error:.3f} and map error "
            f"{self.map_error:.3f} of the threshold margins -> {verdict}"
        )


def run_infer(infer, files: list[Path], size: tuple[int, int], batch: int):
    """Outputs of `infer` ((B,3,H,W) uint8 -> maps (B,1,H,W), scores (B,)) on image files, at
    the graph's static batch: maps (N,H,W) float32, scores (N,) float32."""
    maps, scores = [], []
    for i in range(0, len(files), batch):
        x = load_batch(files[i : i + batch], size)
        n = len(x)
        if n < batch:  # static batch dimension: pad with the last image, drop its outputs
            x = np.concatenate([x, np.repeat(x[-1:], batch - n, axis=0)])
        m, s = infer(x)
        maps.append(np.asarray(m)[:n, 0])
        scores.append(np.asarray(s)[:n])
    return np.concatenate(maps).astype(np.float32), np.concatenate(scores).astype(np.float32)


def run_graph(path: Path, files: list[Path], size: tuple[int, int], batch: int):
    """ONNX Runtime CPU outputs of a bundle graph file: maps (N,H,W), scores (N,)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return run_infer(lambda x: sess.run(["anomaly_map", "score"], {name: x}), files, size, batch)


class Reference:
    """FP32 outputs on the check images and the thresholds a precision is judged against.

    `Reference.fitted` fits them as `calibration fit` does, with thresholding.fit (workstation:
    `engines quantize`); the plain constructor takes given ones (device: `engines build` uses the
    bundle's thresholds.yaml, or those `quantize` recorded, as thresholding is not there).
    """

    def __init__(
        self,
        files: list[Path],
        maps: np.ndarray,
        scores: np.ndarray,
        th: Thresholds,
        stat: np.ndarray | None = None,
    ):
        self.files, self.maps, self.scores, self.th = files, maps, scores, th
        # what the device thresholds (reject <=> stat > image threshold); the score when the
        # region rule is not known
        self.stat = scores if stat is None else stat
        self.decisions = self.decide(maps, scores)
        self.score_margin = max(th.image_threshold - float(np.median(scores)), 1e-12)
        self.pixel_margin = max(th.pixel_threshold - float(np.median(maps)), 1e-12)

    @classmethod
    def fitted(
        cls, files: list[Path], maps: np.ndarray, scores: np.ndarray, target_frr: float
    ) -> Reference:
        # Workstation only (thresholding needs scipy): the device's `engines build` never fits.
        from thresholding.fit import fit_scored
        from thresholding.scored import Sample, Scored

        scored = Scored([Sample(p, None) for p in files], scores, maps, np.zeros(maps.shape, bool))
        fit = fit_scored(scored, "frr", target_frr=target_frr)
        return cls(files, maps, scores, fit.thresholds, fit.stat)

    def decide(self, maps: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """(N,) bool reject per image, by edge's own post-processing (what the device runs)."""
        post = PostProcessor(
            self.th.image_threshold,
            self.th.pixel_threshold,
            self.th.min_region_area,
            maps.shape[1:],
        )
        frame = (*maps.shape[1:], 3)
        # equal lengths by construction; no zip(strict=) on Python 3.8 (the device runs this)
        return np.array([post(m, s, frame).reject for m, s in zip(maps, scores)])

    def compare(
        self, precision: str, maps: np.ndarray, scores: np.ndarray, budget: Budget
    ) -> Check:
        """Figures of (maps, scores) of `precision` against this reference."""
        # A part whose FP32 statistic lies within the score budget of the threshold may flip
        # by an error the budget allows (with thresholds fitted on these very images, the
        # highest good part sits on the threshold by construction): counted apart.
        band = budget.max_score_error * self.score_margin
        border = np.abs(self.stat - self.th.image_threshold) <= band
        changed = self.decide(maps, scores) != self.decisions
        flips = int(np.sum(changed & ~border))
        score_err = float(np.max(np.abs(scores - self.scores))) / self.score_margin
        map_err = float(np.percentile(np.abs(maps - self.maps), 99.9)) / self.pixel_margin
        if not (np.isfinite(maps).all() and np.isfinite(scores).all()):
            score_err = map_err = float("inf")
        c = Check(
            precision,
            len(scores),
            flips,
            flips / len(scores),
            score_err,
            map_err,
            self.th.image_threshold,
            self.th.pixel_threshold,
            self.th.min_region_area,
            int(np.sum(changed & border)),
        )
        if c.flip_rate > budget.max_flip_rate:
            c.failures.append(
                f"decision flips {100 * c.flip_rate:.1f} % > {100 * budget.max_flip_rate:g} %"
            )
        if not c.score_error <= budget.max_score_error:
            c.failures.append(f"score error {c.score_error:.3f} > {budget.max_score_error:g}")
        if not c.map_error <= budget.max_map_error:
            c.failures.append(f"map error {c.map_error:.3f} > {budget.max_map_error:g}")
        return c
