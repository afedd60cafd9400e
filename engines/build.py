"""(device) Bundle graph -> TensorRT engine in the bundle's engines/ cache, parity-checked.

    engines/<onnx sha12>.<gpu>.trt<version>.<precision>.engine       the serialised engine
    engines/<onnx sha12>.<gpu>.trt<version>.<precision>.engine.json  its sidecar (what it was
                                                                      built from and for, its
                                                                      sha256, I/O, parity)
    engines/<gpu>.trt<version>.timing-cache                          kept per GPU + TRT version

Which graph is parsed and how precision is chosen depends on the TensorRT version and lives in
engines.trt_build.build_plan (8.x/10.x builder flags; 11.x strongly typed), on top of what the
runtime shares in edge.backends.trt_compat (graph source, engine name, sidecar check, I/O). After a build
the engine runs through the edge TensorRT backend on the bundle's sample images and is compared
with ONNX Runtime (CPU) running the bundle's graph of the same precision; an engine that fails is
deleted, never cached.

No torch here, and TensorRT/pycuda are imported only when a build runs: without them the command
fails with what to install.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from edge import bundle as bundle_mod
from edge.atomic import atomic_write
from edge.backends import trt_compat as tc
from edge.errors import BackendError, DataError
from edge.preprocess import list_images
from engines import parity, qcheck
from engines import trt_build as tb

log = logging.getLogger("lineinspect.engines.build")

# Engine vs ONNX Runtime on the same-precision graph: (map tolerance as a fraction of the map's
# range, relative score tolerance). FP32 engines differ only by kernel choice; FP16 and INT8 add
# TensorRT's own fusions and rounding on top of the graph ONNX Runtime runs.
PARITY_TOL = {"fp32": (1e-3, 1e-3), "fp16": (1e-2, 1e-2), "int8": (5e-2, 5e-2)}


class EngineBuildError(BackendError):
    """TensorRT could not parse the graph or build the engine."""


@dataclass
class BuildResult:
    engine: Path
    sidecar: dict
    reused: bool
    parity: parity.ParityReport | None


Runner = Callable[[Any, str, int], Any]  # (bundle, precision, device) -> backend with infer/close


def _trt_runner(bundle: Any, precision: str, device: int) -> Any:
    from edge.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(bundle, precision, device_id=device)


def _ort_runner(bundle: Any, precision: str) -> Any:
    from edge.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(bundle, precision, providers=["CPUExecutionProvider"])


def sample_files(b: bundle_mod.Bundle, images: str | Path | None) -> list[Path]:
    """Parity images: a given folder, else the bundle's samples/ (hash-verified)."""
    if images is not None:
        return list_images(images)
    names = sorted(n for n in b.manifest.files if n.startswith("samples/"))
    if not names:
        raise DataError(
            f"{b.root}: the bundle has no samples/ for the parity run (re-export it, or pass "
            "--images <dir of images>)"
        )
    return [b.verify(n) for n in names]


def build_engine(
    trt: Any,
    src: Path,
    plan: tb.BuildPlan,
    b: bundle_mod.Bundle,
    workspace_bytes: int,
    timing_cache: Path,
) -> tuple[Any, list[tc.TensorSpec], list[str]]:
    """Parse `src` and build a serialised engine. Returns (engine buffer, network I/O, flags).

    Every parser error is logged and raised; every I/O tensor is logged and checked against the
    bundle (static shapes, uint8 in, float32 out). The timing cache is read before and written
    after the build.
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(tb.network_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):
        errors = tb.parser_errors(parser)
        for e in errors:
            log.error("%s: ONNX parser: %s", src.name, e)
        raise EngineBuildError(
            f"{src}: TensorRT's ONNX parser failed with {len(errors)} error(s): "
            + " | ".join(errors)
        )
    io = tb.network_io(trt, network)
    for spec in io:
        log.info("%s: %s", src.name, spec.describe())
    m = b.manifest
    tc.check_io(
        io,
        m.input.name,
        (m.input.batch, 3, *b.image_size),
        (m.outputs.anomaly_map, m.outputs.score),
    )
    config = builder.create_builder_config()
    flags = tb.configure(trt, config, plan, workspace_bytes)
    tb.load_timing_cache(config, timing_cache)
    log.info(
        "building %s engine from %s (TensorRT %s, %s, flags %s, workspace %d MB)",
        plan.precision,
        src.name,
        trt.__version__,
        "strongly typed" if plan.strongly_typed else "weakly typed",
        flags or "none",
        workspace_bytes >> 20,
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{src}: TensorRT failed to build the {plan.precision} engine")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(timing_cache, config.get_timing_cache().serialize())
    return serialized, io, flags


def build(
    bundle_dir: str | Path,
    precision: str,
    *,
    workspace_mb: int = 1024,
    timing_cache: str | Path | None = None,
    images: str | Path | None = None,
    force: bool = False,
    device: int = 0,
    trt: Any = None,
    cuda: Any = None,
    runner: Runner = _trt_runner,
) -> BuildResult:
    """Build (or reuse) the bundle's TensorRT engine for `precision` on this device.

    Args:
        bundle_dir: bundle directory; engines go to its engines/ cache.
        precision: fp32 | fp16 | int8 (fp16/int8 need `engines quantize` first on TensorRT 11,
            int8 on every version).
        workspace_mb: builder workspace memory limit.
        timing_cache: timing cache file (default: engines/<gpu>.trt<version>.timing-cache).
        images: parity images (default: the bundle's samples/).
        force: rebuild even if a valid engine is cached.
        trt, cuda, runner: the tensorrt and pycuda.driver modules and the engine runner; given
            only by tests (default: imported here, and edge's TensorRT backend).
    Raises:
        TensorRTUnavailable (what to install), BundleError (tampered graph, stale engine),
        EngineBuildError (parser/builder), ParityError (engine disagrees with ONNX Runtime).
    """
    if trt is None or cuda is None:
        trt, cuda = tb.require_tensorrt()
    version = tc.parse_version(trt.__version__)
    tc.check_supported(version)
    plan = tb.build_plan(version, precision)
    b = bundle_mod.Bundle(bundle_dir)
    src = b.model_path(plan.source)  # sha256-verified; says to run `engines quantize` if absent
    # Parity reference: ONNX Runtime on the same-precision graph, or (FP16 from the FP32 graph on
    # 8.x/10.x before `engines quantize` ran) on the graph the engine was parsed from.
    ref_precision = (
        precision if bundle_mod.PRECISION_FILES[precision] in b.manifest.files else plan.source
    )
    b.model_path(ref_precision)  # sha256-verified too
    gpu, gpu_name, cc = tc.gpu_identity(cuda, device)
    cache = b.root / tc.ENGINES_DIR
    cache.mkdir(exist_ok=True)
    expect = tc.expect_for(b, precision, version, gpu)
    if not force:
        found = tc.find_engine(cache, expect, version)
        if found is not None:
            log.info("reusing %s (built %s)", found[0].name, found[1].get("built", "?"))
            return BuildResult(found[0], found[1], True, None)
    files = sample_files(b, images)
    tcache = Path(timing_cache) if timing_cache else tb.timing_cache_path(cache, gpu, version)

    t0 = time.perf_counter()
    serialized, io, flags = build_engine(trt, src, plan, b, workspace_mb << 20, tcache)
    engine = cache / tc.engine_name(expect.onnx_sha256, gpu, version, precision)
    atomic_write(engine, serialized)
    side = tc.sidecar_path(engine)
    meta = tb.make_sidecar(
        engine,
        expect,
        gpu_name=gpu_name,
        compute_capability=f"{cc[0]}.{cc[1]}",
        strongly_typed=plan.strongly_typed,
        builder_flags=flags,
        workspace_mb=workspace_mb,
        timing_cache=str(tcache),
        io=[
            {"name": s.name, "shape": list(s.shape), "dtype": s.dtype, "input": s.is_input}
            for s in io
        ],
        bundle=b.manifest.name,
        built=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        build_seconds=round(time.perf_counter() - t0, 1),
        parity=None,
    )
    atomic_write(side, json.dumps(meta, indent=2).encode())
    log.info(
        "wrote %s (%.1f MB, %.0f s)", engine, engine.stat().st_size / 1e6, meta["build_seconds"]
    )

    try:
        report = check_engine(b, precision, ref_precision, device, files, runner)
    except BaseException:
        # An engine that cannot run, or runs wrong, must never be found in the cache.
        engine.unlink(missing_ok=True)
        side.unlink(missing_ok=True)
        raise
    meta["parity"] = {**report.as_dict(), "reference": bundle_mod.PRECISION_FILES[ref_precision]}
    log.info("parity vs ONNX Runtime: %s", report.summary())
    if precision != "fp32":
        try:
            check = decision_check(b, precision, device, files, runner)
        except BaseException:
            engine.unlink(missing_ok=True)
            side.unlink(missing_ok=True)
            raise
        meta["decision_check"] = check.as_dict() if check is not None else None
    atomic_write(side, json.dumps(meta, indent=2).encode())
    return BuildResult(engine, meta, False, report)


def reference_thresholds(b: bundle_mod.Bundle) -> bundle_mod.Thresholds | None:
    """The thresholds a reduced-precision engine is judged against: the bundle's calibrated
    thresholds.yaml, else those `engines quantize` fitted for its own check."""
    th = b.thresholds(required=False)
    if th is not None:
        return th
    rec = b.manifest.quantization.get("decision_check", {}).get("int8") or {}
    if "image_threshold" not in rec:
        return None
    return bundle_mod.Thresholds(
        image_threshold=float(rec["image_threshold"]),
        pixel_threshold=float(rec["pixel_threshold"]),
        min_region_area=int(rec.get("min_region_area", 1)),
    )


def decision_check(
    b: bundle_mod.Bundle, precision: str, device: int, files: list[Path], runner: Runner
) -> qcheck.Check | None:
    """The engine against the FP32 graph (ONNX Runtime) at the decision level, as `engines
    quantize` checks its graphs (engines.qcheck). Raises EngineBuildError with the figures when
    it fails; None (logged) when the bundle has no thresholds to judge by."""
    th = reference_thresholds(b)
    if th is None:
        log.warning(
            "%s engine: no thresholds.yaml and no quantize check in the manifest, so no "
            "decision-level check against FP32 (calibrate the bundle first)",
            precision,
        )
        return None
    size, batch = b.image_size, b.manifest.input.batch
    ref_be = _ort_runner(b, "fp32")
    try:
        ref = qcheck.Reference(files, *qcheck.run_infer(ref_be.infer, files, size, batch), th)
    finally:
        ref_be.close()
    test = runner(b, precision, device)
    try:
        check = ref.compare(
            precision, *qcheck.run_infer(test.infer, files, size, batch), qcheck.Budget()
        )
    finally:
        test.close()
    log.info("decision check vs FP32 on %d images: %s", len(files), check.line())
    if not check.passed:
        raise EngineBuildError(
            f"{b.root}: {precision} engine decides unlike the FP32 graph on {len(files)} "
            f"sample images: {check.line()}; engine deleted"
        )
    return check


def check_engine(
    b: bundle_mod.Bundle,
    precision: str,
    ref_precision: str,
    device: int,
    files: list[Path],
    runner: Runner,
) -> parity.ParityReport:
    """Cached engine (through `runner`) vs ONNX Runtime on the `ref_precision` graph."""
    map_tol, score_rtol = PARITY_TOL[precision]
    ref = _ort_runner(b, ref_precision)
    try:
        test = runner(b, precision, device)
        try:
            report = parity.compare(
                ref.infer,
                test.infer,
                files,
                b.image_size,
                b.manifest.input.batch,
                map_tol,
                score_rtol,
            )
        finally:
            test.close()
    finally:
        ref.close()
    if not report.ok:
        raise parity.ParityError(
            report.failure(f"{precision} engine vs ONNX Runtime ({b.root})") + "; engine deleted"
        )
    return report
