"""`calibration fit --from-station DIR`: refit from a station's kept sample, before vs after.

The station keeps raw frames of a sample of accepted parts (edge.evidence, recalibration.dir,
with recalibration.json beside them). After a drift alarm the engineer refits on them; this
module compares what was in force with what the refit gives, on the same sample:

    thresholds                  before (thresholds.yaml in force)   after (the refit)
    good-score p50/p90/p99      the calibration's good parts        this sample
    sample parts rejected       at the old thresholds               at the new ones

printed as a table and put at the top of report.html.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from calibration.fit import LINE_SAMPLE, line_sample_info
from edge.errors import DataError
from thresholding.decision import device_decisions
from thresholding.fit import FitResult, score_stats

Row = tuple[str, str, str]


def check_sample(folder: str | Path) -> None:
    """A station's sample has its sidecar; anything else is refused (use --good for it)."""
    if line_sample_info(folder) is None:
        raise DataError(
            f"{folder}: no {LINE_SAMPLE}: not a station's recalibration sample "
            "(recalibration.dir of a station config); give a folder of good images with --good"
        )


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:.5g}"


def before_after(res: FitResult, old: Any) -> list[Row]:
    """Rows (what, before, after) for the old thresholds (or None) and the refit."""
    new = res.thresholds
    scored = res.scored
    sample = score_stats(scored.scores)
    calib = (old.stats.get("good") if old is not None else None) or {}
    n = len(scored.scores)
    rows: list[Row] = [
        ("image threshold", _f(old and old.image_threshold), _f(new.image_threshold)),
        ("pixel threshold", _f(old and old.pixel_threshold), _f(new.pixel_threshold)),
        (
            "min region area (px)",
            str(old.min_region_area) if old else "-",
            str(new.min_region_area),
        ),
    ]
    for q in ("p50", "p90", "p99"):
        rows.append(
            (f"good-score {q} (calibration set -> this sample)", _f(calib.get(q)), _f(sample[q]))
        )
    after = int(np.sum(res.rejected))
    if old is not None:
        before = int(np.sum(device_decisions(scored.maps, scored.scores, old, res.view.roi)))
        rows.append(("sample parts rejected", f"{before}/{n}", f"{after}/{n}"))
    else:
        rows.append(("sample parts rejected", "-", f"{after}/{n}"))
    return rows


def as_text(rows: list[Row]) -> str:
    w = max(len(r[0]) for r in rows)
    lines = [f"{'':{w}}  {'before':>12}  {'after':>12}"]
    lines += [f"{a:{w}}  {b:>12}  {c:>12}" for a, b, c in rows]
    return "\n".join(lines)


def as_html(rows: list[Row], folder: str | Path) -> str:
    body = "".join(
        f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
        for a, b, c in rows
    )
    return (
        f"<h2>Recalibration from the station's sample: before and after</h2>"
        f"<p>Sample: {html.escape(str(folder))} (accepted parts kept by the station; a sample of "
        "accepted parts stops at the old image threshold, so a refit on it alone cannot raise "
        "that threshold).</p>"
        f"<table><tr><th></th><th>before</th><th>after</th></tr>{body}</table>"
    )
