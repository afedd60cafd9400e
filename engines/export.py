"""Checkpoint -> bundle: `model.onnx` taking raw uint8 pixels, checked and parity-tested.

The graph holds everything after resize: uint8 -> float cast, mean/std normalisation, the
teacher/student networks, the anomaly map, its Gaussian smoothing and the image score. The device
only crops, resizes and transposes (edge.preprocess), exactly as training did.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import torch

from edge import bundle as bundle_mod
from edge.errors import BundleError, DataError, LineInspectError
from edge.preprocess import list_images, load_batch
from train.checkpoint import load_checkpoint

log = logging.getLogger("lineinspect.export")

OPSET = 17
# Parity tolerances (issue 4): anomaly map max abs diff within MAP_TOL of the map's range on the
# parity images, image scores within SCORE_RTOL relative.
MAP_TOL = 1e-3
SCORE_RTOL = 1e-4


class ParityError(LineInspectError):
    """The exported graph disagrees with the trained model beyond tolerance."""


class RawPixelGraph(torch.nn.Module):
    """uint8 (B,3,H,W) RGB -> (anomaly_map (B,1,H,W), score (B,)); the model normalises itself."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(image.float())


@dataclass
class ParityReport:
    images: int
    map_max_abs: float
    map_range: float
    score_max_rel: float
    worst_image: str

    @property
    def ok(self) -> bool:
        return (
            self.map_max_abs <= MAP_TOL * max(self.map_range, 1e-12)
            and self.score_max_rel <= SCORE_RTOL
        )


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


def check_parity(model: torch.nn.Module, onnx_path: Path, files: list[Path], size) -> ParityReport:
    """Run torch and ONNX Runtime on the same uint8 inputs and compare."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    batch = sess.get_inputs()[0].shape[0]
    worst = (0.0, "")
    map_lo, map_hi, score_rel = np.inf, -np.inf, 0.0
    graph = RawPixelGraph(model).eval()
    for i in range(0, len(files), batch):
        chunk = files[i : i + batch]
        x = load_batch(chunk, size)  # (b,3,H,W) uint8
        pad = batch - len(x)
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        with torch.no_grad():
            t_map, t_score = (t.numpy() for t in graph(torch.from_numpy(x)))
        o_map, o_score = sess.run(None, {in_name: x})
        for j, name in enumerate(chunk):
            diff = float(np.abs(t_map[j] - o_map[j]).max())
            if diff > worst[0]:
                worst = (diff, str(name))
            rel = abs(float(t_score[j]) - float(o_score[j])) / max(abs(float(t_score[j])), 1e-12)
            score_rel = max(score_rel, rel)
            map_lo, map_hi = min(map_lo, float(t_map[j].min())), max(map_hi, float(t_map[j].max()))
    return ParityReport(len(files), worst[0], map_hi - map_lo, score_rel, worst[1] or str(files[0]))


def export(
    run_dir: str | Path,
    out: str | Path,
    batch: int = 1,
    images: str | Path | None = None,
    parity_count: int = 8,
    name: str | None = None,
) -> tuple[Path, ParityReport]:
    """Export a training run to a bundle directory.

    Args:
        run_dir: training output folder holding checkpoint.pt (or the checkpoint file itself).
        out: bundle directory to write (created; an existing model.onnx is replaced).
        batch: fixed batch size of the graph input (1,3,H,W) by default.
        images: folder of real images for the parity run (default: the training data).
    Returns:
        (bundle path, parity report). Raises ParityError if the graph disagrees with torch.
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir if run_dir.is_file() else run_dir / "checkpoint.pt"
    model, ckpt = load_checkpoint(ckpt_path)
    size = int(ckpt["args"].get("image_size", 256))
    files = parity_images(ckpt, images, parity_count)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    dummy = torch.zeros(batch, 3, size, size, dtype=torch.uint8)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript and emits opset 18+; for this conv net the TorchScript graph is the cleaner.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            RawPixelGraph(model).eval(),
            (dummy,),
            str(onnx_path),
            opset_version=OPSET,
            input_names=["image"],
            output_names=["anomaly_map", "score"],
            do_constant_folding=True,
            dynamo=False,
        )
    graph = onnx.load(str(onnx_path))
    try:
        onnx.checker.check_model(graph, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise BundleError(f"{onnx_path}: onnx.checker failed: {exc}") from exc

    report = check_parity(model, onnx_path, files, (size, size))
    if not report.ok:
        raise ParityError(
            f"{onnx_path}: ONNX Runtime disagrees with torch: map max abs diff "
            f"{report.map_max_abs:.3g} (limit {MAP_TOL * report.map_range:.3g}), score rel diff "
            f"{report.score_max_rel:.3g} (limit {SCORE_RTOL}); worst image {report.worst_image}"
        )

    # The resolved training config travels with the bundle (provenance), outside the hashed set
    # only in the sense that the manifest records its hash too.
    train_cfg = run_dir / "config.yaml" if run_dir.is_dir() else None
    files_listed = {"model.onnx": None}
    if train_cfg is not None and train_cfg.is_file():
        shutil.copyfile(train_cfg, out / "train_config.yaml")
        files_listed["train_config.yaml"] = None
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
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "parity": {
            "images": report.images,
            "map_max_abs": report.map_max_abs,
            "map_range": report.map_range,
            "score_max_rel": report.score_max_rel,
        },
    }
    # A stale thresholds.yaml fitted on the previous graph is refused by Bundle.thresholds().
    bundle_mod.write_manifest(out, manifest)
    log.info("exported %s (parity: %s images ok)", onnx_path, report.images)
    return out, report
