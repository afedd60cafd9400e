"""MTKD: multi-teacher knowledge distillation with importance weights learned through an
autoencoder reconstruction."""

from train.models.mtkd.torch_model import MTKD

__all__ = ["MTKD"]
