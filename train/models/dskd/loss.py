"""DSKD loss: pyramid matching of both students against the teacher."""

from __future__ import annotations

import torch


def hard_mean(d: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the largest `fraction` of the values of d (B,1,h,w) (1.0 = plain mean)."""
    if fraction >= 1.0:
        return d.mean()
    flat = d.flatten()
    k = max(1, int(fraction * flat.numel()))
    return flat.topk(k).values.mean()


def dskd_loss(dists: dict[str, list[torch.Tensor]], hard_fraction: float = 1.0) -> torch.Tensor:
    """Sum over students and matched scales of the mean (1 - cos) to the teacher (over the
    hardest `hard_fraction` of positions, see DSKD's hard_fraction).

    Args:
        dists: student name -> [(B,1,h_i,w_i)] cosine distances at each matched scale.
        hard_fraction: in (0, 1].
    Returns:
        scalar tensor.
    """
    loss = None
    for per_scale in dists.values():
        for d in per_scale:
            term = hard_mean(d, hard_fraction)
            loss = term if loss is None else loss + term
    if loss is None:
        raise ValueError("dskd_loss: no student matched at any scale")
    return loss
