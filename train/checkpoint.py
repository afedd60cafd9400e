"""Load a training checkpoint back into a model (for export, calibration, evaluation)."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from edge.errors import LineInspectError
from train.models import MODELS, build_model


class CheckpointError(LineInspectError):
    """A checkpoint file is missing, corrupt or does not match its model."""


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from the checkpoint's kind + args and load its weights.

    The teacher's pretrained weights are not re-read from their package: the state dict holds
    them, so a checkpoint loads on a machine without the weight packages too.

    Args:
        path: a checkpoint.pt written by train.fit.
        device: where to put the model.
    Returns:
        (model in eval mode, the checkpoint dict without "state_dict": kind, args, config,
        provenance, history).
    Raises:
        CheckpointError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        # weights_only: a checkpoint holds only tensors and plain containers (no pickled code).
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated/corrupt file
        raise CheckpointError(f"{path}: not a readable checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or not {"kind", "args", "state_dict"} <= set(ckpt):
        raise CheckpointError(
            f"{path}: not a LineInspect checkpoint (needs kind, args, state_dict)"
        )
    kind, args = ckpt["kind"], dict(ckpt["args"])
    if kind not in MODELS:
        raise CheckpointError(f"{path}: unknown model kind {kind!r} (valid: {', '.join(MODELS)})")
    if "pretrained" in inspect.signature(MODELS[kind].__init__).parameters:
        args["pretrained"] = False  # the state dict below holds the teacher weights
    try:
        model = build_model(kind, **args)
        model.load_state_dict(ckpt["state_dict"])
    except (ValueError, RuntimeError, LineInspectError) as exc:
        raise CheckpointError(f"{path}: does not match model {kind!r}: {exc}") from exc
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, meta
