"""STPM anomaly map: per-scale cosine distance, upsampled, combined over scales (the paper: the
product), smoothed."""

from __future__ import annotations

import torch

from train.models.common import GaussianBlur, combine, cosine_distance, map_and_score, upsample


def stpm_anomaly_map(
    teacher: list[torch.Tensor],
    student: list[torch.Tensor],
    size: tuple[int, int],
    blur: GaussianBlur,
    strides: list[int] | None = None,
    how: str = "product",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Args: teacher, student [(B,C_i,h_i,w_i)]; size (H,W); blur the model's GaussianBlur;
    strides per scale (H / h_i) or None; how: "product" (the paper; common.combine's geometric
    mean, the same pixel order in the range of one map) or "mean".

    Returns:
        anomaly_map (B,1,H,W) float32, score (B,) float32 (max of the smoothed map).
    """
    dists = [cosine_distance(t, s) for t, s in zip(teacher, student, strict=True)]
    if how == "mean":
        return map_and_score(dists, size, blur, strides)
    strides = strides or [None] * len(dists)
    amap = blur(combine([upsample(d, size, st) for d, st in zip(dists, strides, strict=True)], how))
    return amap, amap.amax(dim=(1, 2, 3))
