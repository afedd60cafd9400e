"""A fake `tensorrt` module and `pycuda.driver`, enough to drive trt_compat, engines.trt_build,
engines.build and edge.backends.tensorrt through every version branch on machines without a GPU.

It records what the code under test asked of TensorRT (network flags, builder flags, workspace,
timing cache) and "builds" an engine whose bytes are the parsed ONNX file's, so a test can see
which graph was built. Deserialised, that engine runs the ONNX graph in ONNX Runtime, reading and
writing the fake device allocations the backend bound by name (10+) or by bindings list (8.x).
It is a model of NVIDIA's documented Python API, not a TensorRT: nothing here says that the real
calls succeed, only that the code makes the documented ones in a working order.
"""

from __future__ import annotations

import enum
import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5


_NP = {
    DataType.FLOAT: np.float32,
    DataType.HALF: np.float16,
    DataType.INT8: np.int8,
    DataType.INT32: np.int32,
    DataType.BOOL: np.bool_,
    DataType.UINT8: np.uint8,
}
_FROM_ONNX = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 2: DataType.UINT8}
HEADER_END = b"\n"  # fake engine = one header line + the ONNX bytes it was built from

# Fake device memory shared by the fake pycuda (allocations) and the fake engine (execution).
ALLOCS: dict[int, bytearray] = {}
_addresses = itertools.count(0x1000, 0x1000)


def _onnx_io(model):
    """[(name, shape, DataType, is_input)] of an ONNX model, -1 for symbolic dims."""
    out = []
    for vs, is_in in ((model.graph.input, True), (model.graph.output, False)):
        for v in vs:
            dims = tuple(d.dim_value if d.dim_value else -1 for d in v.type.tensor_type.shape.dim)
            out.append((v.name, dims, _FROM_ONNX[v.type.tensor_type.elem_type], is_in))
    return out


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


def make_trt(version: str, *, parse_errors: list[dict] | None = None, build_fails=False):
    """A fake tensorrt module of `version` (its enums follow that version's API)."""
    major = int(version.split(".")[0])
    calls: dict = {"builds": 0, "network_flags": [], "set_flags": [], "cleared": [], "pool": []}

    flags = ["TF32", "REFIT"] + ([] if major >= 11 else ["FP16", "INT8"])
    BuilderFlag = enum.Enum("BuilderFlag", flags)
    nd_members = {"EXPLICIT_BATCH": 0} if major < 11 else {}
    if major >= 10:
        nd_members["STRONGLY_TYPED"] = 1
    NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", nd_members)

    class Logger:
        WARNING = 2

        def __init__(self, level=None):
            self.level = level

    class Tensor:
        def __init__(self, name, shape, dtype):
            self.name, self.shape, self.dtype = name, shape, dtype

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.inputs: list[Tensor] = []
            self.outputs: list[Tensor] = []
            self.source: Path | None = None

        @property
        def num_inputs(self):
            return len(self.inputs)

        @property
        def num_outputs(self):
            return len(self.outputs)

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

    class ParserError:
        def __init__(self, d):
            self._d = d

        def desc(self):
            return self._d["desc"]

        def code(self):
            return self._d.get("code", 1)

        def node(self):
            return self._d.get("node", -1)

    class ParserError10(ParserError):
        def node_name(self):
            return self._d.get("node_name", "")

        def node_operator(self):
            return self._d.get("node_operator", "")

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self._errors = [
                (ParserError10 if major >= 10 else ParserError)(e) for e in (parse_errors or [])
            ]

        @property
        def num_errors(self):
            return len(self._errors)

        def get_error(self, i):
            return self._errors[i]

        def parse_from_file(self, path):
            if self._errors:
                return False
            io = _onnx_io(onnx.load(path))
            self.network.inputs = [Tensor(n, sh, dt) for n, sh, dt, i in io if i]
            self.network.outputs = [Tensor(n, sh, dt) for n, sh, dt, i in io if not i]
            self.network.source = Path(path)
            return True

    class TimingCache:
        def __init__(self, data: bytes):
            self.data = bytes(data) + b"+"  # each build "adds" to the cache

        def serialize(self):
            return self.data

    class Config:
        def __init__(self):
            self.flags = set()
            self.timing_cache = None

        def set_memory_pool_limit(self, pool, size):
            calls["pool"].append((pool, size))

        def set_flag(self, flag):
            calls["set_flags"].append(flag.name)
            self.flags.add(flag.name)

        def clear_flag(self, flag):
            calls["cleared"].append(flag.name)
            self.flags.discard(flag.name)

        def create_timing_cache(self, data):
            calls["timing_cache_in"] = bytes(data)
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            calls["ignore_mismatch"] = ignore_mismatch
            self.timing_cache = cache
            return True

        def get_timing_cache(self):
            return self.timing_cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            calls["network_flags"].append(flags)
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def build_serialized_network(self, network, config):
            calls["builds"] += 1
            if build_fails:
                return None
            head = f"ENGINE flags={sorted(config.flags)} net={network.flags}".encode()
            return head + HEADER_END + network.source.read_bytes()

    api = "tensors" if major >= 10 else "bindings"

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            if not bytes(data).startswith(b"ENGINE"):
                return None
            return RunnableEngine(bytes(data).split(HEADER_END, 1)[1], api)

    return SimpleNamespace(
        __version__=version,
        calls=calls,
        DataType=DataType,
        TensorIOMode=TensorIOMode,
        MemoryPoolType=MemoryPoolType,
        BuilderFlag=BuilderFlag,
        NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag,
        Logger=Logger,
        Builder=Builder,
        OnnxParser=OnnxParser,
        Runtime=Runtime,
        nptype=lambda dt: _NP[dt],
    )


def make_cuda(name: str = "Orin", cc=(8, 7), count: int = 1):
    """A fake pycuda.driver: devices, a primary context, pinned/device memory, one stream."""
    state = {"pushed": 0, "detached": 0, "freed": 0}

    class PrimaryContext:
        def push(self):
            state["pushed"] += 1

        def detach(self):
            state["detached"] += 1

    class Context:
        @staticmethod
        def pop():
            assert state["pushed"] > 0, "pop without push"
            state["pushed"] -= 1

    class Device:
        def __init__(self, i):
            self.i = i

        @staticmethod
        def count():
            return count

        def name(self):
            return name

        def compute_capability(self):
            return cc

        def retain_primary_context(self):
            return PrimaryContext()

    class DeviceAllocation:
        def __init__(self, nbytes):
            self.addr = next(_addresses)
            ALLOCS[self.addr] = bytearray(nbytes)

        def __int__(self):
            return self.addr

        def free(self):
            state["freed"] += 1
            del ALLOCS[self.addr]

    def memcpy_htod_async(dest, src, stream):
        assert state["pushed"] > 0, "CUDA call outside the context"
        ALLOCS[int(dest)][:] = np.ascontiguousarray(src).tobytes()

    def memcpy_dtoh_async(dest, src, stream):
        assert state["pushed"] > 0, "CUDA call outside the context"
        dest[...] = np.frombuffer(bytes(ALLOCS[int(src)]), dest.dtype).reshape(dest.shape)

    class Stream:
        handle = 7

        def synchronize(self):
            pass

    return SimpleNamespace(
        init=lambda: None,
        Device=Device,
        Context=Context,
        state=state,
        pagelocked_empty=lambda shape, dtype: np.empty(shape, dtype),
        mem_alloc=DeviceAllocation,
        memcpy_htod_async=memcpy_htod_async,
        memcpy_dtoh_async=memcpy_dtoh_async,
        Stream=Stream,
    )


class FakeEngine:
    """An ICudaEngine with I/O tensors; `api` 'tensors' (10+) or 'bindings' (8.x)."""

    def __init__(self, specs: list[tuple[str, tuple, DataType, bool]], api: str):
        self._s = specs
        if api == "tensors":
            self.num_io_tensors = len(specs)
            self.get_tensor_name = lambda i: specs[i][0]
            self.get_tensor_mode = lambda n: (
                TensorIOMode.INPUT if self._by(n)[3] else TensorIOMode.OUTPUT
            )
            self.get_tensor_shape = lambda n: self._by(n)[1]
            self.get_tensor_dtype = lambda n: self._by(n)[2]
        else:
            self.num_bindings = len(specs)
            self.get_binding_name = lambda i: specs[i][0]
            self.binding_is_input = lambda i: specs[i][3]
            self.get_binding_shape = lambda i: specs[i][1]
            self.get_binding_dtype = lambda i: specs[i][2]

    def _by(self, name):
        return next(s for s in self._s if s[0] == name)


class FakeContext:
    """Records set_tensor_address / execute calls; `ok` is what TensorRT answers."""

    def __init__(self, ok: bool = True):
        self.ok = ok
        self.addresses: dict[str, int] = {}
        self.calls: list = []

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return self.ok

    def execute_async_v3(self, stream_handle):
        self.calls.append(("v3", stream_handle))
        return self.ok

    def execute_async_v2(self, bindings, stream_handle):
        self.calls.append(("v2", list(bindings), stream_handle))
        return self.ok


class RunnableEngine(FakeEngine):
    """A deserialised fake engine: the ONNX graph it was built from, run in ONNX Runtime."""

    def __init__(self, onnx_bytes: bytes, api: str):
        import onnxruntime as ort

        self.io = _onnx_io(onnx.load_from_string(onnx_bytes))
        super().__init__(self.io, api)
        self.api = api
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])

    def create_execution_context(self):
        return RunnableContext(self)


class RunnableContext(FakeContext):
    def __init__(self, engine: RunnableEngine):
        super().__init__()
        self.engine = engine

    def _run(self, addresses: dict[str, int]):
        feeds, outs = {}, []
        for name, shape, dt, is_in in self.engine.io:
            buf = bytes(ALLOCS[addresses[name]])
            if is_in:
                feeds[name] = np.frombuffer(buf, _NP[dt]).reshape(shape)
            else:
                outs.append(name)
        for name, value in zip(outs, self.engine.session.run(outs, feeds), strict=True):
            ALLOCS[addresses[name]][:] = np.ascontiguousarray(value).tobytes()

    def execute_async_v3(self, stream_handle):
        super().execute_async_v3(stream_handle)
        self._run(self.addresses)
        return True

    def execute_async_v2(self, bindings, stream_handle):
        super().execute_async_v2(bindings, stream_handle)
        self._run({s[0]: a for s, a in zip(self.engine.io, bindings, strict=True)})
        return True
