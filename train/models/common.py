"""Pieces shared by every model; all of them export to ONNX opset 17 with static shapes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Normalize(nn.Module):
    """Raw pixels -> backbone input, inside the graph (no train/serve skew).

    x_norm = (x - mean) / std, written as x * (1/std) + (-mean/std) so it is one Mul + Add that
    TensorRT folds into the first convolution.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # Non-persistent: derived from the backbone registry, not learned, not in checkpoints.
        self.register_buffer("scale", 1.0 / std_t, persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B,3,H,W) float 0..255 RGB. Returns: (B,3,H,W) normalised."""
        return x * self.scale + self.shift


def cosine_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - cosine similarity between channel vectors at every position.

    FP16 headroom (the model.fp16.onnx engine): each side is L2-normalised separately rather
    than dividing by |a|*|b|, and scaled by 1/8 first (exact in binary, cosine is scale-free).
    EfficientNet-Lite teacher features reach |f|^2 ~ 1.6e4 per position on our data, a
    quarter of FP16's max 65504; after the 1/8 scale it is ~260.

    Args:
        a, b: (B,C,h,w).
    Returns:
        (B,1,h,w) in [0, 2].
    """
    a = a * 0.125
    b = b * 0.125
    a = a * torch.rsqrt(a.pow(2).sum(1, keepdim=True) + eps)
    b = b * torch.rsqrt(b.pow(2).sum(1, keepdim=True) + eps)
    return 1.0 - (a * b).sum(1, keepdim=True)


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius 4 sigma (anomalib's convention). Returns (K,)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


class GaussianBlur(nn.Module):
    """Fixed separable Gaussian smoothing of a (B,1,H,W) map, border-corrected.

    Two 1-D convolutions (1xK then Kx1) with zero padding, then a multiply by a precomputed
    (1,1,H,W) map 1/blur(ones): at the border this renormalises the truncated kernel, so edges
    are neither darkened (zero padding) nor need a reflect Pad (not every TensorRT version
    supports it). Only Conv + Mul in the graph.
    """

    def __init__(self, sigma: float, size: tuple[int, int]):
        super().__init__()
        self.sigma = float(sigma)
        if self.sigma <= 0:
            self.register_buffer("kx", torch.ones(1, 1, 1, 1), persistent=False)
            self.register_buffer("ky", torch.ones(1, 1, 1, 1), persistent=False)
            self.register_buffer("norm", torch.ones(1, 1, *size), persistent=False)
            self.pad = 0
            return
        k = gaussian_kernel1d(self.sigma)
        self.pad = k.numel() // 2
        self.register_buffer("kx", k.view(1, 1, 1, -1), persistent=False)  # (1,1,1,K)
        self.register_buffer("ky", k.view(1, 1, -1, 1), persistent=False)  # (1,1,K,1)
        with torch.no_grad():
            ones = torch.ones(1, 1, *size)
            self.register_buffer("norm", 1.0 / self._blur(ones), persistent=False)

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.kx, padding=(0, self.pad))
        return F.conv2d(x, self.ky, padding=(self.pad, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B,1,H,W). Returns: (B,1,H,W)."""
        if self.pad == 0:
            return x
        return self._blur(x) * self.norm


def upsample(x: torch.Tensor, size: tuple[int, int], stride: int | None = None) -> torch.Tensor:
    """Bilinear resize (B,C,h,w) -> (B,C,H,W); align_corners=False, ONNX Resize 'linear'.

    Give `stride` (= H/h, a whole number) when known: the exporter then writes constant scales,
    instead of a Shape->Slice->Concat subgraph computing the sizes. Same values either way.
    """
    if stride is not None:
        s = float(stride)
        return F.interpolate(x, scale_factor=(s, s), mode="bilinear", align_corners=False)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def map_and_score(
    dists: list[torch.Tensor],
    size: tuple[int, int],
    blur: GaussianBlur,
    strides: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-scale distance maps -> (anomaly_map, score).

    Args:
        dists: [(B,1,h_i,w_i)] per-scale discrepancies (e.g. cosine distance).
        size: (H, W) input resolution.
        blur: the model's GaussianBlur.
        strides: stride of each map (h_i * stride_i == H), for constant Resize scales.
    Returns:
        anomaly_map (B,1,H,W): mean over scales of the upsampled maps, then smoothed. The mean
            (not the sum) keeps the map in the same range whatever the number of scales.
        score (B,): max of the smoothed map. The max, because a defect is usually a small region
            and a mean over the image would dilute it; taking it after smoothing makes it the
            strongest *regional* evidence rather than one noisy pixel.
    """
    strides = strides or [None] * len(dists)
    amap = upsample(dists[0], size, strides[0])
    for d, st in zip(dists[1:], strides[1:], strict=True):
        amap = amap + upsample(d, size, st)
    amap = blur(amap * (1.0 / len(dists)))
    score = amap.amax(dim=(1, 2, 3))
    return amap, score


def check_image_size(image_size: int, stride: int) -> int:
    """Image size must be a positive multiple of the coarsest stride (clean feature grids)."""
    if not isinstance(image_size, int) or image_size <= 0 or image_size % stride:
        raise ValueError(f"image_size must be a positive multiple of {stride}, got {image_size!r}")
    return image_size


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Unit-length channel vectors (B,C,h,w) -> (B,C,h,w), with cosine_distance's 1/8 scaling
    first for FP16 headroom (an L2-normalised vector does not depend on it)."""
    x = x * 0.125
    return x * torch.rsqrt(x.pow(2).sum(1, keepdim=True) + eps)


COMBINE = ("mean", "max", "product")


def combine(maps: list[torch.Tensor], how: str) -> torch.Tensor:
    """Element-wise combination of same-shape non-negative maps [(B,1,H,W)] -> (B,1,H,W).

    mean: arithmetic mean. max: element-wise maximum. product: the n-th root of the product
    (geometric mean): the same ordering of pixels as the plain product (STPM's scale fusion),
    but in the range of one map, so small distances (~1e-2 per scale) do not underflow FP16
    when multiplied. Maps are clamped at 0 first (1 - cos can be -1e-7 from rounding).
    """
    if how not in COMBINE:
        raise ValueError(f"combine: unknown {how!r} (valid: {', '.join(COMBINE)})")
    if len(maps) == 1:
        return maps[0]
    if how == "mean":
        out = maps[0]
        for m in maps[1:]:
            out = out + m
        return out * (1.0 / len(maps))
    if how == "max":
        out = maps[0]
        for m in maps[1:]:
            out = torch.maximum(out, m)
        return out
    out = maps[0].clamp_min(0.0)
    for m in maps[1:]:
        out = out * m.clamp_min(0.0)
    return out.pow(1.0 / len(maps))


MAP_NORMS = ("quantile", "running", "none")


def border_rings(h: int, w: int, rings: int) -> torch.Tensor:
    """(h,w) long: distance in cells to the nearest edge, capped at `rings` (the interior)."""
    y = torch.arange(h).view(h, 1)
    x = torch.arange(w).view(1, w)
    d = torch.minimum(torch.minimum(y, h - 1 - y), torch.minimum(x, w - 1 - x))
    return d.clamp_max(rings)


class MapNorm(nn.Module):
    """Puts the terms of an anomaly map (scales, students, deviation vs reconstruction) on one
    scale before they are combined, so no term drowns the others by its range alone.

    Two ways, both a constant per-pixel affine map per term in the exported graph (Sub, Mul):
      * "running" (`update`, train mode): divide by an exponential moving average of each
        training batch's mean, taken while the students' BatchNorm is in train mode.
      * "quantile" (`fit`, after training, eval mode, held-out good images): (t - q_a) /
        (q_b - q_a) with q_a, q_b the 0.9 and 0.995 quantiles of the term on those images (as
        EfficientAD): 0 is a typical good pixel, 1 the top of the good range. Measured on what
        the deployed graph computes, on images the students never fitted, so a term that
        generalises worse (noisier on unseen good parts) is damped rather than trusted. The
        quantiles are taken per border ring (the outermost `rings` rings of cells and the
        interior): zero padding makes the features at the image border behave differently,
        and a single quantile would let the border light up on every good part.
    `fit` wins once called; before either, terms pass unchanged.

    Args:
        shapes: (h_i, w_i) of each term.
        rings: border rings normalised on their own.
    """

    Q_LO, Q_HI = 0.9, 0.995

    def __init__(self, shapes: list[tuple[int, int]], momentum: float = 0.1, rings: int = 0):
        super().__init__()
        self.momentum, self.rings, self.n = float(momentum), int(rings), len(shapes)
        self.register_buffer("mean", torch.ones(self.n))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        for i, (h, w) in enumerate(shapes):
            self.register_buffer(f"lo{i}", torch.zeros(1, 1, h, w))
            self.register_buffer(f"inv{i}", torch.ones(1, 1, h, w))

    @torch.no_grad()
    def update(self, terms: list[torch.Tensor]) -> None:
        """Running mean. Args: terms [(B,1,h_i,w_i)], one per tracked term (train mode)."""
        batch = torch.stack([t.detach().float().mean() for t in terms]).clamp_min(1e-8)
        if int(self.seen) == 0:
            self.mean.copy_(batch)  # first batch: no average over the ones of the init
        else:
            self.mean.lerp_(batch, self.momentum)
        self.seen += 1

    @torch.no_grad()
    def fit(self, batches: list[list[torch.Tensor]]) -> None:
        """Quantile fit. Args: per batch, the terms [(B,1,h_i,w_i)] (eval mode, good images)."""
        q = torch.tensor([self.Q_LO, self.Q_HI])
        for i in range(self.n):
            t = torch.cat([b[i].detach().float() for b in batches])  # (N,1,h,w)
            ring = border_rings(t.shape[-2], t.shape[-1], self.rings)
            lo, inv = getattr(self, f"lo{i}"), getattr(self, f"inv{i}")
            for r in ring.unique().tolist():
                v = t[..., ring == r].flatten()
                if v.numel() > 4_000_000:  # torch.quantile's input limit; a strided sample
                    v = v[:: v.numel() // 4_000_000 + 1]
                a, b = torch.quantile(v, q).tolist()
                lo[..., ring == r] = a
                inv[..., ring == r] = 1.0 / max(b - a, 1e-6)
        self.fitted.fill_(True)

    def forward(self, terms: list[torch.Tensor]) -> list[torch.Tensor]:
        """Normalise term i. Returns the list, same shapes."""
        if bool(self.fitted):
            return [
                (t - getattr(self, f"lo{i}")) * getattr(self, f"inv{i}")
                for i, t in enumerate(terms)
            ]
        return [t * (1.0 / self.mean[i]) for i, t in enumerate(terms)]
