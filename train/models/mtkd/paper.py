"""Building blocks of MTKD's "paper" variant (the authors' code, maye127/multi-teacher-AD).

Their method, on one global vector per image patch: each frozen teacher's output standardised
per dimension with statistics of the normal training set; the fused target z_T = sum_k w_k z_k
with w = softmax(logits), one scalar per teacher; a decoder reconstructs the image from z_T and
the reconstruction loss trains the decoder and the logits (the only way the weights learn); the
student regresses z_T (MSE + 1 - cos, target detached); score = |z_S - z_T|^2, 1 - cos(z_S, z_T)
and the reconstruction error of the decoder applied to the student's z_S.

Here the same on feature maps (one vector per position and scale instead of per patch), so the
model localises: FusedTarget (standardise, bring to a common width, weighted sum) and
ImageDecoder (fused target at every scale -> image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.models.common import upsample
from train.models.dskd.torch_model import conv_bn_relu


class RunningStandardize(nn.Module):
    """Per-channel (x - mean) / std with statistics of the normal training features.

    The authors compute each teacher's per-dimension mean and std in one pass over the training
    set before training (a zero std is replaced by 1e-3). train.fit has no pass before training,
    so the statistics accumulate over every training batch instead (exact pooled mean and
    variance, Chan et al.'s merge): after the first epoch they are the training set's, and they
    stop changing in eval mode. Before the first update the transform is the identity.
    """

    MIN_STD = 1e-3

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))
        self.register_buffer("count", torch.zeros(()))

    @torch.no_grad()
    def update(self, f: torch.Tensor) -> None:
        """Args: f (B,C,h,w), a training batch's features (train mode only)."""
        f = f.detach().float()
        m = float(f.numel() // f.shape[1])
        b_mean = f.mean(dim=(0, 2, 3))
        b_var = f.var(dim=(0, 2, 3), unbiased=False)
        n0 = float(self.count)
        n = n0 + m
        delta = b_mean - self.mean
        self.var.copy_((self.var * n0 + b_var * m + delta.pow(2) * (n0 * m / n)) / n)
        self.mean.add_(delta * (m / n))
        self.count.fill_(n)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Args: f (B,C,h,w). Returns: (B,C,h,w) standardised (Sub, Mul of constants in ONNX)."""
        inv = torch.rsqrt(self.var.clamp_min(self.MIN_STD**2))
        return (f - self.mean.view(1, -1, 1, 1)) * inv.view(1, -1, 1, 1)


def isometric_embedding(cin: int, cout: int, seed: int) -> torch.Tensor:
    """(cout, cin, 1, 1) 1x1-conv weight with orthonormal columns (cout >= cin): maps a teacher's
    channels into a wider common space keeping every distance and norm. From a fixed seed on
    a private generator, so building a model does not move the global RNG."""
    if cout < cin:
        raise ValueError(f"isometric_embedding: {cin} channels do not fit in {cout}")
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(cout, cin, generator=g, dtype=torch.float64))
    return q.float().view(cout, cin, 1, 1)


class FusedTarget(nn.Module):
    """Teachers' features -> the fused distillation target at every scale.

        u_k,i = P_k,i standardise_k,i(T_k,i)        (B, D_i, h_i, w_i)
        z_i   = sum_k w_k u_k,i

    The authors' teachers all output 1000 ImageNet logits, so they sum them directly. Here the
    teachers' stage widths can differ (EfficientNet-Lite2 is 1.1x wider than lite0/1), so D_i
    is the widest teacher's width and a narrower teacher is embedded by a FROZEN random
    isometry P_k,i (identity when the width already matches, the authors' plain sum). Frozen,
    not learned: a projection trained by the reconstruction loss would take over the weights'
    role (its norm absorbs w_k, so the weights would no longer say how much each teacher
    counts), and trained by the student's loss it would shrink the target to something trivial
    to imitate. An isometry loses nothing of the narrower teacher and keeps its standardised
    norm, so the softmax weights still compare like with like. Channels of different teachers
    do not correspond (unlike the authors' logits); the weighted sum is then one fixed linear
    view of all teachers together, which is all the student and the decoder need.

    Args:
        channels: [teacher k][scale i] channel counts.
    """

    def __init__(self, channels: list[list[int]]):
        super().__init__()
        n = len(channels[0])
        self.widths = [max(ck[i] for ck in channels) for i in range(n)]
        self.std = nn.ModuleList(
            nn.ModuleList(RunningStandardize(c) for c in ck) for ck in channels
        )
        self.projected: list[list[bool]] = []
        for k, ck in enumerate(channels):
            row = []
            for i, c in enumerate(ck):
                row.append(c != self.widths[i])
                if row[-1]:
                    # Persistent: the checkpoint carries the exact matrix the student learned.
                    w = isometric_embedding(c, self.widths[i], seed=1000 * k + i)
                    self.register_buffer(f"proj{k}_{i}", w)
            self.projected.append(row)

    @torch.no_grad()
    def update(self, t_feats: list[list[torch.Tensor]]) -> None:
        """Accumulate the standardisation statistics. Args: t_feats [teacher][scale]."""
        for stds, feats in zip(self.std, t_feats, strict=True):
            for s, f in zip(stds, feats, strict=True):
                s.update(f)

    def per_teacher(self, t_feats: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """Args: t_feats [teacher k][scale i] (B,C_k,i,h_i,w_i). Returns: u [k][i]
        (B,D_i,h_i,w_i), standardised and in the common space."""
        out = []
        for k, (stds, feats) in enumerate(zip(self.std, t_feats, strict=True)):
            row = []
            for i, (s, f) in enumerate(zip(stds, feats, strict=True)):
                u = s(f)
                if self.projected[k][i]:
                    u = F.conv2d(u, getattr(self, f"proj{k}_{i}"))
                row.append(u)
            out.append(row)
        return out

    def forward(self, u: list[list[torch.Tensor]], w: torch.Tensor) -> list[torch.Tensor]:
        """Args: u from per_teacher; w (K,) importance weights. Returns: [(B,D_i,h_i,w_i)]."""
        fused = []
        for i in range(len(self.widths)):
            z = u[0][i] * w[0]
            for k in range(1, len(u)):
                z = z + u[k][i] * w[k]
            fused.append(z)
        return fused


def _log2(ratio: int, what: str) -> int:
    if ratio < 1 or ratio & (ratio - 1):
        raise ValueError(f"mtkd: {what} {ratio} is not a power of two")
    return ratio.bit_length() - 1


class ImageDecoder(nn.Module):
    """Fused target at every scale (fine -> coarse) -> the image, in [-1, 1] units.

    The authors decode their whole target vector (Linear to 7x7, then x2 upsampling blocks to
    the 224 patch). Here the whole target is every scale's map: top-down from the coarsest,
    at each finer scale upsampled and concatenated with that scale's map, then x2 upsampling
    blocks to the input resolution and a linear 3x3 conv to RGB (linear: the target is signed).
    Widths halve towards the fine end (hidden at the coarsest scale, at least 8), like the
    authors' 128 -> 64 -> ... -> 8 channels, and each block convolves BEFORE it upsamples: the
    full-resolution end stays cheap (about 0.3 GMAC at 256 px with hidden=128).

    Args:
        widths, strides: the target's channels and strides per scale, fine -> coarse.
        hidden: width at the coarsest scale.
    """

    def __init__(self, widths: list[int], strides: list[int], hidden: int):
        super().__init__()
        n = len(widths)
        width = [max(8, hidden >> (n - 1 - i)) for i in range(n)]
        self.entry = conv_bn_relu(widths[-1], width[-1], 3)
        # merge[j] brings scale n-1-j's result to scale n-2-j.
        self.ratios = [strides[i + 1] // strides[i] for i in reversed(range(n - 1))]
        for r in self.ratios:
            _log2(r, "stride ratio")
        self.merge = nn.ModuleList(
            conv_bn_relu(width[i + 1] + widths[i], width[i], 3) for i in reversed(range(n - 1))
        )
        steps = _log2(strides[0], "finest stride")
        up, c = [], width[0]
        for j in range(steps):
            c_out = max(8, width[0] >> (j + 1))
            up.append(conv_bn_relu(c, c_out, 3))
            c = c_out
        self.up = nn.ModuleList(up)
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z: list[torch.Tensor]) -> torch.Tensor:
        """Args: z [(B,D_i,S/s_i,S/s_i)] fine -> coarse. Returns: (B,3,S,S)."""
        x = self.entry(z[-1])
        for j, (block, r) in enumerate(zip(self.merge, self.ratios, strict=True)):
            if r > 1:
                x = upsample(x, (0, 0), r)
            x = block(torch.cat([x, z[len(z) - 2 - j]], dim=1))
        for block in self.up:
            x = upsample(block(x), (0, 0), 2)
        return self.out(x)


def to_signed_unit(x: torch.Tensor) -> torch.Tensor:
    """Raw pixels 0..255 -> [-1, 1], the authors' Normalize(0.5, 0.5): the decoder's target."""
    return x * (1.0 / 127.5) - 1.0
