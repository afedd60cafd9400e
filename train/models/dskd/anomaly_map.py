"""DSKD anomaly map: per-scale discrepancies of each student, combined over scales, then over
the students, smoothed; score = max of the smoothed map."""

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Args:
        dists: student name -> [(B,1,H/s_i,W/s_i)] discrepancies (already normalised if wanted)
            at each matched scale.
        strides: s_i of the matched scales.
        size: (H, W) input resolution.
        blur: the model's GaussianBlur.
        combine_scales, combine_students: train.models.common.COMBINE entries.
    Returns:
        anomaly_map (B,1,H,W) float32, score (B,) float32.
    """
    per_student = []
    for per_scale in dists.values():
        ups = [upsample(d, size, s) for d, s in zip(per_scale, strides, strict=True)]
        per_student.append(combine(ups, combine_scales))
    amap = blur(combine(per_student, combine_students))
    return amap, amap.amax(dim=(1, 2, 3))
