"""The backend protocol: one small surface every inference engine implements.

A backend takes the bundle's raw-pixel input and returns what the graph computes; thresholds and
regions are post-processing's job, so every backend is interchangeable and parity-testable.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edge.errors import BackendError


class Backend(Protocol):
    """name, input_shape, infer and close are required. Optional, read with getattr:
    `dynamic_batch: bool` (default False): True when infer takes any batch size >= 1; a
    fixed-batch engine takes exactly input_shape[0] frames and the caller pads."""

    name: str
    input_shape: tuple[int, int, int, int]  # (B,3,H,W); B = largest batch the engine takes

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B,3,H,W) uint8 RGB -> (anomaly maps (B,1,H,W) float32, scores (B,) float32)."""
        ...

    def close(self) -> None: ...


def check_batch(batch: object, input_shape: tuple[int, int, int, int], dynamic: bool) -> None:
    """Raise BackendError (expected vs got) unless `batch` is uint8 (B,3,H,W) for this engine.

    dynamic: the engine takes any batch size >= 1; otherwise B must equal input_shape[0].
    """
    b, c, h, w = input_shape
    want = f"uint8 ({'B' if dynamic else b},{c},{h},{w})"
    if not isinstance(batch, np.ndarray):
        raise BackendError(f"input batch: expected numpy {want}, got {type(batch).__name__}")
    got = f"{batch.dtype} {tuple(batch.shape)}"
    ok = batch.dtype == np.uint8 and batch.ndim == 4 and tuple(batch.shape[1:]) == (c, h, w)
    if ok:
        ok = batch.shape[0] >= 1 if dynamic else batch.shape[0] == b
    if not ok:
        raise BackendError(f"input batch: expected {want}, got {got}")


def check_outputs(
    maps: np.ndarray, scores: np.ndarray, batch: int, hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Normalise graph outputs to float32 maps (B,1,H,W) and scores (B,), or raise BackendError."""
    maps = np.asarray(maps, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if maps.shape != (batch, 1, *hw) or scores.shape != (batch,):
        raise BackendError(
            f"graph outputs: expected anomaly_map {(batch, 1, *hw)} and score {(batch,)}, "
            f"got {maps.shape} and {scores.shape}"
        )
    return maps, scores
