"""DSKD torch module: one frozen teacher, two students of inverted structure.

    image -> Normalize -> teacher T (frozen)           -> T_1 ... T_n      (fine -> coarse)
                       -> Se (T's architecture, random) -> Se_1 ... Se_n   matched to T_i
                            Se_1..Se_n -> embedding module -> e (coarsest scale, compact)
                            e -> Sd (decoder: coarse -> fine) -> Sd_n ... Sd_1  matched to T_i

Se sees the image the way the teacher does; Sd sees only the compact embedding of what Se saw
and has to re-grow every scale from it, like the decoder of reverse distillation. On a defect the
two fail differently (Se imitates the teacher where the defect is, Sd cannot rebuild an unseen
pattern from the bottleneck), which is the "diversity for anomaly representation" the paper
asks of two inverted students. Sd's loss reaches Se through the embedding module: the students'
interaction (switch it off with interaction=False).
"""

from __future__ import annotations

import torch
from torch import nn

from train.backbones import BACKBONES, build_backbone
from train.models.common import (
    COMBINE,
    MAP_NORMS,
    GaussianBlur,
    MapNorm,
    Normalize,
    check_image_size,
    cosine_distance,
)
from train.models.dskd.anomaly_map import dskd_anomaly_map
from train.models.dskd.loss import dskd_loss

STUDENTS = ("both", "se", "sd")


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (no bias) + BN + ReLU: fuses into one conv in TensorRT, INT8-friendly."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _log2_ratio(coarse: int, fine: int) -> int:
    ratio = coarse // fine
    if ratio * fine != coarse or ratio & (ratio - 1):
        raise ValueError(f"dskd: stride ratio {coarse}/{fine} is not a power of two")
    return ratio.bit_length() - 1


class EmbeddingModule(nn.Module):
    """Deep feature embedding: Se's multi-scale features -> one compact map at the coarsest scale.

    Each scale is brought to the coarsest grid by stride-2 3x3 convs (one per halving, so fine
    scales pass through as many learned layers as they have resolution to lose), the branches
    are concatenated, squeezed by a 1x1 bottleneck and mixed by a 3x3 conv.

    Args:
        channels, strides: Se's feature maps (fine -> coarse).
        out_channels: channels of the embedding.
        fuse: False = the ablation without the module: only the coarsest Se map, one 1x1 conv.
    """

    def __init__(self, channels: list[int], strides: list[int], out_channels: int, fuse: bool):
        super().__init__()
        self.fuse = fuse
        if not fuse:
            self.proj = conv_bn_relu(channels[-1], out_channels, k=1)
            return
        branch = max(out_channels // 2, 8)
        self.branches = nn.ModuleList()
        for c, s in zip(channels, strides, strict=True):
            steps = _log2_ratio(max(strides), s)
            layers = [conv_bn_relu(c if i == 0 else branch, branch, 3, 2) for i in range(steps)]
            self.branches.append(nn.Sequential(*layers) if layers else conv_bn_relu(c, branch, 1))
        self.bottleneck = conv_bn_relu(branch * len(channels), out_channels, k=1)
        self.mix = conv_bn_relu(out_channels, out_channels, k=3)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Args: feats [(B,C_i,H/s_i,W/s_i)]. Returns: (B,out_channels,H/s_max,W/s_max)."""
        if not self.fuse:
            return self.proj(feats[-1])
        x = torch.cat([b(f) for b, f in zip(self.branches, feats, strict=True)], dim=1)
        return self.mix(self.bottleneck(x))


class DecoderStudent(nn.Module):
    """Sd: inverted, decoder-like student. Embedding (coarsest scale) -> features at every
    teacher scale, coarse to fine: per scale, an upsampling ConvTranspose (when the stride
    changes), `depth` 3x3 conv blocks and a linear 1x1 head to the teacher's channels (teacher
    stage outputs are linear projections, signed, so the head has no activation).

    Args:
        in_channels: embedding channels.
        channels, strides: the teacher's maps (fine -> coarse) Sd must produce.
        width: hidden width per scale = round(width * teacher channels).
        depth: 3x3 conv blocks per scale.
    """

    def __init__(
        self, in_channels: int, channels: list[int], strides: list[int], width: float, depth: int
    ):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.heads = nn.ModuleList()
        cin, prev = in_channels, max(strides)
        for c, s in zip(reversed(channels), reversed(strides), strict=True):
            w = max(8, int(round(width * c)))
            steps = _log2_ratio(prev, s)
            if steps:
                f = 2**steps
                layers = [
                    nn.ConvTranspose2d(cin, w, f, stride=f, bias=False),
                    nn.BatchNorm2d(w),
                    nn.ReLU(inplace=True),
                ]
            else:
                layers = [conv_bn_relu(cin, w, k=1)]
            layers += [conv_bn_relu(w, w, 3) for _ in range(depth)]
            self.blocks.append(nn.Sequential(*layers))
            self.heads.append(nn.Conv2d(w, c, 1))
            cin, prev = w, s

    def forward(self, e: torch.Tensor) -> list[torch.Tensor]:
        """Args: e (B,C_e,H/s_max,W/s_max). Returns: [(B,C_i,H/s_i,W/s_i)] fine -> coarse."""
        out = []
        x = e
        for block, head in zip(self.blocks, self.heads, strict=True):
            x = block(x)
            out.append(head(x))
        return out[::-1]


class DSKD(nn.Module):
    """Dual-student knowledge distillation.

    Input everywhere: float32 (B,3,S,S) RGB raw pixels 0..255; normalisation is in the graph.
    Eval forward: (anomaly_map (B,1,S,S), score (B,)).

    Args (keyword only, JSON/YAML-serialisable, stored in self.args):
        backbone: teacher (and Se) architecture, a key of train.backbones.BACKBONES.
        image_size: S.
        stages: backbone stages used (None = backbone default, (1, 2, 4) for EfficientNet-Lite).
        students: "both" (DSKD), "se" (Se alone: the vanilla S-T network), "sd" (Sd alone; Se
            is then only the encoder feeding the embedding, neither matched nor in the map).
        embedding: use the deep feature embedding module; False = Sd fed from Se's coarsest map
            through a 1x1 conv (the ablation without the module).
        interaction: let Sd's loss train Se through the embedding; False = Se's features are
            detached at the embedding input (each student learns on its own).
        sd_input: what the embedding module fuses for Sd: "se" (the paper: Se's multi-scale
            features, the students' interaction) or "teacher" (the frozen teacher's, as the
            one-class bottleneck of reverse distillation: pretrained features from step 0).
        match_scales: indices into `stages` at which the students are matched and mapped
            (None = every scale: the pyramid matching).
        combine_scales: how a student's per-scale maps are combined: mean | max | product.
        combine_students: how the two students' maps are combined: mean | max | product.
        map_norm: how each (student, scale) map is normalised before combining, so neither
            student nor scale dominates by its range alone (train.models.common.MapNorm):
            "quantile" (fitted after training on held-out good images, eval mode), "running"
            (running mean of training batches, train mode), "none".
        hard_fraction: the loss at each scale is the mean over this top fraction of the
            hardest positions (1.0 = plain mean): the image score is the map's maximum, so the
            positions the students imitate worst on good parts are the ones that matter.
        feature_pool: k x k average of teacher and student features (stride 1) before their
            distance, as PatchCore's local neighbourhood aggregation: a position is judged by
            its neighbourhood, which damps single-cell imitation noise on good parts (1 = off).
        embed_channels: channels of the embedding.
        decoder_width: Sd's hidden width per scale, as a multiple of the teacher's channels.
        decoder_depth: 3x3 conv blocks per Sd scale.
        sigma: Gaussian smoothing of the anomaly map in pixels (0 = none).
        map_combine_scales, map_sigma: the output map's own scale fusion and smoothing (None =
            combine_scales, sigma); the score stays the max of the map made with
            combine_scales and sigma (anomaly_map.py says why).
        teacher_weights: local state-dict file for the teacher (None = the registry's).
        pretrained: load the teacher's pretrained weights (False when loading a checkpoint).
    """

    def __init__(
        self,
        *,
        backbone: str = "efficientnet_lite0",
        image_size: int = 256,
        stages: list[int] | None = None,
        students: str = "both",
        embedding: bool = True,
        interaction: bool = True,
        sd_input: str = "teacher",
        match_scales: list[int] | None = None,
        combine_scales: str = "mean",
        combine_students: str = "mean",
        map_norm: str = "quantile",
        norm_rings: int = 0,
        hard_fraction: float = 0.1,
        feature_pool: int = 1,
        embed_channels: int = 128,
        decoder_width: float = 1.0,
        decoder_depth: int = 1,
        sigma: float = 4.0,
        map_combine_scales: str | None = None,
        map_sigma: float | None = None,
        teacher_weights: str | None = None,
        pretrained: bool = True,
    ):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r} (valid: {', '.join(BACKBONES)})")
        if students not in STUDENTS:
            raise ValueError(
                f"dskd: students must be one of {', '.join(STUDENTS)}, got {students!r}"
            )
        for key, val in (
            ("combine_scales", combine_scales),
            ("combine_students", combine_students),
            ("map_combine_scales", map_combine_scales or combine_scales),
        ):
            if val not in COMBINE:
                raise ValueError(f"dskd: {key} must be one of {', '.join(COMBINE)}, got {val!r}")
        if map_norm not in MAP_NORMS:
            raise ValueError(
                f"dskd: map_norm must be one of {', '.join(MAP_NORMS)}, got {map_norm!r}"
            )
        if sd_input not in ("se", "teacher"):
            raise ValueError(f"dskd: sd_input must be se or teacher, got {sd_input!r}")
        if not 0 <= norm_rings <= 8:
            raise ValueError(f"dskd: norm_rings must be in 0..8, got {norm_rings!r}")
        if feature_pool < 1 or feature_pool % 2 == 0:
            raise ValueError(f"dskd: feature_pool must be an odd size >= 1, got {feature_pool!r}")
        if not 0 < hard_fraction <= 1:
            raise ValueError(f"dskd: hard_fraction must be in (0, 1], got {hard_fraction!r}")
        if embed_channels < 8 or decoder_width <= 0 or decoder_depth < 0:
            raise ValueError("dskd: embed_channels >= 8, decoder_width > 0, decoder_depth >= 0")
        stages = list(BACKBONES[backbone].default_stages if stages is None else stages)
        match = list(range(len(stages)) if match_scales is None else match_scales)
        if not match or sorted(set(match)) != match or not 0 <= match[0] <= match[-1] < len(stages):
            raise ValueError(
                f"dskd: match_scales must be increasing indices into stages "
                f"(0..{len(stages) - 1}), got {match_scales!r}"
            )
        self.args = dict(
            backbone=backbone,
            image_size=image_size,
            stages=stages,
            students=students,
            embedding=bool(embedding),
            interaction=bool(interaction),
            sd_input=sd_input,
            match_scales=match,
            combine_scales=combine_scales,
            combine_students=combine_students,
            map_norm=map_norm,
            norm_rings=int(norm_rings),
            hard_fraction=float(hard_fraction),
            feature_pool=int(feature_pool),
            embed_channels=int(embed_channels),
            decoder_width=float(decoder_width),
            decoder_depth=int(decoder_depth),
            sigma=float(sigma),
            map_combine_scales=map_combine_scales,
            map_sigma=None if map_sigma is None else float(map_sigma),
            teacher_weights=teacher_weights,
        )
        self.teacher = build_backbone(
            backbone, image_size, stages, weights=teacher_weights, pretrained=pretrained
        ).freeze()
        check_image_size(image_size, max(self.teacher.strides))
        ch, st = self.teacher.channels, self.teacher.strides
        self.se = build_backbone(backbone, image_size, stages, pretrained=False)
        self.active = ["se", "sd"] if students == "both" else [students]
        self.embed: EmbeddingModule | None = None
        self.sd: DecoderStudent | None = None
        if "sd" in self.active:
            self.embed = EmbeddingModule(ch, st, embed_channels, fuse=embedding)
            self.sd = DecoderStudent(embed_channels, ch, st, decoder_width, decoder_depth)
        self.match = match
        self.match_strides = [st[i] for i in match]
        self.interaction, self.sd_input = interaction, sd_input
        self.map_norm, self.hard_fraction = map_norm, hard_fraction
        self.pool = nn.Identity()
        if feature_pool > 1:  # stride 1, same size; border cells average only real cells
            self.pool = nn.AvgPool2d(feature_pool, 1, feature_pool // 2, count_include_pad=False)
        self.combine_scales, self.combine_students = combine_scales, combine_students
        side = [image_size // st[i] for i in match]
        self.scale = MapNorm([(h, h) for _ in self.active for h in side], rings=norm_rings)
        self.size = (image_size, image_size)
        self.normalize = Normalize(self.teacher.mean, self.teacher.std)
        self.blur = GaussianBlur(sigma, self.size)
        self.map_combine_scales = map_combine_scales
        self.map_blur = None if map_sigma is None else GaussianBlur(map_sigma, self.size)

    def distances(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Args: x (B,3,S,S) 0..255. Returns: student -> [(B,1,S/s_i,S/s_i)] 1 - cos to the
        teacher at each matched scale (Se first, then Sd)."""
        x = self.normalize(x)
        with torch.no_grad():
            t = self.teacher(x)
        se = self.se(x)
        feats = {"se": se}
        if self.sd is not None:
            if self.sd_input == "teacher":
                e = self.embed(t)
            else:
                e = self.embed(se if self.interaction else [f.detach() for f in se])
            feats["sd"] = self.sd(e)
        p = self.pool
        return {
            k: [cosine_distance(p(t[i]), p(feats[k][i])) for i in self.match] for k in self.active
        }

    def training_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B,3,S,S) 0..255. Returns: scalar pyramid-matching loss of both students."""
        d = self.distances(x)
        if self.training and self.map_norm == "running":
            self.scale.update([m for k in self.active for m in d[k]])
        return dskd_loss(d, self.hard_fraction)

    @torch.no_grad()
    def fit_map_normalization(self, batches) -> None:
        """Quantile normalisation from held-out good images (eval mode); see MapNorm."""
        if self.map_norm == "quantile":
            terms = []
            for x in batches:
                d = self.distances(x)
                terms.append([m for k in self.active for m in d[k]])
            self.scale.fit(terms)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x (B,3,S,S) float 0..255. Returns: anomaly_map (B,1,S,S), score (B,)."""
        d = self.distances(x)
        if self.map_norm != "none":
            n = len(self.match)
            flat = self.scale([m for k in self.active for m in d[k]])
            d = {k: flat[j * n : (j + 1) * n] for j, k in enumerate(self.active)}
        return dskd_anomaly_map(
            d,
            self.match_strides,
            self.size,
            self.blur,
            self.combine_scales,
            self.combine_students,
            self.map_combine_scales,
            self.map_blur,
        )
