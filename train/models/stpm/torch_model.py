"""STPM torch module: frozen pretrained teacher, same-architecture student from scratch."""

from __future__ import annotations

import torch
from torch import nn

from train.backbones import BACKBONES, build_backbone
from train.models.common import GaussianBlur, Normalize, check_image_size
from train.models.stpm.anomaly_map import stpm_anomaly_map
from train.models.stpm.loss import stpm_loss


class STPM(nn.Module):
    """Student-teacher feature pyramid matching.

    Input everywhere: float32 (B,3,S,S) RGB raw pixels 0..255; normalisation is in the graph.
    Eval forward: (anomaly_map (B,1,S,S), score (B,)).

    Args (keyword only, JSON/YAML-serialisable, stored in self.args to rebuild from a checkpoint):
        backbone: key of train.backbones.BACKBONES (teacher and student architecture).
        image_size: S; the backbone's static 'same' padding and the blur's border map depend on it.
        stages: backbone stage indices matched (None = backbone default; for EfficientNet-Lite
            (1, 2, 4): 24/40/112 channels at strides 4/8/16, the same pyramid levels as STPM's
            ResNet layer1-3. Stride 32 is too coarse to localise small defects; stride 2 is
            mostly edges and noise).
        combine_scales: "product" of the per-scale maps (the paper) or "mean".
        sigma: Gaussian smoothing of the anomaly map in pixels (0 = none).
        teacher_weights: local state-dict file for the teacher (None = the registry's weights).
        pretrained: load the teacher's pretrained weights. load_checkpoint passes False, as the
            checkpoint's state dict holds the teacher too.
    """

    def __init__(
        self,
        *,
        backbone: str = "efficientnet_lite0",
        image_size: int = 256,
        stages: list[int] | None = None,
        combine_scales: str = "product",
        sigma: float = 4.0,
        teacher_weights: str | None = None,
        pretrained: bool = True,
    ):
        super().__init__()
        if combine_scales not in ("product", "mean"):
            raise ValueError(
                f"stpm: combine_scales must be product or mean, got {combine_scales!r}"
            )
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r} (valid: {', '.join(BACKBONES)})")
        stages = list(BACKBONES[backbone].default_stages if stages is None else stages)
        self.args = dict(
            backbone=backbone,
            image_size=image_size,
            stages=stages,
            combine_scales=combine_scales,
            sigma=float(sigma),
            teacher_weights=teacher_weights,
        )
        self.teacher = build_backbone(
            backbone, image_size, stages, weights=teacher_weights, pretrained=pretrained
        ).freeze()
        self.student = build_backbone(backbone, image_size, stages, pretrained=False)
        check_image_size(image_size, max(self.teacher.strides))
        self.size = (image_size, image_size)
        self.normalize = Normalize(self.teacher.mean, self.teacher.std)
        self.blur = GaussianBlur(sigma, self.size)

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Args: x (B,3,S,S) 0..255. Returns: teacher, student [(B,C_i,S/s_i,S/s_i)]."""
        x = self.normalize(x)
        with torch.no_grad():
            t = self.teacher(x)
        return t, self.student(x)

    def training_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B,3,S,S) 0..255. Returns: scalar STPM loss (only the student gets grads)."""
        t, s = self.features(x)
        return stpm_loss(t, s)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x (B,3,S,S) float 0..255. Returns: anomaly_map (B,1,S,S), score (B,)."""
        t, s = self.features(x)
        return stpm_anomaly_map(
            t, s, self.size, self.blur, self.teacher.strides, self.args["combine_scales"]
        )
