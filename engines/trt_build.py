"""(device) The builder's TensorRT version differences: build plan, network and builder flags,
timing cache, parser errors, network I/O and the sidecar written next to a new engine.

Like edge.backends.trt_compat (which this imports for what builder and runtime must agree on:
the graph an engine comes from, its name, its I/O check and its sidecar format), nothing here
imports TensorRT or pycuda at module level: the functions take the `trt` module or the objects
it made, so each decision is unit-tested with tests/trtfake.py. The device runtime never needs
these, which is why they are not in `edge`.

Versions (NVIDIA's documented APIs):
    8.5 / 8.6 (JetPack 5 / 6.0)  EXPLICIT_BATCH network flag; precision builder flags (FP16;
                                 INT8 + FP16 from the Q/DQ graph).
    10.x (JetPack 6.1+)          networks always explicit batch; precision builder flags.
    11.x                         STRONGLY_TYPED networks: no precision flags, no implicit
                                 calibration; precision comes from the graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge.backends import trt_compat as tc
from edge.bundle import sha256_file
from edge.errors import BackendError

INSTALL_HINT = (
    "install TensorRT's Python bindings (Jetson: JetPack's python3-libnvinfer, "
    "`apt install python3-libnvinfer`; x86: `pip install tensorrt`) and pycuda "
    "(`pip install 'lineinspect[jetson]'` or `pip install pycuda`)"
)


class TensorRTUnavailable(BackendError):
    """TensorRT or pycuda cannot be imported here; the message says what to install."""


def require_tensorrt() -> tuple[Any, Any]:
    """(tensorrt, pycuda.driver) modules, or TensorRTUnavailable saying what to install."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"TensorRT is not available here ({exc}); {INSTALL_HINT}"
        ) from exc
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise TensorRTUnavailable(f"pycuda is not available here ({exc}); {INSTALL_HINT}") from exc
    return trt, cuda


@dataclass(frozen=True)
class BuildPlan:
    """How to build an engine of `precision` with this TensorRT version."""

    precision: str
    source: str  # which bundle graph to parse (tc.engine_source)
    strongly_typed: bool
    explicit_batch: bool  # TRT 8.x needs the EXPLICIT_BATCH creation flag
    flags: tuple[str, ...]  # trt.BuilderFlag names to set
    clear_flags: tuple[str, ...]  # trt.BuilderFlag names to clear (when the version has them)


def build_plan(version: tc.TrtVersion, precision: str) -> BuildPlan:
    """The one place that decides builder flags vs strong typing; the graph to parse comes
    from tc.engine_source, which the runtime uses to find the same engine."""
    source = tc.engine_source(version, precision)  # raises on an unknown precision
    # TF32 is on by default on Ampere+; an "fp32" engine should mean FP32 arithmetic.
    clear = ("TF32",) if precision == "fp32" else ()
    if tc.strongly_typed(version):
        # The graph's own types decide; FP16/INT8 flags no longer exist.
        return BuildPlan(precision, source, True, False, (), clear)
    # Weakly typed: FP16 allowed for the layers an INT8 graph leaves unquantised.
    flags = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}[precision]
    return BuildPlan(precision, source, False, version.major < 10, flags, clear)


def network_flags(trt: Any, plan: BuildPlan) -> int:
    """Bit mask for builder.create_network()."""
    flags = 0
    nd = trt.NetworkDefinitionCreationFlag
    if plan.explicit_batch:
        flags |= 1 << int(nd.EXPLICIT_BATCH)
    if plan.strongly_typed:
        if not hasattr(nd, "STRONGLY_TYPED"):
            raise BackendError("this TensorRT has no STRONGLY_TYPED networks (need 10.0+)")
        flags |= 1 << int(nd.STRONGLY_TYPED)
    return flags


def configure(trt: Any, config: Any, plan: BuildPlan, workspace_bytes: int) -> list[str]:
    """Workspace limit and precision flags on an IBuilderConfig; returns the flags set."""
    if workspace_bytes <= 0:
        raise BackendError(f"workspace must be positive, got {workspace_bytes} bytes")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    applied = []
    for name in plan.flags:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise BackendError(f"TensorRT has no BuilderFlag.{name} (plan {plan})")
        config.set_flag(flag)
        applied.append(name)
    for name in plan.clear_flags:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is not None:
            config.clear_flag(flag)
    return applied


def timing_cache_path(cache_dir: Path, gpu: str, version: tc.TrtVersion) -> Path:
    """Default timing cache: one per GPU and TensorRT version, next to the engines."""
    return cache_dir / f"{gpu}.trt{version}.timing-cache"


def load_timing_cache(config: Any, path: Path | None) -> Any:
    """Timing cache from `path` (empty if the file does not exist) set on `config`."""
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None:
        raise BackendError(f"{path}: TensorRT could not read the timing cache")
    # A cache from another GPU or TensorRT version is refused rather than silently misused.
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise BackendError(
            f"{path}: timing cache does not fit this GPU/TensorRT; delete it or pass another "
            "--timing-cache"
        )
    return cache


def parser_errors(parser: Any) -> list[str]:
    """Every OnnxParser error as one line: node, operator, code, description."""
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        parts = [f"node {e.node()}"]
        for attr in ("node_name", "node_operator"):  # TensorRT 10+
            fn = getattr(e, attr, None)
            if fn is not None and fn():
                parts.append(f"{attr.split('_')[1]} {fn()}")
        parts.append(f"code {e.code()}")
        out.append(f"{', '.join(parts)}: {e.desc()}")
    return out


def network_io(trt: Any, network: Any) -> list[tc.TensorSpec]:
    """Inputs and outputs of a parsed INetworkDefinition."""
    specs = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        specs.append(tc.TensorSpec(t.name, tuple(t.shape), tc.np_dtype(trt, t.dtype), True))
    for i in range(network.num_outputs):
        t = network.get_output(i)
        specs.append(tc.TensorSpec(t.name, tuple(t.shape), tc.np_dtype(trt, t.dtype), False))
    return specs


def make_sidecar(engine: Path, expect: tc.Expect, **extra: Any) -> dict:
    """Sidecar dict for a freshly written engine (hash and size of its bytes included), in the
    format tc.check_sidecar reads back."""
    return {
        "format": tc.SIDECAR_FORMAT,
        "engine": engine.name,
        "engine_sha256": sha256_file(engine),
        "bytes": engine.stat().st_size,
        **asdict(expect),
        **extra,
    }
