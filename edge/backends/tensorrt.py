"""Native TensorRT backend: a cached engine from `python -m engines build`, run through pycuda.

One CUDA stream, page-locked host buffers and device buffers allocated once (owned by
`PinnedBuffer`), tensors bound by name (TensorRT 10+: set_tensor_address + execute_async_v3;
8.x: the bindings list + execute_async_v2; see trt_compat.io_api). The engine is never built here:
it is looked up in the bundle's engines/ cache by (onnx sha, GPU, TensorRT version, precision) and
checked against its JSON sidecar and its own hash before it is deserialised.

The CUDA primary context is pushed around every call, so the backend can be created in one thread
and used from another (the edge pipeline's inference stage).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pycuda.driver as cuda
import tensorrt as trt

from edge.backends import trt_compat as tc
from edge.backends.base import check_batch, check_outputs
from edge.errors import BackendError

log = logging.getLogger(__name__)
# One logger for the process: TensorRT warns when runtimes are given different ones.
TRT_LOGGER = trt.Logger(trt.Logger.WARNING)


class CudaContext:
    """The device's primary context, made current for the duration of a `with` block."""

    def __init__(self, device: int):
        cuda.init()
        if device >= cuda.Device.count():
            raise BackendError(f"CUDA device {device} does not exist ({cuda.Device.count()} found)")
        self._ctx = cuda.Device(device).retain_primary_context()

    def __enter__(self) -> CudaContext:
        self._ctx.push()
        return self

    def __exit__(self, *exc: object) -> None:
        cuda.Context.pop()

    def release(self) -> None:
        if self._ctx is not None:
            self._ctx.detach()
            self._ctx = None


class PinnedBuffer:
    """A page-locked host array and a device allocation of the same size, for one I/O tensor."""

    def __init__(self, spec: tc.TensorSpec):
        self.spec = spec
        self.host = cuda.pagelocked_empty(spec.shape, np.dtype(spec.dtype))
        self.device = cuda.mem_alloc(self.host.nbytes)

    @property
    def address(self) -> int:
        return int(self.device)

    def to_device(self, stream: Any) -> None:
        cuda.memcpy_htod_async(self.device, self.host, stream)

    def to_host(self, stream: Any) -> None:
        cuda.memcpy_dtoh_async(self.host, self.device, stream)

    def free(self) -> None:
        if self.device is not None:
            self.device.free()
            self.device = None


class TensorRTBackend:
    """A bundle's engine for `precision` on this GPU and TensorRT version.

    Args:
        bundle: edge.bundle.Bundle.
        precision: fp32 | fp16 | int8.
        device_id: CUDA device index.
    Raises:
        BundleError: the ONNX graph the engine comes from is tampered with, or the cached engine
            fails its sidecar check (other GPU/TensorRT/graph, or its bytes changed).
        BackendError: no engine built yet for this device (says the command to run), or the
            engine's I/O does not match the bundle.
    """

    name = "tensorrt"

    def __init__(self, bundle: Any, precision: str = "fp32", *, device_id: int = 0):
        self.version = tc.parse_version(trt.__version__)
        tc.check_supported(self.version)
        # sha256 of the graph the engine comes from (tampered -> BundleError)
        bundle.model_path(tc.engine_source(self.version, precision))
        self._cuda = CudaContext(device_id)
        gpu, gpu_name, _ = tc.gpu_identity(cuda, device_id)
        self._buffers: list[PinnedBuffer] = []
        try:
            self._load(bundle, precision, gpu, gpu_name)
        except BaseException:
            self.close()  # no context or pinned memory left behind by a failed load
            raise

    def _load(self, bundle: Any, precision: str, gpu: str, gpu_name: str):
        expect = tc.expect_for(bundle, precision, self.version, gpu)
        found = tc.find_engine(bundle.root / tc.ENGINES_DIR, expect, self.version)
        if found is None:
            raise BackendError(
                f"no TensorRT {precision} engine for this bundle on {gpu_name} with TensorRT "
                f"{self.version} in {bundle.root / tc.ENGINES_DIR}; build it on this device with "
                f"`python -m engines build {bundle.root} --precision {precision}`"
            )
        path, self.sidecar = found
        self.engine_path = path
        self._api = tc.io_api(self.version)
        with self._cuda:
            self._runtime = trt.Runtime(TRT_LOGGER)
            self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self._engine is None:
                raise BackendError(f"{path}: TensorRT could not deserialise the engine")
            specs = tc.engine_io(trt, self._engine, self._api)
            m = bundle.manifest
            h, w = bundle.image_size
            self.input_shape = (m.input.batch, 3, h, w)
            tc.check_io(
                specs, m.input.name, self.input_shape, (m.outputs.anomaly_map, m.outputs.score)
            )
            self._context = self._engine.create_execution_context()
            self._stream = cuda.Stream()
            self._buffers = [PinnedBuffer(s) for s in specs]
            by_name = {b.spec.name: b for b in self._buffers}
            self._in = by_name[m.input.name]
            self._maps = by_name[m.outputs.anomaly_map]
            self._scores = by_name[m.outputs.score]
            self._bindings = tc.bind(
                self._context, self._api, specs, {b.spec.name: b.address for b in self._buffers}
            )
        self._hw = (h, w)
        log.info("tensorrt: %s (%s I/O, TensorRT %s)", path.name, self._api, self.version)

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B,3,H,W) uint8 RGB -> (B,1,H,W) float32 maps, (B,) float32 scores."""
        check_batch(batch, self.input_shape, dynamic=False)
        with self._cuda:
            np.copyto(self._in.host, batch)
            self._in.to_device(self._stream)
            tc.execute(self._context, self._api, self._bindings, self._stream.handle)
            self._maps.to_host(self._stream)
            self._scores.to_host(self._stream)
            self._stream.synchronize()
        # Copies: the pinned buffers are overwritten by the next call.
        return check_outputs(self._maps.host.copy(), self._scores.host.copy(), len(batch), self._hw)

    def close(self) -> None:
        if getattr(self, "_cuda", None) is None:
            return
        with self._cuda:
            for b in self._buffers:
                b.free()
            self._buffers = []
            self._stream = None
            self._context = None
            self._engine = None
            self._runtime = None
        self._cuda.release()
        self._cuda = None
