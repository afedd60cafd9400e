"""MTKD torch module: several frozen teachers of different structures, one student.

    image -> Normalize_k -> teacher k (frozen)   -> T_k,1 ... T_k,n        k = 1..K
          -> Normalize   -> student S (random)   -> S_1 ... S_n
                              head_k,i (1x1 conv) -> P_k,i matched to T_k,i   (deviation d_k)
    T_k,i -> L2-normalise, resize to a common grid -> u_k ; z = concat_k(w_k * u_k)
    z -> autoencoder -> reconstruction of every u_k                          (error e_k)
    w = softmax(logits): the teachers' importance weights

Training alternates two blocks of parameters on each batch: the student step (student and heads)
minimises sum_k w_k d_k with the weights fixed; the weight step (autoencoder and logits)
minimises the weighted reconstruction error of the normal batch. Neither block's objective
depends on the other block's parameters except through the fixed weights (they are detached in
the student step), so one backward pass over the sum gives each block exactly the gradient of
its own step; that is how training_loss implements the alternation with one optimiser.
Anomaly map = sum_k w_k (d_k + lambda e_k): the weighted deviation plus the reconstruction error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.backbones import BACKBONES, build_backbone
from train.models.common import (
    MAP_NORMS,
    GaussianBlur,
    MapNorm,
    Normalize,
    check_image_size,
    cosine_distance,
    l2_normalize,
    upsample,
)
from train.models.dskd.torch_model import conv_bn_relu
from train.models.mtkd.anomaly_map import mtkd_anomaly_map
from train.models.mtkd.loss import deviation_loss, weight_objective

WEIGHTS = ("learned", "uniform")


def _default_teachers(backbone: str) -> list[str]:
    """The backbone plus a second EfficientNet-Lite of another depth/width."""
    other = "efficientnet_lite1" if backbone != "efficientnet_lite1" else "efficientnet_lite0"
    return [backbone, other]


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


class MTKD(nn.Module):
    """Multi-teacher knowledge distillation.

    Input everywhere: float32 (B,3,S,S) RGB raw pixels 0..255; each network's normalisation is
    in the graph. Eval forward: (anomaly_map (B,1,S,S), score (B,)).

    Args (keyword only, JSON/YAML-serialisable, stored in self.args):
        backbone: the student's architecture.
        image_size: S.
        teachers: two or more keys of BACKBONES (None = [backbone, efficientnet_lite1], or
            efficientnet_lite0 as the second when the backbone is lite1).
        stages: stage indices for the student and every teacher (None = each network's default;
            all must give the same strides).
        weights: "learned" (the paper) or "uniform" (the ablation: w_k = 1/K, fixed).
        reconstruction: add the reconstruction error to the anomaly map (False = deviation only).
        recon_weight: lambda, weight of the (normalised) reconstruction term in the map.
        weight_temperature: entropy weight of the weight step (see loss.weight_objective).
        weight_lr: learning rate of the importance logits (the rest uses the config's lr).
        ae_scale: index into the scales of the grid the autoencoder works on (None = middle).
        ae_hidden, ae_bottleneck: autoencoder widths.
        map_norm: how each map term is normalised before the sum (common.MapNorm):
            "quantile" (after training, held-out good images, eval mode), "running", "none".
        sigma: Gaussian smoothing of the anomaly map in pixels (0 = none).
        teacher_weights: per teacher, a local state-dict file or None (None = registry weights).
        pretrained: load the teachers' pretrained weights (False when loading a checkpoint).
    """

    def __init__(
        self,
        *,
        backbone: str = "efficientnet_lite0",
        image_size: int = 256,
        teachers: list[str] | None = None,
        stages: list[int] | None = None,
        weights: str = "learned",
        reconstruction: bool = True,
        recon_weight: float = 1.0,
        weight_temperature: float = 0.5,
        weight_lr: float = 0.05,
        ae_scale: int | None = None,
        ae_hidden: int = 128,
        ae_bottleneck: int = 32,
        map_norm: str = "quantile",
        sigma: float = 4.0,
        teacher_weights: list[str | None] | None = None,
        pretrained: bool = True,
    ):
        super().__init__()
        teachers = list(_default_teachers(backbone) if teachers is None else teachers)
        for name in [backbone, *teachers]:
            if name not in BACKBONES:
                raise ValueError(f"unknown backbone {name!r} (valid: {', '.join(BACKBONES)})")
        if len(teachers) < 2 or len(set(teachers)) != len(teachers):
            raise ValueError(f"mtkd: needs two or more different teachers, got {teachers}")
        if weights not in WEIGHTS:
            raise ValueError(f"mtkd: weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        if map_norm not in MAP_NORMS:
            raise ValueError(
                f"mtkd: map_norm must be one of {', '.join(MAP_NORMS)}, got {map_norm!r}"
            )
        if recon_weight < 0 or weight_temperature <= 0 or weight_lr <= 0:
            raise ValueError("mtkd: recon_weight >= 0, weight_temperature > 0, weight_lr > 0")
        tw = list(teacher_weights) if teacher_weights is not None else [None] * len(teachers)
        if len(tw) != len(teachers):
            raise ValueError("mtkd: teacher_weights needs one entry (file or null) per teacher")
        self.teachers = nn.ModuleList(
            build_backbone(n, image_size, stages, weights=f, pretrained=pretrained).freeze()
            for n, f in zip(teachers, tw, strict=True)
        )
        self.student = build_backbone(backbone, image_size, stages, pretrained=False)
        strides = self.student.strides
        for n, t in zip(teachers, self.teachers, strict=True):
            if t.strides != strides:
                raise ValueError(
                    f"mtkd: teacher {n} gives strides {t.strides}, the student {strides}; "
                    f"choose stages with the same strides"
                )
        check_image_size(image_size, max(strides))
        n_scales = len(strides)
        ae_scale = n_scales // 2 if ae_scale is None else ae_scale
        if not 0 <= ae_scale < n_scales:
            raise ValueError(f"mtkd: ae_scale must be in 0..{n_scales - 1}, got {ae_scale}")
        self.args = dict(
            backbone=backbone,
            image_size=image_size,
            teachers=teachers,
            stages=None if stages is None else list(stages),
            weights=weights,
            reconstruction=bool(reconstruction),
            recon_weight=float(recon_weight),
            weight_temperature=float(weight_temperature),
            weight_lr=float(weight_lr),
            ae_scale=ae_scale,
            ae_hidden=int(ae_hidden),
            ae_bottleneck=int(ae_bottleneck),
            map_norm=map_norm,
            sigma=float(sigma),
            teacher_weights=tw,
        )
        # Per-teacher, per-scale projection of the student's features into the teacher's space.
        self.heads = nn.ModuleList(
            nn.ModuleList(
                nn.Conv2d(cs, ct, 1)
                for cs, ct in zip(self.student.channels, t.channels, strict=True)
            )
            for t in self.teachers
        )
        self.strides = strides
        self.ae_stride = strides[ae_scale]
        ae_in = sum(sum(t.channels) for t in self.teachers)
        self.ae = ReconstructionAE(ae_in, ae_hidden, ae_bottleneck)
        self.logits = nn.Parameter(torch.zeros(len(teachers)), requires_grad=weights == "learned")
        self.learned = weights == "learned"
        # The autoencoder serves the weight step and the reconstruction term; with neither
        # there is nothing to train it for.
        self.use_ae = self.learned or reconstruction
        self.reconstruction = reconstruction
        self.recon_weight = recon_weight
        self.temperature = weight_temperature
        self.weight_lr = weight_lr
        self.map_norm = map_norm
        k = len(teachers)
        side = [image_size // st for st in strides] * k + [image_size // self.ae_stride] * (
            k if self.use_ae else 0
        )
        self.scale = MapNorm([(h, h) for h in side], rings=0)
        self.size = (image_size, image_size)
        self.norm_student = Normalize(self.student.mean, self.student.std)
        self.norm_teachers = nn.ModuleList(Normalize(t.mean, t.std) for t in self.teachers)
        self.blur = GaussianBlur(sigma, self.size)

    def importance(self) -> torch.Tensor:
        """(K,) teacher importance weights, softmax of the logits (uniform: all 1/K)."""
        return torch.softmax(self.logits, 0)

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser groups for train.fit: everything trainable at lr; the importance logits
        at weight_lr without weight decay (decay would pull them to uniform)."""
        rest = [p for n, p in self.named_parameters() if p.requires_grad and n != "logits"]
        groups = [{"params": rest, "lr": lr}]
        if self.logits.requires_grad:
            groups.append({"params": [self.logits], "lr": self.weight_lr, "weight_decay": 0.0})
        return groups

    def _common_grid(self, f: torch.Tensor, stride: int) -> torch.Tensor:
        """(B,C,S/stride,.) -> unit vectors on the autoencoder's grid (B,C,S/ae_stride,.)."""
        if stride < self.ae_stride:
            r = self.ae_stride // stride
            f = F.avg_pool2d(f, r, r)
        elif stride > self.ae_stride:
            f = upsample(f, (0, 0), stride // self.ae_stride)
        return l2_normalize(f)

    def terms(
        self, x: torch.Tensor, w: torch.Tensor
    ) -> tuple[list[list[torch.Tensor]], list[torch.Tensor] | None]:
        """Args: x (B,3,S,S) 0..255; w (K,) weights for the autoencoder input.
        Returns: deviations [teacher][scale] (B,1,S/s_i,S/s_i), and the per-teacher
        reconstruction errors (B,1,S/r,S/r) (None when the autoencoder is not used)."""
        with torch.no_grad():
            t_feats = [t(n(x)) for t, n in zip(self.teachers, self.norm_teachers, strict=True)]
        s_feats = self.student(self.norm_student(x))
        dev = [
            [cosine_distance(t, h(s)) for t, h, s in zip(tf, heads, s_feats, strict=True)]
            for tf, heads in zip(t_feats, self.heads, strict=True)
        ]
        if not self.use_ae:
            return dev, None
        u = [
            [self._common_grid(f, s) for f, s in zip(tf, self.strides, strict=True)]
            for tf in t_feats
        ]
        z = torch.cat([uki * w[k] for k, uk in enumerate(u) for uki in uk], dim=1)
        r = self.ae(z)
        rec, c0 = [], 0
        for uk in u:
            errs = []
            for uki in uk:
                c = uki.shape[1]
                errs.append(0.5 * (r[:, c0 : c0 + c] - uki).pow(2).sum(1, keepdim=True))
                c0 += c
            rec.append(sum(errs) * (1.0 / len(errs)))
        return dev, rec

    def training_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B,3,S,S) 0..255. Returns: scalar student + reconstruction loss (the weight
        step adds its gradient for the logits but no value)."""
        w = self.importance().detach()  # fixed for the student step and the AE input
        dev, rec = self.terms(x, w)
        loss = deviation_loss(dev, w)
        if rec is not None:
            errors = torch.stack([e.mean() for e in rec])
            loss = loss + (w * errors).sum()  # trains the autoencoder
            if self.learned and self.training:
                loss = loss + weight_objective(errors.detach(), self.logits, self.temperature)
        if self.training and self.map_norm == "running":
            self.scale.update([d for per in dev for d in per] + (rec or []))
        return loss

    @torch.no_grad()
    def fit_map_normalization(self, batches) -> None:
        """Quantile normalisation from held-out good images (eval mode); see MapNorm."""
        if self.map_norm == "quantile":
            w = self.importance()
            terms = []
            for x in batches:
                dev, rec = self.terms(x, w)
                terms.append([d for per in dev for d in per] + (rec or []))
            self.scale.fit(terms)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x (B,3,S,S) float 0..255. Returns: anomaly_map (B,1,S,S), score (B,)."""
        w = self.importance()
        dev, rec = self.terms(x, w)
        if not self.reconstruction:
            rec = None
        if self.map_norm != "none":
            n = len(self.strides)
            flat = self.scale([d for per in dev for d in per] + (rec or []))
            dev = [flat[k * n : (k + 1) * n] for k in range(len(dev))]
            rec = flat[len(dev) * n :] if rec is not None else None
        return mtkd_anomaly_map(
            dev, self.strides, rec, self.ae_stride, w, self.recon_weight, self.size, self.blur
        )
