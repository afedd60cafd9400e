"""Model registry. Every model: keyword-only constructor args stored in `self.args`,
`training_loss(x) -> scalar`, eval `forward(x) -> (anomaly_map (B,1,H,W), score (B,))`,
x float32 (B,3,H,W) RGB 0..255. Optional `param_groups(lr) -> list[dict]`: the optimiser's
parameter groups (train.fit uses them instead of one group of every trainable parameter).
A memory model (patchcore) has no training loss: `fit_memory(batches)` fills it from good
images instead. Optional `fit_map_normalization(batches)`: fitted after training, in eval mode,
on held-out good images (train.fit calls it when present).
"""

from __future__ import annotations

import inspect

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
