"""PatchCore (Roth et al., 2022): the training-free reference every benchmark compares against."""

from train.models.patchcore.torch_model import PatchCore

__all__ = ["PatchCore"]
