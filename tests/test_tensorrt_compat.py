"""Every TensorRT version decision, naming and sidecar check, with fakes: the runtime's
(edge.backends.trt_compat, `tc`) and the builder's (engines.trt_build, `tb`).

No GPU or TensorRT needed: tests/trtfake.py models the documented API of each version.
"""

from __future__ import annotations

import json
import sys

import pytest

from edge.backends import trt_compat as tc
from edge.errors import BackendError, BundleError
from engines import trt_build as tb
from tests.trtfake import DataType, FakeContext, FakeEngine, make_cuda, make_trt

V85, V86, V10, V11 = (tc.parse_version(v) for v in ("8.5.2.2", "8.6.1", "10.3.0.30", "11.4.0.106"))


def test_parse_version():
    v = tc.parse_version("10.3.0.30")
    assert (v.major, v.minor, v.patch) == (10, 3, 0) and str(v) == "10.3.0.30"
    assert tc.parse_version("8.6").patch == 0
    assert V86 < V10 < V11
    with pytest.raises(BackendError, match="cannot parse"):
        tc.parse_version("ten")


def test_supported_versions():
    for v in (V85, V86, V10, V11):
        tc.check_supported(v)
    with pytest.raises(BackendError, match="too old: need 8.5"):
        tc.check_supported(tc.parse_version("8.4.1"))


@pytest.mark.parametrize(
    "version, precision, source, strong, explicit, flags",
    [
        (V85, "fp32", "fp32", False, True, ()),
        (V86, "fp16", "fp32", False, True, ("FP16",)),
        (V86, "int8", "int8", False, True, ("INT8", "FP16")),
        (V10, "fp32", "fp32", False, False, ()),
        (V10, "fp16", "fp32", False, False, ("FP16",)),
        (V10, "int8", "int8", False, False, ("INT8", "FP16")),
        (V11, "fp32", "fp32", True, False, ()),
        (V11, "fp16", "fp16", True, False, ()),
        (V11, "int8", "int8", True, False, ()),
    ],
)
def test_build_plan(version, precision, source, strong, explicit, flags):
    p = tb.build_plan(version, precision)
    assert (p.source, p.strongly_typed, p.explicit_batch, p.flags) == (
        source,
        strong,
        explicit,
        flags,
    )
    assert p.clear_flags == (("TF32",) if precision == "fp32" else ())


def test_engine_source_is_the_plans_source():
    # The runtime finds an engine by the graph it came from without knowing the build plan.
    for v in (V85, V86, V10, V11):
        for p in tc.PRECISIONS:
            assert tc.engine_source(v, p) == tb.build_plan(v, p).source
    with pytest.raises(BackendError, match="unknown precision"):
        tc.engine_source(V11, "int4")


def test_build_plan_unknown_precision():
    with pytest.raises(BackendError, match="unknown precision 'int4'"):
        tb.build_plan(V10, "int4")


def test_network_flags_per_version():
    assert tb.network_flags(make_trt("8.6.1"), tb.build_plan(V86, "fp16")) == 1 << 0
    assert tb.network_flags(make_trt("10.3.0"), tb.build_plan(V10, "fp16")) == 0
    assert tb.network_flags(make_trt("11.4.0"), tb.build_plan(V11, "int8")) == 1 << 1
    # A strongly typed plan on a TensorRT without the flag is an error, not a weak build.
    with pytest.raises(BackendError, match="STRONGLY_TYPED"):
        tb.network_flags(make_trt("8.6.1"), tb.build_plan(V11, "fp16"))


def test_configure_sets_workspace_and_flags():
    trt = make_trt("10.3.0")
    cfg = trt.Builder(None).create_builder_config()
    assert tb.configure(trt, cfg, tb.build_plan(V10, "int8"), 256 << 20) == ["INT8", "FP16"]
    assert trt.calls["pool"] == [(trt.MemoryPoolType.WORKSPACE, 256 << 20)]
    assert cfg.flags == {"INT8", "FP16"}
    cfg = trt.Builder(None).create_builder_config()
    cfg.flags.add("TF32")  # on by default in real TensorRT
    assert tb.configure(trt, cfg, tb.build_plan(V10, "fp32"), 1 << 20) == []
    assert "TF32" not in cfg.flags and "TF32" in trt.calls["cleared"]
    with pytest.raises(BackendError, match="workspace must be positive"):
        tb.configure(trt, cfg, tb.build_plan(V10, "fp32"), 0)


def test_configure_refuses_precision_flags_trt11_lacks():
    trt = make_trt("11.4.0")
    cfg = trt.Builder(None).create_builder_config()
    assert tb.configure(trt, cfg, tb.build_plan(V11, "fp16"), 1 << 20) == []
    assert trt.calls["set_flags"] == []  # strongly typed: no precision flags at all
    with pytest.raises(BackendError, match="no BuilderFlag.FP16"):
        tb.configure(trt, cfg, tb.build_plan(V10, "fp16"), 1 << 20)


def test_timing_cache_read_and_missing(tmp_path):
    trt = make_trt("10.3.0")
    cfg = trt.Builder(None).create_builder_config()
    tb.load_timing_cache(cfg, tmp_path / "absent.cache")
    assert trt.calls["timing_cache_in"] == b"" and trt.calls["ignore_mismatch"] is False
    (tmp_path / "t.cache").write_bytes(b"abc")
    tb.load_timing_cache(cfg, tmp_path / "t.cache")
    assert trt.calls["timing_cache_in"] == b"abc"
    cfg.set_timing_cache = lambda cache, ignore_mismatch: False  # another GPU's cache
    with pytest.raises(BackendError, match="does not fit this GPU/TensorRT"):
        tb.load_timing_cache(cfg, tmp_path / "t.cache")
    cfg.create_timing_cache = lambda data: None
    with pytest.raises(BackendError, match="could not read the timing cache"):
        tb.load_timing_cache(cfg, tmp_path / "t.cache")


@pytest.mark.parametrize("version", ["8.6.1", "10.3.0"])
def test_parser_errors_every_one_formatted(version):
    errs = [
        {
            "desc": "Unsupported op Foo",
            "node": 3,
            "code": 8,
            "node_name": "/m/Foo",
            "node_operator": "Foo",
        },
        {"desc": "bad weights", "node": 7, "code": 2},
    ]
    trt = make_trt(version, parse_errors=errs)
    parser = trt.OnnxParser(None, None)
    lines = tb.parser_errors(parser)
    assert len(lines) == 2
    assert (
        lines[0].startswith("node 3") and "code 8" in lines[0] and "Unsupported op Foo" in lines[0]
    )
    assert ("name /m/Foo" in lines[0] and "operator Foo" in lines[0]) == version.startswith("10")
    assert "bad weights" in lines[1] and "node 7" in lines[1]


def test_network_io_and_check_io():
    trt = make_trt("10.3.0")
    net = trt.Builder(None).create_network(0)
    net.inputs = [_t(trt, "image", (1, 3, 32, 48), DataType.UINT8)]
    net.outputs = [
        _t(trt, "anomaly_map", (1, 1, 32, 48), DataType.FLOAT),
        _t(trt, "score", (1,), DataType.FLOAT),
    ]
    specs = tb.network_io(trt, net)
    assert [s.describe() for s in specs] == [
        "input  image uint8 (1, 3, 32, 48)",
        "output anomaly_map float32 (1, 1, 32, 48)",
        "output score float32 (1,)",
    ]
    tc.check_io(specs, "image", (1, 3, 32, 48), ("anomaly_map", "score"))
    # dynamic batch, wrong dtype, wrong name: every difference is listed
    bad = [
        tc.TensorSpec("image", (-1, 3, 32, 48), "uint8", True),
        tc.TensorSpec("anomaly_map", (1, 1, 32, 48), "float16", False),
        tc.TensorSpec("image_score", (1,), "float32", False),
    ]
    with pytest.raises(BackendError) as e:
        tc.check_io(bad, "image", (1, 3, 32, 48), ("anomaly_map", "score"))
    msg = str(e.value)
    assert "(-1, 3, 32, 48)" in msg and "float16" in msg
    assert "missing output score" in msg and "unexpected output image_score" in msg


def _t(trt, name, shape, dtype):
    t = type("T", (), {})()
    t.name, t.shape, t.dtype = name, shape, dtype
    return t


def test_io_api_per_version():
    assert tc.io_api(V85) == "bindings" and tc.io_api(V86) == "bindings"
    assert tc.io_api(V10) == "tensors" and tc.io_api(V11) == "tensors"


SPECS = [
    ("image", (1, 3, 8, 8), DataType.UINT8, True),
    ("anomaly_map", (1, 1, 8, 8), DataType.FLOAT, False),
    ("score", (1,), DataType.FLOAT, False),
]


@pytest.mark.parametrize("api", ["tensors", "bindings"])
def test_engine_io_bind_execute(api):
    trt = make_trt("10.3.0" if api == "tensors" else "8.6.1")
    specs = tc.engine_io(trt, FakeEngine(SPECS, api), api)
    assert [(s.name, s.shape, s.dtype, s.is_input) for s in specs] == [
        ("image", (1, 3, 8, 8), "uint8", True),
        ("anomaly_map", (1, 1, 8, 8), "float32", False),
        ("score", (1,), "float32", False),
    ]
    ctx = FakeContext()
    addrs = {"score": 300, "image": 100, "anomaly_map": 200}
    bindings = tc.bind(ctx, api, specs, addrs)
    tc.execute(ctx, api, bindings, stream_handle=42)
    if api == "tensors":
        assert ctx.addresses == addrs and bindings == []
        assert ctx.calls == [("v3", 42)]
    else:
        assert ctx.addresses == {} and bindings == [100, 200, 300]  # binding index order
        assert ctx.calls == [("v2", [100, 200, 300], 42)]


def test_bind_and_execute_errors():
    specs = tc.engine_io(make_trt("10.3.0"), FakeEngine(SPECS, "tensors"), "tensors")
    with pytest.raises(BackendError, match=r"no device buffer for TensorRT tensors \['score'\]"):
        tc.bind(FakeContext(), "tensors", specs, {"image": 1, "anomaly_map": 2})
    with pytest.raises(BackendError, match="refused the address of tensor image"):
        tc.bind(FakeContext(ok=False), "tensors", specs, {"image": 1, "anomaly_map": 2, "score": 3})
    with pytest.raises(BackendError, match="failed to enqueue"):
        tc.execute(FakeContext(ok=False), "tensors", [], 0)
    with pytest.raises(BackendError, match="unknown TensorRT I/O api"):
        tc.engine_io(make_trt("10.3.0"), FakeEngine(SPECS, "tensors"), "ptrs")


def test_gpu_identity_and_engine_name():
    assert tc.gpu_slug("NVIDIA GeForce RTX 3090", (8, 6)) == "nvidia-geforce-rtx-3090-sm86"
    assert tc.gpu_slug("Orin (nvgpu)", (8, 7)) == "orin-nvgpu-sm87"
    assert tc.gpu_identity(make_cuda("Orin", (8, 7))) == ("orin-sm87", "Orin", (8, 7))
    with pytest.raises(BackendError, match="CUDA device 1 does not exist"):
        tc.gpu_identity(make_cuda(), 1)
    sha = "0123456789abcdef" * 4
    assert (
        tc.engine_name(sha, "orin-sm87", V86, "int8")
        == "0123456789ab.orin-sm87.trt8.6.1.int8.engine"
    )
    with pytest.raises(BackendError, match="too short"):
        tc.engine_name("abc", "orin-sm87", V86, "int8")


def _engine_with_sidecar(tmp_path, expect, payload=b"ENGINE"):
    path = tmp_path / tc.engine_name(expect.onnx_sha256, expect.gpu, V10, expect.precision)
    path.write_bytes(payload)
    tc.sidecar_path(path).write_text(json.dumps(tb.make_sidecar(path, expect, parity=None)))
    return path


EXPECT = tc.Expect("model.fp16.onnx", "ab" * 32, "10.3.0.30", "orin-sm87", "fp16")


def test_sidecar_ok_and_find(tmp_path):
    assert tc.find_engine(tmp_path, EXPECT, V10) is None
    path = _engine_with_sidecar(tmp_path, EXPECT)
    found, meta = tc.find_engine(tmp_path, EXPECT, V10)
    assert found == path and meta["engine_sha256"] and meta["bytes"] == 6
    assert tc.sidecar_path(path).name == path.name + ".json"


@pytest.mark.parametrize(
    "field, value",
    [
        ("onnx_sha256", "cd" * 32),
        ("trt_version", "10.4.0.1"),
        ("gpu", "nvidia-a100-sm80"),
        ("precision", "int8"),
        ("onnx_file", "model.onnx"),
    ],
)
def test_sidecar_mismatch_names_field_and_both_values(tmp_path, field, value):
    path = _engine_with_sidecar(tmp_path, EXPECT)
    meta = json.loads(tc.sidecar_path(path).read_text())
    meta[field] = value
    tc.sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(BundleError) as e:
        tc.check_sidecar(path, EXPECT)
    msg = str(e.value)
    assert str(path) in msg and field in msg and value in msg and str(getattr(EXPECT, field)) in msg


def test_sidecar_tampered_engine_and_bad_files(tmp_path):
    path = _engine_with_sidecar(tmp_path, EXPECT)
    want = json.loads(tc.sidecar_path(path).read_text())["engine_sha256"]
    path.write_bytes(b"ENGINF")  # one byte changed
    with pytest.raises(BundleError) as e:
        tc.check_sidecar(path, EXPECT)
    assert "sha256 mismatch" in str(e.value) and want in str(e.value) and str(path) in str(e.value)
    tc.sidecar_path(path).write_text("{not json")
    with pytest.raises(BundleError, match="unreadable engine sidecar"):
        tc.check_sidecar(path, EXPECT)
    tc.sidecar_path(path).write_text(json.dumps({"format": "other"}))
    with pytest.raises(BundleError, match="not a lineinspect-engine/1 sidecar"):
        tc.check_sidecar(path, EXPECT)
    tc.sidecar_path(path).unlink()
    with pytest.raises(BundleError, match="no sidecar"):
        tc.find_engine(tmp_path, EXPECT, V10)


def test_timing_cache_path_per_gpu_and_version(tmp_path):
    a = tb.timing_cache_path(tmp_path, "orin-sm87", V10)
    assert a.name == "orin-sm87.trt10.3.0.30.timing-cache"
    assert a != tb.timing_cache_path(tmp_path, "orin-sm87", V86)


def test_require_tensorrt_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import -> ImportError
    with pytest.raises(tb.TensorRTUnavailable) as e:
        tb.require_tensorrt()
    msg = str(e.value)
    assert "TensorRT is not available" in msg and "python3-libnvinfer" in msg and "pycuda" in msg


def test_require_tensorrt_without_pycuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", make_trt("10.3.0"))
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(tb.TensorRTUnavailable, match="pycuda is not available"):
        tb.require_tensorrt()
