"""Inference backends behind one protocol (`base.Backend`), chosen by name.

    onnxruntime   ONNX Runtime, providers TensorRT EP > CUDA EP > CPU (whatever this build has)
    tensorrt      native TensorRT engine (pycuda); added by the engines work, name reserved here
    auto          the first of AUTO_ORDER that loads on this machine

The registry maps names to "module:Class" strings imported on demand, so a device without
TensorRT (or a workstation without pycuda) never imports what it cannot load.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from edge.backends.base import Backend
from edge.errors import BackendError

log = logging.getLogger(__name__)

BACKENDS: dict[str, str] = {
    "tensorrt": "edge.backends.tensorrt:TensorRTBackend",
    "onnxruntime": "edge.backends.onnxruntime:OnnxRuntimeBackend",
}
AUTO_ORDER = ("tensorrt", "onnxruntime")  # fastest first

_INSTALL_HINTS = {
    "tensorrt": "install TensorRT's Python bindings (JetPack: python3-libnvinfer) and pycuda "
    "(pip install 'lineinspect[jetson]'), or use backend: onnxruntime",
    "onnxruntime": "pip install onnxruntime (onnxruntime-gpu for CUDA/TensorRT providers)",
}


def backend_class(name: str) -> type:
    """The class registered under `name`; BackendError saying what to install if not importable."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}, expected auto or one of {list(BACKENDS)}")
    module, _, cls = BACKENDS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        if getattr(exc, "name", None) == module:
            raise BackendError(
                f"backend {name!r} is not part of this edge build ({module} is missing)"
            ) from exc
        raise BackendError(
            f"backend {name!r} is not available here ({exc}); {_INSTALL_HINTS.get(name, '')}"
        ) from exc


def load_backend(name: str, bundle: Any, precision: str = "fp32", **opts: Any) -> Backend:
    """Load `bundle`'s graph for `precision` on backend `name` ("auto" = first that loads)."""
    if name != "auto":
        return backend_class(name)(bundle, precision, **opts)
    reasons = []
    for candidate in AUTO_ORDER:
        try:
            backend = backend_class(candidate)(bundle, precision, **opts)
        except BackendError as exc:
            log.debug("auto: %s unavailable: %s", candidate, exc)
            reasons.append(f"{candidate}: {exc}")
            continue
        log.info("auto: using backend %s", candidate)
        return backend
    raise BackendError("no backend could load the model: " + "; ".join(reasons))


__all__ = ["BACKENDS", "AUTO_ORDER", "Backend", "backend_class", "load_backend"]
