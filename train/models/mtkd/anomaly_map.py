"""MTKD anomaly maps. Variant "heads": importance-weighted teacher/student deviation plus the
weighted reconstruction error. Variant "paper": deviation from the fused target plus the
reconstruction error through the student. Upsampled, smoothed; score = max of the smoothed map."""

from __future__ import annotations

import torch

from train.models.common import GaussianBlur, combine, upsample


def mtkd_anomaly_map(
    dev: list[list[torch.Tensor]],
    dev_strides: list[int],
    rec: list[torch.Tensor] | None,
    rec_stride: int,
    w: torch.Tensor,
    recon_weight: float,
    size: tuple[int, int],
    blur: GaussianBlur,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Args:
        dev: per teacher k, per scale i, (B,1,H/s_i,W/s_i) deviation maps (normalised).
        dev_strides: s_i.
        rec: per teacher k, (B,1,H/r,W/r) reconstruction error maps (normalised), or None.
        rec_stride: r.
        w: (K,) importance weights.
        recon_weight: lambda of the reconstruction term.
        size: (H, W); blur: the model's GaussianBlur.
    Returns:
        anomaly_map (B,1,H,W) float32, score (B,) float32.
    """
    amap = None
    for k, per_scale in enumerate(dev):
        d = combine(
            [upsample(m, size, s) for m, s in zip(per_scale, dev_strides, strict=True)], "mean"
        )
        term = d * w[k]
        if rec is not None:
            term = term + upsample(rec[k], size, rec_stride) * (w[k] * recon_weight)
        amap = term if amap is None else amap + term
    amap = blur(amap)
    return amap, amap.amax(dim=(1, 2, 3))


def paper_anomaly_map(
    mse: list[torch.Tensor],
    cos: list[torch.Tensor],
    strides: list[int],
    rec: torch.Tensor | None,
    recon_weight: float,
    size: tuple[int, int],
    blur: GaussianBlur,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Variant "paper": the authors' three scores as maps, each normalised on good images
    (their finTS_inference.py sums the three min-max normalised scores; MapNorm's quantiles on
    held-out good images play that role), deviations averaged over scales, then summed.

    Args:
        mse, cos: per scale i, (B,1,S/s_i,S/s_i) |z_S - z_T|^2 and 1 - cos (normalised).
        strides: s_i.
        rec: (B,1,S,S) reconstruction error of the decoder on the student's z_S, or None.
        recon_weight: lambda of the reconstruction term.
        size: (S, S); blur: the model's GaussianBlur.
    Returns:
        anomaly_map (B,1,S,S) float32, score (B,) float32 (max of the smoothed map).
    """
    amap = combine([upsample(m, size, s) for m, s in zip(mse, strides, strict=True)], "mean")
    amap = amap + combine([upsample(c, size, s) for c, s in zip(cos, strides, strict=True)], "mean")
    if rec is not None:
        amap = amap + rec * recon_weight
    amap = blur(amap)
    return amap, amap.amax(dim=(1, 2, 3))
