"""PatchCore torch module: frozen teacher features, a coreset memory bank, nearest-neighbour map.

    image -> Normalize -> teacher T (frozen) -> T_i at the chosen stages
          -> 3x3 average (local neighbourhood aggregation) -> upsample to the finest stage
          -> concat: patch embeddings (B,C,h,w)
    memory bank M (N,C): a greedy coreset of the training images' patch embeddings
    map = distance of each patch to its nearest neighbour in M, upsampled, smoothed; score = max

No training: `fit_memory` fills the bank from good images (train.fit calls it instead of the
optimiser loop). The bank is a buffer, exported as a constant: the graph is the teacher, one
MatMul and one ReduceMin, so it goes through the same bundle, calibration and station.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from train.backbones import BACKBONES, build_backbone
from train.models.common import GaussianBlur, Normalize, check_image_size, upsample
from train.models.patchcore.anomaly_map import nearest_distance
from train.models.patchcore.coreset import greedy_coreset


class PatchCore(nn.Module):
    """Input everywhere: float32 (B,3,S,S) RGB raw pixels 0..255 (normalisation in the graph).
    Eval forward: (anomaly_map (B,1,S,S), score (B,)).

    Args (keyword only, stored in self.args):
        backbone: teacher, a key of train.backbones.BACKBONES.
        image_size: S.
        stages: teacher stages (None = (2, 4): strides 8 and 16 on EfficientNet-Lite, the
            mid-level features PatchCore takes from layer2/layer3 of a ResNet).
        coreset_ratio: fraction of all training patches kept in the bank (anomalib: 0.1).
        max_bank: upper bound on the bank size (memory and MatMul cost on the device).
        sigma: Gaussian smoothing of the anomaly map in pixels.
        teacher_weights, pretrained: as for every model.
    """

    def __init__(
        self,
        *,
        backbone: str = "efficientnet_lite0",
        image_size: int = 256,
        stages: list[int] | None = None,
        coreset_ratio: float = 0.1,
        max_bank: int = 16384,
        sigma: float = 4.0,
        teacher_weights: str | None = None,
        pretrained: bool = True,
    ):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r} (valid: {', '.join(BACKBONES)})")
        if not 0 < coreset_ratio <= 1 or max_bank < 1:
            raise ValueError("patchcore: coreset_ratio in (0, 1], max_bank >= 1")
        stages = list([2, 4] if stages is None else stages)
        self.args = dict(
            backbone=backbone,
            image_size=image_size,
            stages=stages,
            coreset_ratio=float(coreset_ratio),
            max_bank=int(max_bank),
            sigma=float(sigma),
            teacher_weights=teacher_weights,
        )
        self.teacher = build_backbone(
            backbone, image_size, stages, weights=teacher_weights, pretrained=pretrained
        ).freeze()
        check_image_size(image_size, max(self.teacher.strides))
        self.strides = self.teacher.strides
        self.size = (image_size, image_size)
        self.normalize = Normalize(self.teacher.mean, self.teacher.std)
        self.blur = GaussianBlur(sigma, self.size)
        # (N,C); empty until fit_memory. Persistent: the checkpoint carries the bank.
        self.register_buffer("memory", torch.zeros(0, sum(self.teacher.channels)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B,3,S,S) 0..255. Returns: patch embeddings (B,C,S/s0,S/s0), s0 the finest
        stage's stride."""
        feats = self.teacher(self.normalize(x))
        s0 = self.strides[0]
        out = []
        for f, s in zip(feats, self.strides, strict=True):
            f = F.avg_pool2d(f, 3, 1, 1)  # each patch sees its 3x3 neighbourhood
            out.append(f if s == s0 else upsample(f, (0, 0), s // s0))
        return torch.cat(out, 1)

    @torch.no_grad()
    def fit_memory(self, batches: Iterable[torch.Tensor], seed: int = 0) -> int:
        """Fill the memory bank from good images.

        Args: batches of (B,3,S,S) 0..255; seed of the coreset's projection and first point.
        Returns: the bank size.
        """
        self.eval()
        emb = torch.cat([self.embed(x).permute(0, 2, 3, 1).flatten(0, 2) for x in batches])
        n = min(max(1, int(round(self.args["coreset_ratio"] * len(emb)))), self.args["max_bank"])
        idx = greedy_coreset(emb, n, seed=seed)
        self.memory = emb[idx].contiguous()
        return n

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The bank's size is known only after fitting: take the checkpoint's shape.
        mem = state_dict.get(prefix + "memory")
        if mem is not None:
            self.memory = torch.empty_like(mem)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x (B,3,S,S) float 0..255. Returns: anomaly_map (B,1,S,S), score (B,)."""
        if self.memory.shape[0] == 0:
            raise RuntimeError("patchcore: empty memory bank (fit_memory first)")
        bank = self.memory
        d = nearest_distance(self.embed(x), bank.t(), (bank * bank).sum(1))
        amap = self.blur(upsample(d, self.size, self.strides[0]))
        return amap, amap.amax(dim=(1, 2, 3))
