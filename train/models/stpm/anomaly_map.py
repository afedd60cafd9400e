"""STPM anomaly map: per-scale cosine distance, upsampled, averaged over scales, smoothed."""

from __future__ import annotations

import torch

from train.models.common import GaussianBlur, cosine_distance, map_and_score


def stpm_anomaly_map(
    teacher: list[torch.Tensor],
    student: list[torch.Tensor],
    size: tuple[int, int],
    blur: GaussianBlur,
    strides: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Args: teacher, student [(B,C_i,h_i,w_i)]; size (H,W); blur the model's GaussianBlur;
    strides per scale (H / h_i) or None.

    Returns:
        anomaly_map (B,1,H,W) float32, score (B,) float32 (max of the smoothed map).
    """
    dists = [cosine_distance(t, s) for t, s in zip(teacher, student, strict=True)]
    return map_and_score(dists, size, blur, strides)
