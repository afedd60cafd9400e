"""DSKD anomaly map: per-scale discrepancies of each student, combined over scales, then over
the students, smoothed; score = max of the smoothed map. Optionally the returned map is fused and
smoothed its own way (map_combine_scales, map_blur) while the score keeps the first fusion: the
image decision and the localisation each get the fusion that serves them (docs/models_real.md:
the mean over scales ranks images better, the max over scales outlines defects better)."""

from __future__ import annotations

import torch

from train.models.common import GaussianBlur, combine, upsample


def dskd_anomaly_map(
    dists: dict[str, list[torch.Tensor]],
    strides: list[int],
    size: tuple[int, int],
    blur: GaussianBlur,
    combine_scales: str,
    combine_students: str,
    map_combine_scales: str | None = None,
    map_blur: GaussianBlur | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Args:
        dists: student name -> [(B,1,H/s_i,W/s_i)] discrepancies (already normalised if wanted)
            at each matched scale.
        strides: s_i of the matched scales.
        size: (H, W) input resolution.
        blur: the model's GaussianBlur.
        combine_scales, combine_students: train.models.common.COMBINE entries.
        map_combine_scales, map_blur: the returned map's own scale fusion and smoothing (None:
            the score's).
    Returns:
        anomaly_map (B,1,H,W) float32, score (B,) float32.
    """
    ups = [
        [upsample(d, size, s) for d, s in zip(per_scale, strides, strict=True)]
        for per_scale in dists.values()
    ]

    def fused(how: str, smooth: GaussianBlur) -> torch.Tensor:
        return smooth(combine([combine(u, how) for u in ups], combine_students))

    score_map = fused(combine_scales, blur)
    score = score_map.amax(dim=(1, 2, 3))
    if map_combine_scales is None and map_blur is None:
        return score_map, score
    return fused(map_combine_scales or combine_scales, map_blur or blur), score
