"""engines.build without a GPU: a fake TensorRT of each version, the real bundle, cache and parity.

The engine "runner" is ONNX Runtime on the graph the fake engine was built from, so the parity
step, the cache and the sidecar are the real code paths; only TensorRT itself is a model.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys

import numpy as np
import pytest

from edge.backends import trt_compat as tc
from edge.backends.onnxruntime import OnnxRuntimeBackend
from edge.bundle import MANIFEST, Bundle, FileEntry, typedconfig, write_manifest
from edge.errors import BackendError, BundleError, DataError
from engines import build as build_mod
from engines.__main__ import main
from engines.parity import ParityError
from tests.fakebundle import defect_frame, good_frame, make_bundle
from tests.trtfake import make_cuda, make_trt

SIZE = (32, 48)


@pytest.fixture
def bundle_dir(tmp_path):
    """Fake static-batch bundle with fp16/int8 graphs (copies) and two sample images."""
    import cv2

    root = make_bundle(tmp_path / "b", SIZE, dynamic=False)
    shutil.copyfile(root / "model.onnx", root / "model.fp16.onnx")
    shutil.copyfile(root / "model.onnx", root / "model.int8.onnx")
    (root / "samples").mkdir()
    cv2.imwrite(str(root / "samples" / "000.png"), good_frame(SIZE))
    cv2.imwrite(str(root / "samples" / "001.png"), defect_frame(SIZE, (4, 4, 10, 8)))
    m = Bundle(root).manifest
    for name in ("model.fp16.onnx", "model.int8.onnx", "samples/000.png", "samples/001.png"):
        m.files[name] = FileEntry("", 0)
    write_manifest(root, m)
    return root


class OrtRunner:
    """Stands in for the TensorRT backend: checks the cached engine like it does, then runs the
    graph the engine was built from in ONNX Runtime, optionally perturbing the scores."""

    def __init__(self, trt, cuda, score_offset=0.0):
        self.trt, self.cuda, self.offset, self.loaded = trt, cuda, score_offset, []

    def __call__(self, bundle, precision, device):
        version = tc.parse_version(self.trt.__version__)
        gpu = tc.gpu_identity(self.cuda, device)[0]
        found = tc.find_engine(
            bundle.root / "engines", tc.expect_for(bundle, precision, version, gpu), version
        )
        assert found is not None, "parity must run on the engine just written to the cache"
        self.loaded.append(found[0])
        source = tc.engine_source(version, precision)
        be = OnnxRuntimeBackend(bundle, source, providers=["CPUExecutionProvider"])
        if self.offset:
            infer = be.infer
            be.infer = lambda x: (lambda m, s: (m, s + self.offset))(*infer(x))
        return be


def _build(root, precision, trt, cuda, **kw):
    kw.setdefault("runner", OrtRunner(trt, cuda))
    return build_mod.build(root, precision, trt=trt, cuda=cuda, **kw)


@pytest.mark.parametrize(
    "version, precision, graph, flags, net_flags",
    [
        ("8.6.1", "fp16", "model.onnx", ["FP16"], 1),
        ("8.6.1", "int8", "model.int8.onnx", ["INT8", "FP16"], 1),
        ("10.3.0.30", "fp16", "model.onnx", ["FP16"], 0),
        ("10.3.0.30", "int8", "model.int8.onnx", ["INT8", "FP16"], 0),
        ("11.4.0.106", "fp16", "model.fp16.onnx", [], 2),
        ("11.4.0.106", "int8", "model.int8.onnx", [], 2),
        ("11.4.0.106", "fp32", "model.onnx", [], 2),
    ],
)
def test_build_per_version(bundle_dir, version, precision, graph, flags, net_flags, caplog):
    trt, cuda = make_trt(version), make_cuda("Orin", (8, 7))
    caplog.set_level(logging.INFO)
    res = _build(bundle_dir, precision, trt, cuda, workspace_mb=64)
    b = Bundle(bundle_dir)
    sha = b.manifest.files[graph].sha256
    assert res.engine.name == f"{sha[:12]}.orin-sm87.trt{version}.{precision}.engine"
    assert res.engine.parent == bundle_dir / "engines" and not res.reused
    assert trt.calls["network_flags"] == [net_flags]
    assert trt.calls["set_flags"] == flags
    assert trt.calls["pool"] == [(trt.MemoryPoolType.WORKSPACE, 64 << 20)]
    # the fake engine carries the bytes of the graph it was built from
    assert res.engine.read_bytes().endswith((bundle_dir / graph).read_bytes())
    side = json.loads(tc.sidecar_path(res.engine).read_text())
    assert side["onnx_file"] == graph and side["onnx_sha256"] == sha
    assert side["trt_version"] == version and side["gpu"] == "orin-sm87"
    assert side["strongly_typed"] == version.startswith("11")
    assert side["parity"]["images"] == 2 and res.parity.ok
    assert [i["name"] for i in side["io"]] == ["image", "anomaly_map", "score"]
    # every I/O tensor is logged with shape and dtype
    logged = caplog.text
    assert "input  image uint8 (1, 3, 32, 48)" in logged
    assert (
        "output anomaly_map float32 (1, 1, 32, 48)" in logged
        and "output score float32 (1,)" in logged
    )


def test_cache_reuse_force_and_timing_cache(bundle_dir):
    trt, cuda = make_trt("10.3.0.30"), make_cuda()
    first = _build(bundle_dir, "fp16", trt, cuda)
    tcache = bundle_dir / "engines" / "orin-sm87.trt10.3.0.30.timing-cache"
    assert tcache.read_bytes() == b"+" and trt.calls["builds"] == 1
    again = _build(bundle_dir, "fp16", trt, cuda)
    assert again.reused and again.engine == first.engine and trt.calls["builds"] == 1
    forced = _build(bundle_dir, "fp16", trt, cuda, force=True)
    assert not forced.reused and trt.calls["builds"] == 2
    assert trt.calls["timing_cache_in"] == b"+" and tcache.read_bytes() == b"++"
    # another GPU or TensorRT version gets its own engine, next to the first
    other = _build(bundle_dir, "fp16", make_trt("10.4.0"), make_cuda("NVIDIA A100", (8, 0)))
    assert other.engine != first.engine and first.engine.is_file()
    explicit = bundle_dir / "my.cache"
    _build(bundle_dir, "int8", trt, cuda, timing_cache=explicit)
    assert explicit.is_file()


def test_stale_engine_is_an_error_not_a_silent_rebuild(bundle_dir):
    trt, cuda = make_trt("10.3.0.30"), make_cuda()
    res = _build(bundle_dir, "fp16", trt, cuda)
    data = bytearray(res.engine.read_bytes())
    data[0] ^= 1
    res.engine.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        _build(bundle_dir, "fp16", trt, cuda)
    assert _build(bundle_dir, "fp16", trt, cuda, force=True).parity.ok


def test_parity_failure_deletes_engine_and_names_worst_image(bundle_dir):
    trt, cuda = make_trt("10.3.0.30"), make_cuda()
    runner = OrtRunner(trt, cuda, score_offset=0.5)
    with pytest.raises(ParityError) as e:
        _build(bundle_dir, "fp16", trt, cuda, runner=runner)
    msg = str(e.value)
    assert "worst image" in msg and "samples/00" in msg and "engine deleted" in msg
    assert runner.loaded and not runner.loaded[0].exists()
    assert not tc.sidecar_path(runner.loaded[0]).exists()


def test_parser_errors_logged_and_raised(bundle_dir, caplog):
    errs = [{"desc": "Unsupported op Foo", "node": 3}, {"desc": "weights missing", "node": 9}]
    trt = make_trt("10.3.0.30", parse_errors=errs)
    with pytest.raises(build_mod.EngineBuildError) as e:
        _build(bundle_dir, "fp16", trt, make_cuda())
    assert "2 error(s)" in str(e.value) and "Unsupported op Foo" in str(e.value)
    assert "weights missing" in caplog.text and "Unsupported op Foo" in caplog.text
    assert not list((bundle_dir / "engines").glob("*.engine"))


def test_builder_failure(bundle_dir):
    with pytest.raises(build_mod.EngineBuildError, match="failed to build the fp16 engine"):
        _build(bundle_dir, "fp16", make_trt("10.3.0.30", build_fails=True), make_cuda())


def test_dynamic_graph_refused(tmp_path):
    import cv2

    root = make_bundle(tmp_path / "dyn", SIZE, dynamic=True)
    cv2.imwrite(str(tmp_path / "x.png"), good_frame(SIZE))
    with pytest.raises(BackendError, match=r"\(-1, 3, 32, 48\)"):
        _build(root, "fp32", make_trt("10.3.0.30"), make_cuda(), images=str(tmp_path))


def test_missing_quantized_graph_says_run_quantize(tmp_path):
    root = make_bundle(tmp_path / "b", SIZE, dynamic=False)
    with pytest.raises(BundleError, match="run `engines quantize`"):
        _build(root, "int8", make_trt("10.3.0.30"), make_cuda())
    with pytest.raises(BundleError, match="run `engines quantize`"):
        _build(root, "fp16", make_trt("11.4.0"), make_cuda())  # strongly typed needs the graph
    with pytest.raises(DataError, match="no samples/"):
        _build(root, "fp32", make_trt("10.3.0.30"), make_cuda())


def test_tampered_graph_refused_before_building(bundle_dir):
    m = typedconfig.load(type(Bundle(bundle_dir).manifest), bundle_dir / MANIFEST)
    want = m.files["model.onnx"].sha256
    data = bytearray((bundle_dir / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte changed
    (bundle_dir / "model.onnx").write_bytes(bytes(data))
    trt = make_trt("10.3.0.30")
    with pytest.raises(BundleError) as e:
        _build(bundle_dir, "fp16", trt, make_cuda())
    msg = str(e.value)
    assert str(bundle_dir / "model.onnx") in msg and want in msg and "file has" in msg
    assert trt.calls["builds"] == 0


def test_cli_without_tensorrt_exits_2_with_install_hint(bundle_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["build", str(bundle_dir), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: TensorRT is not available") and "pip install" in err


def test_build_module_imports_no_torch():
    import subprocess

    code = (
        "import sys, engines.__main__, engines.build, engines.trt_build, edge.backends.trt_compat; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'train')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fp16_before_quantize_checks_against_fp32_graph(tmp_path):
    import cv2

    root = make_bundle(tmp_path / "b", SIZE, dynamic=False)
    cv2.imwrite(str(tmp_path / "x.png"), defect_frame(SIZE, (4, 4, 10, 8)))
    res = _build(root, "fp16", make_trt("10.3.0.30"), make_cuda(), images=str(tmp_path))
    assert res.sidecar["parity"]["reference"] == "model.onnx" and res.parity.ok


def test_parity_report_numbers(bundle_dir):
    res = _build(bundle_dir, "fp32", make_trt("10.3.0.30"), make_cuda())
    assert res.parity.map_max_abs == 0.0 and res.parity.score_max_rel == 0.0
    assert np.isclose(res.parity.map_range, 1.0, atol=0.01)  # grey 0 .. black patch 1


def _scaled_score_graph(src, dst, gain):
    """The same graph with its score multiplied by `gain`: a reduced-precision graph that
    matches its own engine (parity passes) but decides unlike FP32."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(src))
    for n in m.graph.node:
        n.output[:] = ["score_raw" if o == "score" else o for o in n.output]
    m.graph.initializer.append(helper.make_tensor("gain", TensorProto.FLOAT, [], [gain]))
    m.graph.node.append(helper.make_node("Mul", ["score_raw", "gain"], ["score"]))
    onnx.save(m, str(dst))


@pytest.mark.parametrize("gain, passes", [(1.0, True), (4.0, False)])
def test_reduced_precision_engine_checked_against_fp32_decisions(bundle_dir, gain, passes):
    _scaled_score_graph(bundle_dir / "model.onnx", bundle_dir / "model.int8.onnx", gain)
    m = Bundle(bundle_dir).manifest
    m.files["model.int8.onnx"] = FileEntry("", 0)
    write_manifest(bundle_dir, m)
    trt, cuda = make_trt("10.3.0.30"), make_cuda()
    runner = OrtRunner(trt, cuda)
    if passes:
        res = _build(bundle_dir, "int8", trt, cuda, runner=runner)
        check = res.sidecar["decision_check"]
        assert check["passed"] and check["images"] == 2 and check["score_error"] == 0.0
        side = json.loads(tc.sidecar_path(res.engine).read_text())
        assert side["decision_check"]["passed"]
        return
    with pytest.raises(build_mod.EngineBuildError) as e:
        _build(bundle_dir, "int8", trt, cuda, runner=runner)
    msg = str(e.value)
    assert "decides unlike the FP32 graph" in msg and "OVER BUDGET" in msg and "deleted" in msg
    assert runner.loaded and not any(p.exists() for p in runner.loaded)  # never cached
    assert not list((bundle_dir / "engines").glob("*.engine"))
