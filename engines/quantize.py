"""FP32 bundle graph -> `model.fp16.onnx` and `model.int8.onnx` (explicit, symmetric Q/DQ).

Both keep the graph's I/O (uint8 image in, float32 anomaly_map and score out) and keep the pre- and
post-processing in FP32 (engines.graph.split): the uint8 Cast, the normalisation, the cosine
discrepancy, the upsampling and the blur. Lowering those buys nothing (they are a few percent of
the FLOPs) and the cosine of two nearly equal vectors is exactly where reduced precision hurts.

INT8 is ONNX Runtime's static quantisation in QDQ format, laid out as TensorRT's explicit
quantisation expects: activations int8 symmetric per tensor (zero point 0), weights int8 symmetric
per output channel, Q/DQ only on the inputs of Conv/Gemm/MatMul (not their outputs: TensorRT
chooses output precisions and fuses Conv + activation itself), biases left in float (TensorRT
quantises them itself). The entry layers that read the normalised image (the "sensitive" layers:
small, but every error there propagates through both networks) stay in float and are listed in
the manifest with every other layer left unquantised.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edge import bundle as bundle_mod
from edge.atomic import atomic_write
from edge.errors import DataError, LineInspectError
from edge.preprocess import list_images, load_batch
from engines import graph, qcheck
from engines import mixed as mixed_mod

log = logging.getLogger("lineinspect.engines.quantize")

FP16_FILE = bundle_mod.PRECISION_FILES["fp16"]
INT8_FILE = bundle_mod.PRECISION_FILES["int8"]
CALIB_METHODS = ("percentile", "minmax", "entropy")
# Accuracy budget against FP32, in AUROC points (issue 4); exceeding it fails `quantize --eval`.
MAX_DROP = {"fp16": 0.1, "int8": 0.5}
MIN_CHECK_IMAGES = 8


class QuantizeError(LineInspectError):
    """A reduced-precision graph could not be written, or loses more accuracy than allowed."""


@dataclass
class QuantReport:
    fp16: Path | None  # None: refused by the decision check
    int8: Path | None
    calib_images: int
    quantized_layers: int
    float_layers: dict[str, str]  # node name -> why it stays in float
    checks: dict[str, qcheck.Check] = field(default_factory=dict)
    eval: dict | None = None
    over_budget: list[str] = field(default_factory=list)


def entry_layers(model: onnx.ModelProto, sp: graph.Split) -> list[str]:
    """Network layers of QUANT_OPS that read a tensor made by pre-processing (or the input)."""
    net = set(sp.network)
    made_by_net = {o for n in model.graph.node if n.name in net for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.name in net and n.op_type in graph.QUANT_OPS:
            data = [i for i in n.input[:1] if i and i not in inits]
            if data and data[0] not in made_by_net:
                out.append(n.name)
    return out


def float_layers(
    model: onnx.ModelProto, sp: graph.Split, entry: list[str], keep_float: list[str]
) -> dict[str, str]:
    """Every Conv/Gemm/MatMul left unquantised, with the reason."""
    ops = {n.name: n.op_type for n in model.graph.node}
    reasons = {}
    for name in sp.kept_float:
        if ops[name] in graph.QUANT_OPS:
            reasons[name] = "keep-float pattern" if _matches(name, keep_float) else "head"
    for name in entry:
        reasons[name] = "entry layer (reads the normalised image)"
    return reasons


def _matches(name: str, patterns: list[str]) -> bool:
    import re

    return any(re.search(p, name) for p in patterns)


class ImageReader:
    """onnxruntime CalibrationDataReader over good images, through edge.preprocess.

    Yields {input_name: (B,3,H,W) uint8}; the last batch is padded with its last image.
    """

    def __init__(self, files: list[Path], input_name: str, size: tuple[int, int], batch: int):
        self._chunks = [files[i : i + batch] for i in range(0, len(files), batch)]
        self._name, self._size, self._batch = input_name, size, batch
        self._i = 0

    def get_next(self) -> dict | None:
        if self._i >= len(self._chunks):
            return None
        x = load_batch(self._chunks[self._i], self._size)
        self._i += 1
        if len(x) < self._batch:
            x = np.concatenate([x, np.repeat(x[-1:], self._batch - len(x), axis=0)])
        return {self._name: x}

    def rewind(self) -> None:
        self._i = 0


def calibration_files(calib: str | Path, count: int) -> list[Path]:
    """Up to `count` images of the folder, spread evenly over its sorted listing."""
    files = list_images(calib)
    if count <= 0:
        raise DataError(f"--calib-count must be positive, got {count}")
    idx = np.linspace(0, len(files) - 1, num=min(count, len(files))).round().astype(int)
    return [files[i] for i in sorted(set(idx))]


def check_qdq(model: onnx.ModelProto) -> dict:
    """Verify the Q/DQ layout TensorRT needs: int8, zero point 0 everywhere; count the parts.

    Raises QuantizeError naming the first offending node.
    """
    inits = {i.name: i for i in model.graph.initializer}
    q = dq = per_channel = 0
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        q += n.op_type == "QuantizeLinear"
        dq += n.op_type == "DequantizeLinear"
        if len(n.input) < 3 or n.input[2] not in inits:
            raise QuantizeError(f"{n.name}: Q/DQ node without a constant zero point")
        zp = onnx.numpy_helper.to_array(inits[n.input[2]])
        if zp.dtype != np.int8 or np.any(zp != 0):
            raise QuantizeError(f"{n.name}: zero point must be int8 0 (symmetric), got {zp.dtype}")
        scale = onnx.numpy_helper.to_array(inits[n.input[1]])
        per_channel += scale.size > 1
    if not q:
        raise QuantizeError("the INT8 graph has no QuantizeLinear node (nothing was quantised)")
    return {"quantize_nodes": q, "dequantize_nodes": dq, "per_channel_dequantize": per_channel}


def check_files(calib: str | Path, used: list[Path], check: str | Path | None) -> list[Path]:
    """Held-out good images for the decision check: `check`'s images, else the calibration
    folder's images that calibration did not use. Raises DataError when fewer than 8."""
    if check is not None:
        files = list_images(check)
    else:
        taken = {p.resolve() for p in used}
        files = [p for p in list_images(calib) if p.resolve() not in taken]
    if len(files) < MIN_CHECK_IMAGES:
        src = check if check is not None else f"{calib} (beside the {len(used)} calibration images)"
        raise DataError(
            f"{src}: {len(files)} held-out good images for the FP32 decision check, need "
            f">= {MIN_CHECK_IMAGES}: add images, lower --calib-count or pass --check <folder>"
        )
    return files


def quantize(
    bundle_dir: str | Path,
    calib: str | Path,
    eval_data: str | Path | None = None,
    *,
    calib_count: int = 32,
    method: str = "percentile",
    keep_float: list[str] | None = None,
    backend: str = "onnxruntime",
    check: str | Path | None = None,
    budget: qcheck.Budget | None = None,
    allow_over_budget: bool = False,
    mixed: bool = True,
    target_frr: float = 0.02,
) -> QuantReport:
    """Write model.fp16.onnx and model.int8.onnx into the bundle and record them in its manifest,
    each only after it decided like FP32 on held-out good images (engines.qcheck).

    Args:
        bundle_dir: bundle written by `engines export` (its model.onnx is verified first).
        calib: folder of good images for INT8 calibration (not the evaluation images).
        eval_data: MVTec-layout category; when given, image/pixel AUROC of the three precisions
            through `backend` are written to the manifest, and a drop beyond MAX_DROP raises.
        calib_count: at most this many calibration images (spread over the folder).
        method: INT8 activation range calibration: percentile (99.999%), minmax or entropy.
        keep_float: regexes of node names to keep in float in both graphs, on top of the head.
        check: folder of held-out good images for the decision check (default: the images of
            `calib` that calibration did not use).
        budget: what a precision may change against FP32 (qcheck.Budget defaults).
        allow_over_budget: write a graph that fails the check anyway (recorded as such).
        mixed: when INT8 fails the check, keep its most sensitive layers in FP32, doubling
            their number, until it passes (or every layer is float).
        target_frr: the false-reject target the reference thresholds are fitted at.
    Raises:
        QuantizeError with the figures when a graph fails the check and allow_over_budget is
        False; nothing that failed is named in the manifest (FP16 that passed still is).
    """
    if method not in CALIB_METHODS:
        raise QuantizeError(f"unknown calibration method {method!r}, expected {CALIB_METHODS}")
    budget = budget or qcheck.Budget()
    keep_float = list(keep_float or [])
    b = bundle_mod.Bundle(bundle_dir)
    src = b.model_path("fp32")  # refuses a tampered model.onnx
    model = onnx.load(str(src))
    sp = graph.split(model, keep_float)
    entry = entry_layers(model, sp)
    m = b.manifest
    files = calibration_files(calib, calib_count)
    held = check_files(calib, files, check)
    batch = m.input.batch
    ref = qcheck.Reference.fitted(
        held, *qcheck.run_graph(src, held, b.image_size, batch), target_frr
    )

    t0 = time.perf_counter()
    fp16 = graph.to_fp16(model, sp.network)
    _same_io(model, fp16, FP16_FILE)
    fp16_tmp = b.root / (FP16_FILE + ".tmp")
    onnx.save(fp16, str(fp16_tmp))
    fp16_check = ref.compare("fp16", *qcheck.run_graph(fp16_tmp, held, b.image_size, batch), budget)
    log.info("%s", fp16_check.line())

    reader = ImageReader(files, m.input.name, b.image_size, batch)
    int8_tmp = b.root / (INT8_FILE + ".tmp")
    quantizable = [
        n.name
        for n in model.graph.node
        if n.op_type in graph.QUANT_OPS and n.name in set(sp.network) - set(entry)
    ]
    _quantize_int8(model, sp, entry, [], reader, method, int8_tmp)
    c = ref.compare("int8", *qcheck.run_graph(int8_tmp, held, b.image_size, batch), budget)
    log.info("int8, every layer quantised: %s", c.line())
    search: list[dict] = [{"float_layers": 0, **c.as_dict()}]
    extra_float: list[str] = []
    if not c.passed and mixed and quantizable:
        probe_files = held[: max(batch, 8)]
        probe = qcheck.Reference(
            probe_files, ref.maps[: len(probe_files)], ref.scores[: len(probe_files)], ref.th
        )
        g, extra_float, tries = mixed_mod.search(
            onnx.load(str(int8_tmp)),
            model,
            quantizable,
            ref,
            probe,
            b.image_size,
            batch,
            budget,
            log,
        )
        onnx.save(g, str(int8_tmp))
        search += tries
        c = ref.compare("int8", *qcheck.run_graph(int8_tmp, held, b.image_size, batch), budget)
    int8_check = c
    if len(extra_float) >= len(quantizable) and quantizable:
        int8_check.failures.append("no layer left in INT8")

    floats = float_layers(model, sp, entry, keep_float)
    floats.update({n: "sensitive (engines.quantize mixed-precision search)" for n in extra_float})
    int8 = onnx.load(str(int8_tmp))
    onnx.checker.check_model(int8)
    _same_io(model, int8, INT8_FILE)
    # every layer back in float: no Q/DQ left to check (the int8 check says "no layer left")
    qdq = check_qdq(int8) if len(quantizable) > len(extra_float) else {"quantize_nodes": 0}
    quantized = len(quantizable) - len(extra_float)
    log.info(
        "int8: %d layers INT8, calibrated on %d images, %.0f s",
        quantized,
        len(files),
        time.perf_counter() - t0,
    )

    import onnxruntime

    ok = {
        "fp16": fp16_check.passed or allow_over_budget,
        "int8": int8_check.passed or allow_over_budget,
    }
    for name, tmp, p in ((FP16_FILE, fp16_tmp, "fp16"), (INT8_FILE, int8_tmp, "int8")):
        m.files.pop(name, None)
        if ok[p]:
            atomic_write(b.root / name, tmp.read_bytes())  # a reader sees the old or the new
            m.files[name] = bundle_mod.FileEntry("", 0)
        else:
            (b.root / name).unlink(missing_ok=True)  # a graph of the previous model.onnx
        tmp.unlink()
    decision_check = {
        "images": len(held),
        "dir": str(Path(check).resolve()) if check is not None else None,
        "target_frr": target_frr,
        "budget": asdict(budget),
        "fp16": fp16_check.as_dict(),
        "int8": int8_check.as_dict(),
        "int8_search": search,
        "written_over_budget": [
            p
            for p in ("fp16", "int8")
            if ok[p] and not {"fp16": fp16_check, "int8": int8_check}[p].passed
        ],
    }
    m.quantization = {
        "source_sha256": m.files["model.onnx"].sha256,
        "onnxruntime": onnxruntime.__version__,
        "onnx": str(onnx.__version__),
        "keep_float_patterns": keep_float,
        "decision_check": decision_check,
        "fp16": {
            "file": FP16_FILE if ok["fp16"] else None,
            "network_nodes_fp16": len(sp.network),
            **sp.summary(model),
        },
        "int8": {
            "file": INT8_FILE if ok["int8"] else None,
            "format": "QDQ",
            "activations": "int8, symmetric, per tensor",
            "weights": "int8, symmetric, per output channel",
            "biases": "float",
            "quantized_ops": list(graph.QUANT_OPS),
            "quantized_layers": quantized,
            "calibration": {
                "method": method,
                "images": len(files),
                "dir": str(Path(calib).resolve()),
            },
            **qdq,
            "float_layers": floats,  # the sensitive layers kept in float, and why
        },
    }
    bundle_mod.write_manifest(b.root, m)
    report = QuantReport(
        b.root / FP16_FILE if ok["fp16"] else None,
        b.root / INT8_FILE if ok["int8"] else None,
        len(files),
        quantized,
        floats,
        checks={"fp16": fp16_check, "int8": int8_check},
    )
    refused = [c for p, c in report.checks.items() if not ok[p]]
    if refused:
        raise QuantizeError(
            "refused to write "
            + " and ".join(c.precision.upper() for c in refused)
            + f" (decision check on {len(held)} held-out good images): "
            + " | ".join(c.line() for c in refused)
            + "; --allow-over-budget writes it anyway"
        )
    if eval_data is not None:
        report.eval, report.over_budget = evaluate_precisions(b.root, eval_data, backend)
        m = bundle_mod.Bundle(b.root).manifest
        m.quantization["eval"] = report.eval
        bundle_mod.write_manifest(b.root, m)
    return report


def _quantize_int8(model, sp, entry, extra_float, reader, method, out: Path) -> None:
    """ONNX Runtime static Q/DQ quantisation laid out for TensorRT (see the module docstring)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    reader.rewind()
    calib_method = {
        "percentile": CalibrationMethod.Percentile,
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
    }[method]
    with _quiet_root_logger():
        quantize_static(
            graph.copy(model),  # names as split() saw them (it names unnamed nodes)
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=list(graph.QUANT_OPS),
            nodes_to_exclude=[*sp.kept_float, *entry, *extra_float],
            calibrate_method=calib_method,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                # TensorRT takes float biases and folds them itself; int32 bias DQ it rejects.
                "QuantizeBias": False,
                # Q/DQ on the inputs of weighted layers only, as TensorRT recommends: it picks
                # the output precision itself and fuses Conv + activation.
                "OpTypesToExcludeOutputQuantization": list(graph.QUANT_OPS),
            },
            calibration_providers=["CPUExecutionProvider"],
        )


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime.quantization logs every scale tweak on the root logger at INFO and prints its
    calibration progress; both go to this module's debug log instead."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        root.setLevel(level)
        for line in printed.getvalue().splitlines():
            log.debug("onnxruntime: %s", line)


def _same_io(ref: onnx.ModelProto, new: onnx.ModelProto, name: str) -> None:
    want, got = graph.io_types(ref), graph.io_types(new)
    if want != got:
        raise QuantizeError(f"{name}: graph I/O changed from {want} to {got}")


def evaluate_precisions(
    bundle_dir: Path, data: str | Path, backend: str = "onnxruntime"
) -> tuple[dict, list[str]]:
    """AUROC of fp32/fp16/int8 via calibration.evaluate; returns (table, over-budget lines).

    The one place engines uses calibration, and only for `--eval`: scoring an MVTec test set and
    its AUROC/PRO is calibration's evaluation itself, so it is called, not copied. Imported here,
    not at the top, so that engines (and `engines build` on the device) load without it.
    """
    try:
        from calibration.evaluate import evaluate
    except ImportError as exc:
        raise QuantizeError(
            f"--eval needs the calibration package (a workstation install): {exc}"
        ) from exc

    rows: dict = {"data": str(Path(data).resolve()), "backend": backend, "max_drop": MAX_DROP}
    for p in ("fp32", "fp16", "int8"):
        r = evaluate(bundle_dir, data, p, backend, progress=False)
        r = r.summary
        rows[p] = {
            k: (None if r.get(k) is None else float(r[k]))
            for k in ("image_auroc", "pixel_auroc", "pro")
        }
        rows[p]["seconds_per_image"] = float(r.get("seconds_per_image", 0.0))
        rows["images"] = int(r["images"])
    over = []
    for p in ("fp16", "int8"):
        for k in ("image_auroc", "pixel_auroc"):
            a, b = rows["fp32"][k], rows[p][k]
            if a is None or b is None:
                continue
            drop = 100.0 * (a - b)
            rows[p][f"{k}_drop_points"] = drop
            if drop > MAX_DROP[p] + 1e-9:
                over.append(f"{p} {k} drops {drop:.2f} points (budget {MAX_DROP[p]})")
    return rows, over


def format_table(ev: dict) -> str:
    """The eval dict as a fixed-width table (AUROC in %)."""

    def pct(v):
        return "   n/a" if v is None else f"{100 * v:6.2f}"

    lines = [
        f"{'precision':<10}{'image AUROC':>12}{'Δ':>7}{'pixel AUROC':>13}{'Δ':>7}{'PRO':>8}",
    ]
    for p in ("fp32", "fp16", "int8"):
        r = ev[p]
        di = r.get("image_auroc_drop_points")
        dp = r.get("pixel_auroc_drop_points")
        lines.append(
            f"{p:<10}{pct(r['image_auroc']):>12}{'' if di is None else f'{0.0 - round(di, 2):+.2f}':>7}"
            f"{pct(r['pixel_auroc']):>13}{'' if dp is None else f'{0.0 - round(dp, 2):+.2f}':>7}"
            f"{pct(r.get('pro')):>8}"
        )
    return "\n".join(lines)
