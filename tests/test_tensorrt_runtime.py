"""edge.backends.tensorrt itself, on the fake TensorRT + pycuda of tests/trtfake.py (no GPU).

The backend module is imported with the fakes in sys.modules, so its real code runs: engine lookup
and sidecar check, deserialisation, I/O check, pinned buffers, binding by name (10+, 11) or by
bindings list (8.x), the context push/pop around every call, clean-up. The fake engine computes
with ONNX Runtime, so the shared backend contract applies unchanged. What this cannot show is that
real TensorRT and CUDA behave as documented; tests/test_tensorrt_backend.py does that on a GPU.
"""

from __future__ import annotations

import sys
import types

import cv2
import pytest

from edge.backends import load_backend
from edge.bundle import Bundle, FileEntry, write_manifest
from edge.errors import BackendError, BundleError
from tests import trtfake
from tests.fakebundle import defect_frame, good_frame, make_bundle
from tests.test_backends import (  # the shared contract, with this module's `backend` fixture
    SIZE,
    batch,
    test_contract_bad_input_says_expected_and_got,  # noqa: F401
    test_contract_deterministic,  # noqa: F401
    test_contract_good_vs_defect,  # noqa: F401
    test_contract_shapes_dtypes_values,  # noqa: F401
)

VERSIONS = ["8.6.1", "10.3.0.30", "11.4.0.106"]


@pytest.fixture(params=VERSIONS)
def fakes(request, monkeypatch):
    trt, cuda = trtfake.make_trt(request.param), trtfake.make_cuda("Orin", (8, 7))
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = cuda
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)
    sys.modules.pop("edge.backends.tensorrt", None)  # import it afresh, against the fakes
    yield trt, cuda
    sys.modules.pop("edge.backends.tensorrt", None)


@pytest.fixture
def built(fakes, tmp_path):
    """A static-batch test bundle with a fake fp32 engine built by engines.build, parity-checked
    through the real backend module."""
    from engines.build import build

    trt, cuda = fakes
    root = make_bundle(tmp_path / "b", SIZE, dynamic=False)
    (root / "samples").mkdir()
    cv2.imwrite(str(root / "samples" / "000.png"), good_frame(SIZE))
    cv2.imwrite(str(root / "samples" / "001.png"), defect_frame(SIZE, (4, 4, 10, 8)))
    m = Bundle(root).manifest
    m.files["samples/000.png"] = FileEntry("", 0)
    m.files["samples/001.png"] = FileEntry("", 0)
    write_manifest(root, m)
    res = build(root, "fp32", trt=trt, cuda=cuda)  # default runner: edge's TensorRT backend
    assert res.parity.ok and res.parity.map_max_abs == 0.0
    return root, trt, cuda


@pytest.fixture
def backend(built):
    root, trt, cuda = built
    be = load_backend("tensorrt", Bundle(root), "fp32")
    yield be
    be.close()


def test_io_api_per_version_and_clean_up(built):
    root, trt, cuda = built
    be = load_backend("tensorrt", Bundle(root), "fp32")
    assert be.name == "tensorrt" and be.input_shape == (1, 3, *SIZE)
    be.infer(batch(good_frame()))
    ctx = be._context
    if trt.__version__.startswith("8."):
        assert ctx.addresses == {} and ctx.calls[0][0] == "v2" and len(ctx.calls[0][1]) == 3
    else:
        assert set(ctx.addresses) == {"image", "anomaly_map", "score"}
        assert ctx.calls == [("v3", 7)]
    assert cuda.state["pushed"] == 0  # every push popped, in init and in infer
    allocs = [b.address for b in be._buffers]
    freed, detached = cuda.state["freed"], cuda.state["detached"]
    be.close()
    be.close()  # idempotent
    assert cuda.state["freed"] == freed + 3 and not set(allocs) & set(trtfake.ALLOCS)
    assert cuda.state["detached"] == detached + 1


def test_outputs_are_copies(backend):
    m1, s1 = backend.infer(batch(defect_frame()))
    keep = m1.copy()
    backend.infer(batch(good_frame()))
    assert (m1 == keep).all() and s1[0] > 0.9


def test_tampered_graph_refused_before_cuda(built):
    root, trt, cuda = built
    data = bytearray((root / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / "model.onnx").write_bytes(bytes(data))
    b = Bundle(root)
    with pytest.raises(BundleError) as e:
        load_backend("tensorrt", b, "fp32")
    msg = str(e.value)
    assert str(root / "model.onnx") in msg and b.model_sha256() in msg and "file has" in msg


def test_no_engine_and_wrong_engine(built):
    root, trt, cuda = built
    (engine,) = (root / "engines").glob("*.engine")
    engine.write_bytes(engine.read_bytes() + b"x")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_backend("tensorrt", Bundle(root), "fp32")
    engine.unlink()
    with pytest.raises(BackendError) as e:
        load_backend("tensorrt", Bundle(root), "fp32")
    assert f"python -m engines build {root} --precision fp32" in str(e.value)
    assert cuda.state["pushed"] == 0
