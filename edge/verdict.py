"""No verdict means reject: the decision for a part the pipeline could not judge.

A part whose model output is not finite, whose frame could not be decoded or preprocessed, whose
inference or post-processing failed, gets this decision instead of none: rejected with
`reason: unverified` and the cause, published like any other reject (spooled, acknowledged), and
counted. A line that would rather let such parts through sets `on_error: pass` in the station
config, which is logged as a warning at start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Region:
    """bbox: [x, y, w, h] in original frame pixels. area: pixels at model resolution.
    peak: highest anomaly-map value in the region."""

    bbox: list[int]
    area: int
    peak: float

    def to_dict(self) -> dict:
        return {"bbox": list(self.bbox), "area": self.area, "peak": self.peak}


@dataclass
class Decision:
    reject: bool
    score: float
    regions: list[Region] = field(default_factory=list)
    regions_total: int = 0  # regions after min-area filtering, before the max_regions cap
    # Why a part is rejected: "score", "region" or "unverified" (no valid verdict, see
    # edge.verdict); None for a pass. `cause` says what went wrong for an unverified part.
    reason: str | None = None
    cause: str | None = None


UNVERIFIED = "unverified"
ON_ERROR = ("reject", "pass")


def unverified(cause: str, score: float = math.nan) -> Decision:
    """A reject for a part without a valid verdict; `cause` says why (one line)."""
    return Decision(True, score, [], 0, reason=UNVERIFIED, cause=" ".join(str(cause).split()))


def non_finite_cause(anomaly_map: np.ndarray, score: float) -> str | None:
    """Why this model output cannot be judged (NaN/Inf in score or map), or None when it can.

    A NaN compares False with every threshold: without this check it would pass the part."""
    if not math.isfinite(score):
        return f"non-finite model output: score {score}"
    if not np.isfinite(anomaly_map).all():
        bad = int(anomaly_map.size - np.count_nonzero(np.isfinite(anomaly_map)))
        return f"non-finite model output: {bad} anomaly-map value(s) NaN/Inf"
    return None
