"""Inference backends behind one protocol (`base.Backend`), chosen by name.

    onnxruntime   ONNX Runtime, providers TensorRT EP > CUDA EP > CPU (whatever this build has)
    tensorrt      native TensorRT engine (pycuda); added by the engines work, name reserved here
    auto          the first of AUTO_ORDER that loads on this machine

The registry maps names to "module:Class" strings imported on demand, so a device without
TensorRT (or a workstation without pycuda) never imports what it cannot load.
"""

from __future__ import annotations

import importlib
import inspect
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


def _accepted(cls: type, opts: dict[str, Any]) -> dict[str, Any]:
    """The options `cls` takes. Tuning options are per backend (ONNX Runtime's thread count
    means nothing to TensorRT), so a station's settings never stop another backend loading."""
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return opts
    skipped = sorted(set(opts) - set(params))
    if skipped:
        log.debug("%s ignores options %s", cls.__name__, skipped)
    return {k: v for k, v in opts.items() if k in params}


def load_backend(name: str, bundle: Any, precision: str = "fp32", **opts: Any) -> Backend:
    """Load `bundle`'s graph for `precision` on backend `name` ("auto" = first that loads).

    opts: backend options (e.g. intra_op_threads, spin); each backend gets those it takes."""
    if name != "auto":
        cls = backend_class(name)
        return cls(bundle, precision, **_accepted(cls, opts))
    reasons = []
    for candidate in AUTO_ORDER:
        try:
            cls = backend_class(candidate)
            backend = cls(bundle, precision, **_accepted(cls, opts))
        except BackendError as exc:
            log.debug("auto: %s unavailable: %s", candidate, exc)
            reasons.append(f"{candidate}: {exc}")
            continue
        log.info("auto: using backend %s", candidate)
        return backend
    raise BackendError("no backend could load the model: " + "; ".join(reasons))


__all__ = ["BACKENDS", "AUTO_ORDER", "Backend", "backend_class", "load_backend"]
