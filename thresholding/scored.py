"""Images and what the model made of them: the input of every threshold fit.

Plain data, no I/O: calibration lists and scores images into these (calibration.dataset,
calibration.scoring); engines quantize builds them from its FP32 check outputs (engines.qcheck).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Sample:
    path: Path
    defect: str | None  # None = good part; else the defect type (MVTec sub-folder name)
    mask: Path | None = None

    @property
    def good(self) -> bool:
        return self.defect is None


@dataclass
class Scored:
    samples: list[Sample]
    scores: np.ndarray  # (N,) float32, the graph's image score
    maps: np.ndarray  # (N,H,W) float32 anomaly maps at model resolution
    masks: np.ndarray  # (N,H,W) bool ground truth (all False for good parts and unmasked defects)
    crop: tuple[int, int, int, int] | None = None  # the frame crop the images were scored with

    @property
    def good(self) -> np.ndarray:
        """(N,) bool, True = good part."""
        return np.array([s.good for s in self.samples], bool)

    @property
    def has_masks(self) -> bool:
        return any(s.mask is not None for s in self.samples)

    def subset(self, sel: np.ndarray) -> Scored:
        idx = np.flatnonzero(sel)
        return Scored(
            [self.samples[i] for i in idx],
            self.scores[idx],
            self.maps[idx],
            self.masks[idx],
            self.crop,
        )
