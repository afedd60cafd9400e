"""Checkpoint -> bundle: `model.onnx` taking raw uint8 pixels, checked and parity-tested.

The graph holds everything after resize: uint8 -> float cast, mean/std normalisation, the
teacher/student networks, the anomaly map, its Gaussian smoothing and the image score. The device
only crops, resizes and transposes (edge.preprocess), exactly as training did.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import onnx
import torch
from onnx import TensorProto

from edge import bundle as bundle_mod
from edge.atomic import atomic_write
from edge.errors import BundleError, DataError, InvalidValue
from edge.preprocess import list_images, load_batch
from engines import graph as graph_mod
from engines import parity
from engines.parity import ParityError, ParityReport
from train.checkpoint import load_checkpoint

log = logging.getLogger("lineinspect.export")

OPSET = 17
# Parity tolerances (issue 4): anomaly map max abs diff within MAP_TOL of the map's range on the
# parity images, image scores within SCORE_RTOL relative.
MAP_TOL = 1e-3
SCORE_RTOL = 1e-4
SAMPLES_DIR = "samples"

__all__ = ["export", "ParityError", "ParityReport", "MAP_TOL", "SCORE_RTOL", "OPSET"]


class RawPixelGraph(torch.nn.Module):
    """uint8 (B,3,H,W) RGB -> (anomaly_map (B,1,H,W), score (B,)); the model normalises itself."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model  # node scopes /model/<submodule>/... (engines.graph.split relies on it)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(image.float())


# Ops that only make sense in training; an exported inference graph must not hold any.
TRAINING_OPS = frozenset({"Dropout", "SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss"})


def parity_images(ckpt: dict, images: str | Path | None, count: int) -> list[Path]:
    """Real images for the parity run: given folder, else the training data of the checkpoint."""
    if images is None:
        data = Path(ckpt.get("config", {}).get("data", ""))
        images = data / "train" / "good" if (data / "train" / "good").is_dir() else data
        if not data or not Path(images).is_dir():
            raise DataError(
                f"training data {data} of the checkpoint is not here; pass --images <dir of good images>"
            )
    files = list_images(images)
    # Spread the picks over the folder rather than taking the first few near-duplicates.
    idx = np.linspace(0, len(files) - 1, num=min(count, len(files))).round().astype(int)
    return [files[i] for i in sorted(set(idx))]


def check_graph(model: onnx.ModelProto, path: Path, batch: int, size: int) -> None:
    """onnx.checker (full), no training-only ops, static uint8 (batch,3,size,size) input and
    float32 anomaly_map (batch,1,size,size) / score (batch,) outputs. Raises BundleError."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise BundleError(f"{path}: onnx.checker failed: {exc}") from exc
    for n in model.graph.node:
        training_mode = any(a.name == "training_mode" and a.i for a in n.attribute)
        if n.op_type in TRAINING_OPS or training_mode:
            raise BundleError(f"{path}: training-only op {n.op_type} ({n.name}) in the graph")

    def dims(v):
        return [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in v.type.tensor_type.shape.dim
        ]

    want = {
        "image": (TensorProto.UINT8, [batch, 3, size, size]),
        "anomaly_map": (TensorProto.FLOAT, [batch, 1, size, size]),
        "score": (TensorProto.FLOAT, [batch]),
    }
    got = {
        v.name: (v.type.tensor_type.elem_type, dims(v))
        for v in [*model.graph.input, *model.graph.output]
    }
    if got != want:
        show = {k: (TensorProto.DataType.Name(t), d) for k, (t, d) in got.items()}
        raise BundleError(f"{path}: graph I/O is {show}, expected static {want}")


def torch_infer(model: torch.nn.Module) -> parity.Infer:
    graph = RawPixelGraph(model).eval()

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            m, s = graph(torch.from_numpy(x))
        return m.numpy(), s.numpy()

    return run


def ort_infer(path: Path) -> parity.Infer:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m, s = sess.run(["anomaly_map", "score"], {name: x})
        return m, s

    return run


def check_parity(model: torch.nn.Module, onnx_path: Path, files: list[Path], size) -> ParityReport:
    """Run torch and ONNX Runtime on the same uint8 inputs and compare (tolerances of issue 4)."""
    import onnxruntime as ort

    batch = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batch = batch.get_inputs()[0].shape[0]
    return parity.compare(
        torch_infer(model),
        ort_infer(onnx_path),
        files,
        tuple(size),
        int(batch),
        MAP_TOL,
        SCORE_RTOL,
    )


def write_samples(out: Path, files: list[Path], size: tuple[int, int]) -> list[str]:
    """The parity images, preprocessed to the graph's size, as lossless PNGs under samples/.

    `engines build` compares TensorRT with ONNX Runtime on them on the device, where the training
    data is not. Stored at model size, so to_input() gives back exactly the same uint8 tensor.
    """
    sdir = out / SAMPLES_DIR
    if sdir.is_dir():
        shutil.rmtree(sdir)
    sdir.mkdir(parents=True)
    names = []
    for i, f in enumerate(files):
        chw = load_batch([f], size)[0]
        name = f"{SAMPLES_DIR}/{i:03d}.png"
        ok, png = cv2.imencode(".png", np.ascontiguousarray(chw.transpose(1, 2, 0)[:, :, ::-1]))
        if not ok:
            raise DataError(f"{f}: cannot encode its parity sample as PNG")
        atomic_write(out / name, png.tobytes())
        names.append(name)
    return names


def export(
    run_dir: str | Path,
    out: str | Path,
    batch: int = 1,
    images: str | Path | None = None,
    parity_count: int = 8,
    name: str | None = None,
    clean: bool = True,
) -> tuple[Path, ParityReport]:
    """Export a training run to a bundle directory.

    Args:
        run_dir: training output folder holding checkpoint.pt (or the checkpoint file itself).
        out: bundle directory to write (created; an existing model.onnx is replaced).
        batch: fixed batch size of the graph input (1,3,H,W) by default.
        images: folder of real images for the parity run (default: the training data).
        parity_count: how many of them (spread over the folder); also kept as samples/.
        clean: clean the graph with onnxslim when installed (kept only if parity still holds).
    Returns:
        (bundle path, parity report). Raises ParityError (naming the worst image) if the graph
        disagrees with torch, BundleError if it fails onnx.checker or has the wrong I/O.
    """
    if batch < 1:
        raise InvalidValue(f"--batch: must be >= 1, got {batch}")
    run_dir = Path(run_dir)
    ckpt_path = run_dir if run_dir.is_file() else run_dir / "checkpoint.pt"
    model, ckpt = load_checkpoint(ckpt_path)
    size = int(ckpt["args"].get("image_size", 256))
    files = parity_images(ckpt, images, parity_count)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    dummy = torch.zeros(batch, 3, size, size, dtype=torch.uint8)
    # Candidate graphs go to a scratch folder; model.onnx is replaced (atomically) only by the
    # one that passed parity, so a failed export leaves the previous bundle graph as it was.
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as scratch:
        raw_path = Path(scratch) / "raw.onnx"
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
            # onnxscript and emits opset 18+; for this conv net the TorchScript graph is the
            # cleaner.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                RawPixelGraph(model).eval(),
                (dummy,),
                str(raw_path),
                opset_version=OPSET,
                input_names=["image"],
                output_names=["anomaly_map", "score"],
                do_constant_folding=True,
                dynamo=False,
            )
        raw = onnx.load(str(raw_path))
        check_graph(raw, onnx_path, batch, size)
        graph_path, cleaned_by = raw_path, ""
        if clean:
            slim, cleaned_by = graph_mod.clean(raw)
            if cleaned_by:
                try:
                    check_graph(slim, onnx_path, batch, size)
                    graph_path = Path(scratch) / "clean.onnx"
                    onnx.save(slim, str(graph_path))
                except BundleError as exc:
                    log.warning(
                        "%s: cleaned graph rejected (%s); keeping the raw export", cleaned_by, exc
                    )
                    cleaned_by = ""

        report = check_parity(model, graph_path, files, (size, size))
        if not report.ok and cleaned_by:
            # Cleaning must never cost parity: fall back to the raw export and judge that.
            log.warning("parity failed after %s; retrying with the raw export", cleaned_by)
            graph_path, cleaned_by = raw_path, ""
            report = check_parity(model, graph_path, files, (size, size))
        if not report.ok:
            raise ParityError(report.failure(f"{onnx_path}: ONNX Runtime disagrees with torch"))
        atomic_write(onnx_path, graph_path.read_bytes())

    # The resolved training config travels with the bundle (provenance), hashed like the rest.
    train_cfg = run_dir / "config.yaml" if run_dir.is_dir() else None
    files_listed: dict = {"model.onnx": None}
    if train_cfg is not None and train_cfg.is_file():
        atomic_write(out / "train_config.yaml", train_cfg.read_bytes())
        files_listed["train_config.yaml"] = None
    for stale in (bundle_mod.PRECISION_FILES["fp16"], bundle_mod.PRECISION_FILES["int8"]):
        # Reduced-precision graphs of a previous export no longer match model.onnx.
        (out / stale).unlink(missing_ok=True)
    for sample in write_samples(out, files, (size, size)):
        files_listed[sample] = None
    prov = dict(ckpt.get("provenance", {}))
    prov["exported"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    prov["checkpoint"] = str(ckpt_path.resolve())
    manifest = bundle_mod.Manifest(
        name=name or f"{ckpt['kind']}-{ckpt['args'].get('backbone', 'model')}",
        model=ckpt["kind"],
        backbone=str(ckpt["args"].get("backbone", "")),
        input=bundle_mod.InputSpec(height=size, width=size, batch=batch),
        files=files_listed,  # hashed by write_manifest
        model_args=dict(ckpt["args"]),
        provenance=prov,
        quantization={},
    )
    manifest.provenance["export"] = {
        "opset": OPSET,
        "torch": str(torch.__version__),
        "onnx": str(onnx.__version__),
        "cleaned_by": cleaned_by or None,
        "nodes": len(onnx.load(str(onnx_path)).graph.node),
        "samples": SAMPLES_DIR,
        "parity": report.as_dict() | {"images_dir": str(Path(files[0]).parent)},
    }
    # A stale thresholds.yaml fitted on the previous graph is refused by Bundle.thresholds().
    bundle_mod.write_manifest(out, manifest)
    log.info(
        "exported %s (%s; parity %s)", onnx_path, cleaned_by or "not cleaned", report.summary()
    )
    return out, report
