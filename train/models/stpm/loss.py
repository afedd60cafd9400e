"""STPM loss: feature-pyramid matching between teacher and student."""

from __future__ import annotations

import torch

from train.models.common import cosine_distance


def stpm_loss(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    """Sum over scales of the mean over positions of (1 - cos) between channel vectors.

    With L2-normalised features, 0.5 * ||t_hat - s_hat||^2 = 1 - cos, so this is the STPM loss.

    Args:
        teacher, student: [(B,C_i,h_i,w_i)] per scale, same shapes pairwise.
    Returns:
        scalar tensor.
    """
    loss = teacher[0].new_zeros(())
    for t, s in zip(teacher, student, strict=True):
        loss = loss + cosine_distance(t, s).mean()
    return loss
