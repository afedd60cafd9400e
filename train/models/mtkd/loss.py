"""MTKD losses. Variant "heads": the student's weighted deviation, the autoencoder's weighted
reconstruction error, and the importance-weight objective. Variant "paper": the student's
deviation from the fused target and the decoder's image reconstruction error."""

from __future__ import annotations

import torch

from train.models.common import cosine_distance


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


# ---------------------------------------------------------------- variant "paper"


def fused_deviation(
    z_s: list[torch.Tensor], z_t: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The authors' two teacher/student deviations, per position: |z_S - z_T|^2 (mean over
    channels) and 1 - cos(z_S, z_T).

    Args:
        z_s, z_t: per scale i, (B,D_i,h_i,w_i) the student's prediction and the fused target.
    Returns:
        mse [(B,1,h_i,w_i)], cos [(B,1,h_i,w_i)].
    """
    mse = [(s - t).pow(2).mean(1, keepdim=True) for s, t in zip(z_s, z_t, strict=True)]
    cos = [cosine_distance(s, t) for s, t in zip(z_s, z_t, strict=True)]
    return mse, cos


def fused_distillation_loss(mse: list[torch.Tensor], cos: list[torch.Tensor]) -> torch.Tensor:
    """Student step, the authors' MSE(z_T, z_S) + mean(1 - cos(z_T, z_S)), summed over scales
    (the target is detached by the caller). Args: from fused_deviation. Returns: scalar."""
    loss = mse[0].mean() + cos[0].mean()
    for m, c in zip(mse[1:], cos[1:], strict=True):
        loss = loss + m.mean() + c.mean()
    return loss


def reconstruction_error(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel squared error, mean over RGB. Args: (B,3,S,S) each. Returns: (B,1,S,S)."""
    return (recon - target).pow(2).mean(1, keepdim=True)
