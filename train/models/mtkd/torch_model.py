"""MTKD torch module: several frozen teachers of different structures, one student.

Two variants (model arg `variant`), both with w = softmax(logits), the teachers' importance
weights, learned from how well normal images are reconstructed:

"heads" (our first reading of the paper, the default for stored checkpoints):

    image -> Normalize_k -> teacher k (frozen)   -> T_k,1 ... T_k,n        k = 1..K
          -> Normalize   -> student S (random)   -> S_1 ... S_n
                              head_k,i (1x1 conv) -> P_k,i matched to T_k,i   (deviation d_k)
    T_k,i -> L2-normalise, resize to a common grid -> u_k ; z = concat_k(w_k * u_k)
    z -> autoencoder -> reconstruction of every u_k                          (error e_k)

  Training alternates two blocks of parameters on each batch: the student step (student and
  heads) minimises sum_k w_k d_k with the weights fixed; the weight step (autoencoder and
  logits) minimises the weighted reconstruction error of the normal batch (the logits through
  loss.weight_objective). Anomaly map = sum_k w_k (d_k + lambda e_k).

"paper" (the authors' code, maye127/multi-teacher-AD finTS.py, on feature maps; paper.py):

    T_k,i -> standardise (normal statistics), common width -> u_k,i ; z_T,i = sum_k w_k u_k,i
    student S -> head_i (1x1 conv) -> z_S,i                         distilled to z_T,i
    z_T -> decoder -> image      (trains the decoder AND the logits: backprop through it)
    map = |z_S - z_T|^2 + (1 - cos(z_S, z_T)) + lambda |decoder(z_S) - image|^2

In both, no block's objective depends on another block's parameters except through the
weights, which are detached wherever they are not being learned; so one backward pass over the
sum of the objectives gives each block exactly the gradient of its own step: that is how
training_loss implements the alternation with one optimiser.
"""

from __future__ import annotations

import torch
from torch import nn

from train.backbones import BACKBONES, build_backbone
from train.models.common import (
    MAP_NORMS,
    GaussianBlur,
    MapNorm,
    Normalize,
    check_image_size,
    cosine_distance,
)
from train.models.mtkd.anomaly_map import mtkd_anomaly_map, paper_anomaly_map
from train.models.mtkd.heads import ReconstructionAE, common_grid
from train.models.mtkd.loss import (
    deviation_loss,
    fused_deviation,
    fused_distillation_loss,
    reconstruction_error,
    weight_objective,
)
from train.models.mtkd.paper import FusedTarget, ImageDecoder, to_signed_unit

WEIGHTS = ("learned", "uniform")
VARIANTS = ("heads", "paper")
_LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def _default_teachers(backbone: str, variant: str) -> list[str]:
    """heads: the backbone plus a second EfficientNet-Lite of another depth/width. paper: the
    backbone plus every other EfficientNet-Lite with offline weights (the authors use three
    teachers as different as they could: ResNet-152, VGG-19, DenseNet-201)."""
    if variant == "paper":
        return [backbone, *(n for n in _LITES if n != backbone)]
    other = "efficientnet_lite1" if backbone != "efficientnet_lite1" else "efficientnet_lite0"
    return [backbone, other]


class MTKD(nn.Module):
    """Multi-teacher knowledge distillation.

    Input everywhere: float32 (B,3,S,S) RGB raw pixels 0..255; each network's normalisation is
    in the graph. Eval forward: (anomaly_map (B,1,S,S), score (B,)).

    Args (keyword only, JSON/YAML-serialisable, stored in self.args):
        backbone: the student's architecture.
        image_size: S.
        variant: "heads" (per-teacher heads, Boltzmann weight step; the default, what stored
            checkpoints without the key were trained as) or "paper" (the authors' code: fused
            target, weights learned by backprop through an image decoder); see the module doc.
        teachers: two or more keys of BACKBONES (None = heads: [backbone, efficientnet_lite1],
            or efficientnet_lite0 as the second when the backbone is lite1; paper: the backbone
            and the other EfficientNet-Lites).
        stages: stage indices for the student and every teacher (None = each network's default;
            all must give the same strides).
        weights: "learned" (the paper) or "uniform" (the ablation: w_k = 1/K, fixed).
        reconstruction: add the reconstruction error to the anomaly map (False = deviation only).
        recon_weight: lambda, weight of the (normalised) reconstruction term in the map.
        weight_temperature: heads only: entropy weight of the weight step (loss.weight_objective).
        weight_lr: learning rate of the importance logits (the rest uses the config's lr).
        ae_scale: heads only: index of the scale whose grid the autoencoder uses (None = middle).
        ae_hidden: heads: autoencoder width; paper: the decoder's width at the coarsest scale.
        ae_bottleneck: heads only: the autoencoder's bottleneck width.
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
        variant: str = "heads",
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
        if variant not in VARIANTS:
            raise ValueError(f"mtkd: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r} (valid: {', '.join(BACKBONES)})")
        teachers = list(_default_teachers(backbone, variant) if teachers is None else teachers)
        for name in teachers:
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
            variant=variant,
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
        self.variant = variant
        self.strides = strides
        self.logits = nn.Parameter(torch.zeros(len(teachers)), requires_grad=weights == "learned")
        self.learned = weights == "learned"
        # The autoencoder/decoder serves the weight step and the reconstruction term; with
        # neither there is nothing to train it for.
        self.use_ae = self.learned or reconstruction
        self.reconstruction = reconstruction
        self.recon_weight = recon_weight
        self.temperature = weight_temperature
        self.weight_lr = weight_lr
        self.map_norm = map_norm
        if variant == "heads":
            side = self._build_heads(ae_scale, ae_hidden, ae_bottleneck)
        else:
            side = self._build_paper(image_size, ae_hidden)
        self.scale = MapNorm([(h, h) for h in side], rings=0)
        # The paper variant decodes its target through a Linear sized for the whole image.
        self.accepts_crops = variant != "paper"
        self.size = (image_size, image_size)
        self.norm_student = Normalize(self.student.mean, self.student.std)
        self.norm_teachers = nn.ModuleList(Normalize(t.mean, t.std) for t in self.teachers)
        self.blur = GaussianBlur(sigma, self.size)

    def _build_heads(self, ae_scale: int, hidden: int, bottleneck: int) -> list[int]:
        """Variant heads' modules. Returns the side of every map term (MapNorm's order)."""
        # Per-teacher, per-scale projection of the student's features into the teacher's space.
        self.heads = nn.ModuleList(
            nn.ModuleList(
                nn.Conv2d(cs, ct, 1)
                for cs, ct in zip(self.student.channels, t.channels, strict=True)
            )
            for t in self.teachers
        )
        self.ae_stride = self.strides[ae_scale]
        ae_in = sum(sum(t.channels) for t in self.teachers)
        self.ae = ReconstructionAE(ae_in, hidden, bottleneck)
        s, k = self.args["image_size"], len(self.teachers)
        return [s // st for st in self.strides] * k + [s // self.ae_stride] * (
            k if self.use_ae else 0
        )

    def _build_paper(self, image_size: int, hidden: int) -> list[int]:
        """Variant paper's modules. Returns the side of every map term (MapNorm's order:
        |z_S - z_T|^2 per scale, 1 - cos per scale, the reconstruction error)."""
        self.fuse = FusedTarget([t.channels for t in self.teachers])
        # The student predicts the fused target directly (the authors' student outputs the
        # teachers' 1000 logits); a 1x1 head per scale bridges the student's own width.
        self.heads = nn.ModuleList(
            nn.Conv2d(cs, d, 1)
            for cs, d in zip(self.student.channels, self.fuse.widths, strict=True)
        )
        self.decoder = ImageDecoder(self.fuse.widths, self.strides, hidden) if self.use_ae else None
        sides = [image_size // st for st in self.strides] * 2
        return sides + ([image_size] if self.reconstruction else [])

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

    def _teacher_feats(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """Args: x (B,3,S,S) 0..255. Returns: [teacher k][scale i] (B,C_k,i,S/s_i,S/s_i)."""
        with torch.no_grad():
            return [t(n(x)) for t, n in zip(self.teachers, self.norm_teachers, strict=True)]

    # ------------------------------------------------------------------ variant heads

    def terms(
        self, x: torch.Tensor, w: torch.Tensor
    ) -> tuple[list[list[torch.Tensor]], list[torch.Tensor] | None]:
        """Variant heads. Args: x (B,3,S,S) 0..255; w (K,) weights for the autoencoder input.
        Returns: deviations [teacher][scale] (B,1,S/s_i,S/s_i), and the per-teacher
        reconstruction errors (B,1,S/r,S/r) (None when the autoencoder is not used)."""
        t_feats = self._teacher_feats(x)
        s_feats = self.student(self.norm_student(x))
        dev = [
            [cosine_distance(t, h(s)) for t, h, s in zip(tf, heads, s_feats, strict=True)]
            for tf, heads in zip(t_feats, self.heads, strict=True)
        ]
        if not self.use_ae:
            return dev, None
        u = [
            [common_grid(f, s, self.ae_stride) for f, s in zip(tf, self.strides, strict=True)]
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

    def _heads_training_loss(self, x: torch.Tensor) -> torch.Tensor:
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

    # ------------------------------------------------------------------ variant paper

    def paper_losses(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Variant paper, the authors' two steps on one batch (train mode also accumulates the
        teachers' standardisation statistics, first, so this batch's target uses them).

        Returns:
            student loss (student and heads only: the fused target is detached), and the
            decoder's reconstruction loss from the weighted target (decoder and logits: the
            weights learn only here, by backprop through the decoder), None without a decoder.
        """
        t_feats = self._teacher_feats(x)
        if self.training:
            self.fuse.update(t_feats)
        u = self.fuse.per_teacher(t_feats)
        w = self.importance()
        z_t = self.fuse(u, w.detach())
        z_s = [h(s) for h, s in zip(self.heads, self.student(self.norm_student(x)), strict=True)]
        mse, cos = fused_deviation(z_s, z_t)
        student = fused_distillation_loss(mse, cos)
        rec = None
        if self.decoder is not None:
            rec = reconstruction_error(self.decoder(self.fuse(u, w)), to_signed_unit(x)).mean()
        if self.training and self.map_norm == "running":
            with torch.no_grad():
                self.scale.update(mse + cos + self._student_rec(z_s, x))
        return student, rec

    def _student_rec(self, z_s: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        """[(B,1,S,S)] the reconstruction error through the student, [] when not in the map."""
        if not self.reconstruction:
            return []
        return [reconstruction_error(self.decoder(z_s), to_signed_unit(x))]

    def paper_terms(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Variant paper's map terms, MapNorm's order. Args: x (B,3,S,S) 0..255. Returns:
        |z_S - z_T|^2 per scale, 1 - cos per scale (B,1,S/s_i,S/s_i), and (reconstruction
        on) the error of decoder(z_S) against the image (B,1,S,S)."""
        u = self.fuse.per_teacher(self._teacher_feats(x))
        z_t = self.fuse(u, self.importance())
        z_s = [h(s) for h, s in zip(self.heads, self.student(self.norm_student(x)), strict=True)]
        mse, cos = fused_deviation(z_s, z_t)
        return mse + cos + self._student_rec(z_s, x)

    # ------------------------------------------------------------------ the model contract

    def training_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B,3,S,S) 0..255. Returns: scalar, the sum of every block's objective
        (heads: the weight step adds its gradient for the logits but no value)."""
        if self.variant == "heads":
            return self._heads_training_loss(x)
        student, rec = self.paper_losses(x)
        return student if rec is None else student + rec

    @torch.no_grad()
    def fit_map_normalization(self, batches) -> None:
        """Quantile normalisation from held-out good images (eval mode); see MapNorm."""
        if self.map_norm != "quantile":
            return
        terms = []
        for x in batches:
            if self.variant == "paper":
                terms.append(self.paper_terms(x))
            else:
                dev, rec = self.terms(x, self.importance())
                terms.append([d for per in dev for d in per] + (rec or []))
        self.scale.fit(terms)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x (B,3,S,S) float 0..255. Returns: anomaly_map (B,1,S,S), score (B,)."""
        n = len(self.strides)
        if self.variant == "paper":
            t = self.paper_terms(x)
            if self.map_norm != "none":
                t = self.scale(t)
            rec = t[2 * n] if self.reconstruction else None
            return paper_anomaly_map(
                t[:n], t[n : 2 * n], self.strides, rec, self.recon_weight, self.size, self.blur
            )
        w = self.importance()
        dev, rec = self.terms(x, w)
        if not self.reconstruction:
            rec = None
        if self.map_norm != "none":
            flat = self.scale([d for per in dev for d in per] + (rec or []))
            dev = [flat[k * n : (k + 1) * n] for k in range(len(dev))]
            rec = flat[len(dev) * n :] if rec is not None else None
        return mtkd_anomaly_map(
            dev, self.strides, rec, self.ae_stride, w, self.recon_weight, self.size, self.blur
        )
