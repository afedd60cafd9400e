"""MTKD variant "heads": the autoencoder on the weighted teacher features, and the grid it
works on."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.models.common import l2_normalize, upsample
from train.models.dskd.torch_model import conv_bn_relu


class ReconstructionAE(nn.Module):
    """Autoencoder on the weighted, concatenated teacher features at one grid.

    1x1 conv to `hidden`, 3x3 conv down to `bottleneck` channels (the compression: normal
    features lie near a low-dimensional set, unseen ones do not), 3x3 conv back to `hidden`,
    1x1 conv to the input channels (linear output: the targets are signed unit vectors).
    """

    def __init__(self, channels: int, hidden: int, bottleneck: int):
        super().__init__()
        self.net = nn.Sequential(
            conv_bn_relu(channels, hidden, 1),
            conv_bn_relu(hidden, bottleneck, 3),
            conv_bn_relu(bottleneck, hidden, 3),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Args: z (B,C,h,w). Returns: (B,C,h,w)."""
        return self.net(z)


def common_grid(f: torch.Tensor, stride: int, ae_stride: int) -> torch.Tensor:
    """(B,C,S/stride,.) -> unit vectors on the autoencoder's grid (B,C,S/ae_stride,.)."""
    if stride < ae_stride:
        r = ae_stride // stride
        f = F.avg_pool2d(f, r, r)
    elif stride > ae_stride:
        f = upsample(f, (0, 0), stride // ae_stride)
    return l2_normalize(f)
