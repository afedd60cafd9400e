"""ONNX Runtime backend: the bundle's graph on the best execution provider this build has.

Provider preference: TensorRT EP > CUDA EP > CPU. The TensorRT EP caches its engines under the
bundle's engines/ directory (a device-local cache, like the native TensorRT backend's).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnxruntime as ort

from edge.backends.base import check_batch, check_outputs
from edge.errors import BackendError

log = logging.getLogger(__name__)

PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxRuntimeBackend:
    """Bundle graph in an onnxruntime.InferenceSession, tensors bound by the manifest's names.

    Args:
        bundle: edge.bundle.Bundle.
        precision: fp32 | fp16 | int8 (which graph file).
        intra_op_threads: CPU threads for one inference; 0 = onnxruntime's default (one per
            physical core).
        spin: let the intra-op threads busy-wait for work between operators. Off by default:
            on a small device the spinning threads take the cores that decode, post-process and
            publish need, for no gain in inference time (docs/edge.md has the measurements).
        providers: override the provider list (names from onnxruntime.get_available_providers()).
        device_id: GPU index for the CUDA/TensorRT providers.
    """

    name = "onnxruntime"

    def __init__(
        self,
        bundle: Any,
        precision: str = "fp32",
        *,
        intra_op_threads: int = 0,
        spin: bool = False,
        providers: list[str] | None = None,
        device_id: int = 0,
    ):
        path = bundle.model_path(precision)  # verifies sha256 (BundleError if tampered)
        available = ort.get_available_providers()
        wanted = providers or [p for p in PROVIDER_PREFERENCE if p in available]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise BackendError(f"onnxruntime: providers {missing} not in this build ({available})")
        provider_opts = []
        for p in wanted:
            if p == "TensorrtExecutionProvider":
                cache = bundle.root / "engines" / "ort-trt"
                try:
                    cache.mkdir(parents=True, exist_ok=True)
                except OSError:
                    cache = None
                o: dict[str, Any] = {"device_id": device_id}
                o["trt_fp16_enable"] = precision in ("fp16", "int8")
                o["trt_int8_enable"] = precision == "int8"  # Q/DQ graph: scales come from it
                if cache is not None:
                    o.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache))
                provider_opts.append((p, o))
            elif p == "CUDAExecutionProvider":
                provider_opts.append((p, {"device_id": device_id}))
            else:
                provider_opts.append((p, {}))

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = int(intra_op_threads)
        so.inter_op_num_threads = 1  # one frame at a time: inter-op parallelism only adds threads
        so.log_severity_level = 3
        spin_flag = "1" if spin else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin_flag)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin_flag)
        self.threads = int(intra_op_threads)
        self.spin = bool(spin)
        try:
            self._session = ort.InferenceSession(str(path), so, providers=provider_opts)
        except Exception as exc:
            raise BackendError(f"{path}: onnxruntime cannot load the graph: {exc}") from exc
        self.providers = self._session.get_providers()

        m = bundle.manifest
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        if m.input.name not in inputs:
            raise BackendError(
                f"{path}: graph has no input {m.input.name!r} (manifest), it has {list(inputs)}"
            )
        for out in (m.outputs.anomaly_map, m.outputs.score):
            if out not in outputs:
                raise BackendError(
                    f"{path}: graph has no output {out!r} (manifest), it has {sorted(outputs)}"
                )
        spec = inputs[m.input.name]
        if spec.type != "tensor(uint8)":
            raise BackendError(f"{path}: input {spec.name} is {spec.type}, expected tensor(uint8)")
        b = spec.shape[0]
        self._dynamic = not isinstance(b, int)
        self.dynamic_batch = self._dynamic
        h, w = bundle.image_size
        self.input_shape = (m.input.batch if self._dynamic else b, 3, h, w)
        self._in = m.input.name
        self._out = [m.outputs.anomaly_map, m.outputs.score]
        self._hw = (h, w)
        log.info("onnxruntime: %s on %s", path.name, ", ".join(self.providers))

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B,3,H,W) uint8 RGB -> (B,1,H,W) float32 maps, (B,) float32 scores."""
        check_batch(batch, self.input_shape, self._dynamic)
        try:
            maps, scores = self._session.run(self._out, {self._in: np.ascontiguousarray(batch)})
        except Exception as exc:
            raise BackendError(f"onnxruntime inference failed: {exc}") from exc
        return check_outputs(maps, scores, batch.shape[0], self._hw)

    def close(self) -> None:
        self._session = None
