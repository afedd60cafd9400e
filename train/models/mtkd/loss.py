"""MTKD losses: the student's weighted deviation, the autoencoder's weighted reconstruction
error, and the importance-weight objective."""

from __future__ import annotations

import torch


def deviation_loss(dev: list[list[torch.Tensor]], w: torch.Tensor) -> torch.Tensor:
    """Student step: sum_k w_k * sum_i mean(1 - cos(T_k,i, head_k,i(S_i))), weights fixed.

    Args:
        dev: per teacher k, per scale i, (B,1,h_i,w_i) cosine distances.
        w: (K,) importance weights (detached by the caller).
    Returns:
        scalar.
    """
    loss = w.new_zeros(())
    for k, per_scale in enumerate(dev):
        loss = loss + w[k] * sum(d.mean() for d in per_scale)
    return loss


def weight_objective(
    errors: torch.Tensor, logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Weight step: sum_k w_k * e_k / mean(e) - temperature * H(w), w = softmax(logits).

    Its minimum over w is w_k ~ exp(-(e_k / mean e) / temperature): the teachers whose normal
    features the autoencoder reconstructs best get the most weight, and the entropy term keeps
    every teacher in play (without it the minimum is a single teacher). Dividing by the mean
    error makes the temperature dimensionless.

    Args:
        errors: (K,) per-teacher mean reconstruction errors on the batch, detached.
        logits: (K,) the learnable importance logits.
    Returns:
        scalar with the gradient of the objective for `logits` and value 0 (the value itself
        says nothing about anomalies and would only shift the reported loss).
    """
    w = torch.softmax(logits, 0)
    rel = errors / errors.mean().clamp_min(1e-12)
    obj = (w * rel).sum() + temperature * (w * torch.log(w.clamp_min(1e-12))).sum()
    return obj - obj.detach()
