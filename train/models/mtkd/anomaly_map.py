"""MTKD anomaly map: importance-weighted teacher/student deviation plus the weighted
reconstruction error, upsampled, smoothed; score = max of the smoothed map."""

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
