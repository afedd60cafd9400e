"""DSKD: dual-student knowledge distillation (encoder-like Se, decoder-like Sd, one teacher)."""

from train.models.dskd.torch_model import DSKD

__all__ = ["DSKD"]
