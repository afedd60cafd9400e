"""STPM: Student-Teacher Feature Pyramid Matching (Wang et al., 2021)."""

from train.models.stpm.torch_model import STPM

__all__ = ["STPM"]
