"""DSKD loss: pyramid matching of both students against the teacher."""

from __future__ import annotations

import torch


def dskd_loss(dists: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """Sum over students and matched scales of the mean (1 - cos) to the teacher.

    Args:
        dists: student name -> [(B,1,h_i,w_i)] cosine distances at each matched scale.
    Returns:
        scalar tensor.
    """
    loss = None
    for per_scale in dists.values():
        for d in per_scale:
            loss = d.mean() if loss is None else loss + d.mean()
    if loss is None:
        raise ValueError("dskd_loss: no student matched at any scale")
    return loss
