"""What the device needs to find, check and run a TensorRT engine, across TensorRT versions.

Nothing here imports TensorRT or pycuda: the functions take the `trt` / `cuda` module objects
(or the objects they made) as arguments, so each decision is unit-tested with small fakes on
machines without a GPU. `edge.backends.tensorrt` (the runtime) calls these and nothing
version-specific of its own; the builder's own decisions (network flags, builder flags, timing
cache, parser errors, writing the sidecar) live in `engines.trt_build`, which imports this module
for what both sides must agree on: which graph an engine comes from, its name, its sidecar
check and its I/O.

Versions (NVIDIA's documented APIs):
    8.5 / 8.6 (JetPack 5 / 6.0)  weakly typed: FP16 engines parsed from the FP32 graph, INT8 from
                                 the Q/DQ graph; bindings API (execute_async_v2) at run time.
    10.x (JetPack 6.1+)          weakly typed, as 8.x; name-based I/O (set_tensor_address +
                                 execute_async_v3), the bindings API is gone.
    11.x                         strongly typed only: precision comes from the graph
                                 (model.fp16.onnx, model.int8.onnx); name-based I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.bundle import PRECISION_FILES, sha256_file
from edge.errors import BackendError, BundleError

MIN_VERSION = (8, 5)
SIDECAR_FORMAT = "lineinspect-engine/1"
PRECISIONS = ("fp32", "fp16", "int8")
ENGINES_DIR = "engines"

# ---------------------------------------------------------------------------------------------
# Versions and the graph an engine comes from


@dataclass(frozen=True, order=True)
class TrtVersion:
    major: int
    minor: int
    patch: int = 0
    text: str = ""

    def __str__(self) -> str:
        return self.text or f"{self.major}.{self.minor}.{self.patch}"


def parse_version(text: str) -> TrtVersion:
    """'10.3.0.30' -> TrtVersion(10, 3, 0, '10.3.0.30'). BackendError if not a version."""
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", str(text).strip())
    if not m:
        raise BackendError(f"cannot parse the TensorRT version {text!r}")
    return TrtVersion(int(m[1]), int(m[2]), int(m[3] or 0), str(text).strip())


def check_supported(version: TrtVersion) -> None:
    if (version.major, version.minor) < MIN_VERSION:
        raise BackendError(
            f"TensorRT {version} is too old: need {MIN_VERSION[0]}.{MIN_VERSION[1]} or newer "
            "(JetPack 5.1+)"
        )


def strongly_typed(version: TrtVersion) -> bool:
    """TensorRT 11 builds strongly typed networks only: the graph's own types set precision."""
    return version.major >= 11


def engine_source(version: TrtVersion, precision: str) -> str:
    """Which bundle graph (fp32 | fp16 | int8, edge.bundle.PRECISION_FILES) the engine of
    `precision` is parsed from. The runtime needs it as much as the builder: the engine's cache
    key and sidecar name that graph's sha256."""
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}, expected one of {PRECISIONS}")
    if strongly_typed(version):
        return precision
    # Weakly typed: FP16 from the FP32 graph plus a builder flag; INT8 from the explicit Q/DQ
    # graph (its scales are used; no calibrator).
    return "int8" if precision == "int8" else "fp32"


# ---------------------------------------------------------------------------------------------
# I/O tensors


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name
    is_input: bool

    def describe(self) -> str:
        return f"{'input ' if self.is_input else 'output'} {self.name} {self.dtype} {self.shape}"


def np_dtype(trt: Any, dt: Any) -> str:
    """numpy dtype name of a TensorRT DataType (network and engine tensors alike)."""
    return np.dtype(trt.nptype(dt)).name


def io_api(version: TrtVersion) -> str:
    """'tensors' (name-based, execute_async_v3) from 10.0, 'bindings' (execute_async_v2) on 8.x:
    JetPack 5's 8.5 has the name-based calls too, but its bindings path is the proven one."""
    return "tensors" if version.major >= 10 else "bindings"


def engine_io(trt: Any, engine: Any, api: str) -> list[TensorSpec]:
    """I/O tensors of a deserialised ICudaEngine, in binding order for the bindings API."""
    specs = []
    if api == "tensors":
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_in = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = tuple(engine.get_tensor_shape(name))
            specs.append(
                TensorSpec(name, shape, np_dtype(trt, engine.get_tensor_dtype(name)), is_in)
            )
    elif api == "bindings":
        for i in range(engine.num_bindings):
            specs.append(
                TensorSpec(
                    engine.get_binding_name(i),
                    tuple(engine.get_binding_shape(i)),
                    np_dtype(trt, engine.get_binding_dtype(i)),
                    bool(engine.binding_is_input(i)),
                )
            )
    else:
        raise BackendError(f"unknown TensorRT I/O api {api!r}")
    return specs


def check_io(
    specs: list[TensorSpec], input_name: str, input_shape: tuple[int, ...], outputs: tuple[str, str]
) -> None:
    """Engine/network I/O must be the bundle's: uint8 input (B,3,H,W), float32 anomaly_map
    (B,1,H,W) and score (B,), all static. BackendError listing what differs."""
    b, _, h, w = input_shape
    want = {
        input_name: TensorSpec(input_name, tuple(input_shape), "uint8", True),
        outputs[0]: TensorSpec(outputs[0], (b, 1, h, w), "float32", False),
        outputs[1]: TensorSpec(outputs[1], (b,), "float32", False),
    }
    got = {s.name: s for s in specs}
    problems = []
    for name, w_spec in want.items():
        g = got.get(name)
        if g is None:
            problems.append(f"missing {w_spec.describe()}")
        elif g != w_spec:
            problems.append(f"{g.describe()}, expected {w_spec.describe()}")
    for name in set(got) - set(want):
        problems.append(f"unexpected {got[name].describe()}")
    if problems:
        raise BackendError("TensorRT I/O tensors do not match the bundle: " + "; ".join(problems))


def bind(context: Any, api: str, specs: list[TensorSpec], addresses: dict[str, int]) -> list[int]:
    """Give the context every I/O device address; returns the bindings list (bindings API)."""
    missing = [s.name for s in specs if s.name not in addresses]
    if missing:
        raise BackendError(f"no device buffer for TensorRT tensors {missing}")
    if api == "tensors":
        for s in specs:
            if not context.set_tensor_address(s.name, int(addresses[s.name])):
                raise BackendError(f"TensorRT refused the address of tensor {s.name}")
        return []
    return [int(addresses[s.name]) for s in specs]  # binding index order


def execute(context: Any, api: str, bindings: list[int], stream_handle: int) -> None:
    """Enqueue one inference on the stream; BackendError if TensorRT refuses."""
    if api == "tensors":
        ok = context.execute_async_v3(stream_handle=stream_handle)
    else:
        ok = context.execute_async_v2(bindings=bindings, stream_handle=stream_handle)
    if not ok:
        raise BackendError("TensorRT failed to enqueue the inference")


# ---------------------------------------------------------------------------------------------
# GPU identity, engine names, sidecars


def gpu_slug(name: str, compute_capability: tuple[int, int]) -> str:
    """'NVIDIA GeForce RTX 3090', (8, 6) -> 'nvidia-geforce-rtx-3090-sm86' (file-name safe)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
    return f"{slug}-sm{compute_capability[0]}{compute_capability[1]}"


def gpu_identity(cuda: Any, device: int = 0) -> tuple[str, str, tuple[int, int]]:
    """(slug, name, compute capability) of CUDA device `device` via pycuda.driver."""
    cuda.init()
    if device >= cuda.Device.count():
        raise BackendError(f"CUDA device {device} does not exist ({cuda.Device.count()} found)")
    dev = cuda.Device(device)
    name, cc = dev.name(), tuple(dev.compute_capability())
    return gpu_slug(name, cc), name, cc


def engine_name(onnx_sha256: str, gpu: str, version: TrtVersion, precision: str) -> str:
    """<onnx sha12>.<gpu>.trt<version>.<precision>.engine"""
    if len(onnx_sha256) < 12:
        raise BackendError(f"onnx sha256 {onnx_sha256!r} is too short")
    return f"{onnx_sha256[:12]}.{gpu}.trt{version}.{precision}.engine"


def sidecar_path(engine: Path) -> Path:
    return engine.with_name(engine.name + ".json")


@dataclass
class Expect:
    """What an engine must have been built from and for, to be used here."""

    onnx_file: str
    onnx_sha256: str
    trt_version: str
    gpu: str
    precision: str


def expect_for(bundle: Any, precision: str, version: TrtVersion, gpu: str) -> Expect:
    """What the engine of `precision` must match, from the bundle's manifest (builder and
    runtime both call this, so they agree on the cache key)."""
    source = engine_source(version, precision)
    return Expect(
        onnx_file=PRECISION_FILES[source],
        onnx_sha256=bundle.model_sha256(source),
        trt_version=str(version),
        gpu=gpu,
        precision=precision,
    )


def check_sidecar(engine: Path, expect: Expect) -> dict:
    """Load `engine`'s JSON sidecar and check it against `expect` and the engine's own bytes.

    Returns the sidecar dict. Raises BundleError naming the engine, the field and both values.
    """
    side = sidecar_path(engine)
    if not engine.is_file():
        raise BundleError(f"{engine}: engine file not found")
    if not side.is_file():
        raise BundleError(
            f"{engine}: no sidecar {side.name}; rebuild with `python -m engines build`"
        )
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{side}: unreadable engine sidecar: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise BundleError(f"{side}: not a {SIDECAR_FORMAT} sidecar")
    problems = []
    for key, want in asdict(expect).items():
        if meta.get(key) != want:
            problems.append(f"{key}: sidecar has {meta.get(key)!r}, here {want!r}")
    if problems:
        raise BundleError(
            f"{engine}: built for something else ({'; '.join(problems)}); rebuild with "
            "`python -m engines build`"
        )
    actual = sha256_file(engine)
    if actual != meta.get("engine_sha256"):
        raise BundleError(
            f"{engine}: sha256 mismatch, sidecar says {meta.get('engine_sha256')}, file has "
            f"{actual} (tampered or corrupted; rebuild with `python -m engines build --force`)"
        )
    return meta


def find_engine(cache_dir: Path, expect: Expect, version: TrtVersion) -> tuple[Path, dict] | None:
    """The cached engine for `expect` if present and valid; None if there is none.

    An engine that is there but fails its sidecar check raises (BundleError): a stale or
    tampered engine is an error to see, not something to silently rebuild over.
    """
    path = cache_dir / engine_name(expect.onnx_sha256, expect.gpu, version, expect.precision)
    if not path.is_file():
        return None
    return path, check_sidecar(path, expect)
