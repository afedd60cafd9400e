"""PatchCore anomaly map: distance of every patch to its nearest neighbour in the memory bank."""

from __future__ import annotations

import torch


def nearest_distance(
    emb: torch.Tensor, bank_t: torch.Tensor, bank_sq: torch.Tensor
) -> torch.Tensor:
    """Euclidean distance of each patch embedding to the nearest bank entry.

    Written as |x|^2 - 2 x.m + |m|^2 so the export is one MatMul against a constant (the bank,
    transposed) and one ReduceMin: no gather, no top-k, cheap on TensorRT.

    Args:
        emb: (B,C,h,w) patch embeddings.
        bank_t: (C,N) the memory bank, transposed.
        bank_sq: (N,) squared norms of the bank entries.
    Returns:
        (B,1,h,w) distances.
    """
    b, c, h, w = emb.shape
    x = emb.flatten(2).transpose(1, 2)  # (B,hw,C)
    d2 = (x * x).sum(-1, keepdim=True) - 2.0 * (x @ bank_t) + bank_sq  # (B,hw,N)
    d = d2.amin(-1).clamp_min(0.0).sqrt()  # (B,hw)
    return d.view(b, 1, h, w)
