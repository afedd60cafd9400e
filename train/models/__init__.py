"""Model registry. Every model: keyword-only constructor args stored in `self.args`,
`training_loss(x) -> scalar`, eval `forward(x) -> (anomaly_map (B,1,H,W), score (B,))`,
x float32 (B,3,H,W) RGB 0..255. Optional `param_groups(lr) -> list[dict]`: the optimiser's
parameter groups (train.fit uses them instead of one group of every trainable parameter).
A memory model (patchcore) has no training loss: `fit_memory(batches)` fills it from good
images instead. Optional `fit_map_normalization(batches)`: fitted after training, in eval mode,
on held-out good images (train.fit calls it when present).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any

from torch import nn

from train.models.dskd import DSKD
from train.models.mtkd import MTKD
from train.models.patchcore import PatchCore
from train.models.stpm import STPM

MODELS: dict[str, type[nn.Module]] = {
    "stpm": STPM,
    "dskd": DSKD,
    "mtkd": MTKD,
    "patchcore": PatchCore,
}


# Constructor parameters that are not model arguments a config may set.
_NOT_ARGS = ("pretrained",)


def args_class(kind: str) -> type:
    """The model's arguments as a dataclass (`<Model>Args`), made from its constructor's
    keyword-only parameters: names, annotations and defaults are written once, in the
    constructor, and `check_args` validates a config's model_args with it like every other
    key (unknown keys and wrong types refused: `embedding: "false"` is an error, not True).
    """
    cls = MODELS[kind]
    fields = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.kind is not p.KEYWORD_ONLY or p.name in _NOT_ARGS:
            continue
        default = p.default
        if isinstance(default, (list, dict)):  # a dataclass needs a factory for these
            spec = dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d))
        else:
            spec = dataclasses.field(default=default)
        fields.append((p.name, p.annotation, spec))
    args = dataclasses.make_dataclass(f"{cls.__name__}Args", fields, frozen=True)
    args.__module__ = cls.__module__  # its string annotations resolve in the model's module
    return args


def check_args(kind: str, args: dict[str, Any], source: str) -> dict[str, Any]:
    """The given model_args, type-checked against `args_class(kind)`.

    Returns the same keys with their values converted (an int given for a float becomes a
    float). Raises ConfigError "<source>: model_args.<key>: ..." on an unknown key or a wrong
    type."""
    from edge import typedconfig

    typed = typedconfig.from_dict(args_class(kind), args, source, prefix="model_args.")
    return {k: getattr(typed, k) for k in args}


def build_model(kind: str, **args) -> nn.Module:
    """Build a registered model.

    Args:
        kind: a key of MODELS.
        **args: the model's keyword arguments (e.g. a checkpoint's "args").
    Returns:
        the model (train mode, as constructed).
    Raises:
        ValueError: unknown kind, or an argument the model does not take.
    """
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r} (valid: {', '.join(MODELS)})")
    cls = MODELS[kind]
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]
        unknown = sorted(set(args) - set(valid))
        if unknown:
            raise ValueError(
                f"model {kind!r}: unknown argument(s) {', '.join(unknown)} "
                f"(valid: {', '.join(valid)})"
            )
    return cls(**args)
