"""The backend contract (tests/test_backends.py) on a real TensorRT engine, wherever TensorRT and
pycuda are installed (skipped elsewhere): build with `engines.build`, load with edge's backend.
"""

from __future__ import annotations

import json
import shutil

import cv2
import pytest

from edge.backends import load_backend
from edge.backends import trt_compat as tc
from edge.bundle import Bundle, FileEntry, write_manifest
from edge.errors import BackendError, BundleError
from tests.fakebundle import defect_frame, good_frame, make_bundle

pytestmark = pytest.mark.gpu
pytest.importorskip("tensorrt")
pytest.importorskip("pycuda.driver")

# The shared contract, run here with a TensorRT `backend` fixture (same inputs, same outputs
# within tolerance, same errors on bad input).
from tests.test_backends import (  # noqa: E402
    SIZE,
    test_contract_bad_input_says_expected_and_got,  # noqa: F401
    test_contract_deterministic,  # noqa: F401
    test_contract_good_vs_defect,  # noqa: F401
    test_contract_shapes_dtypes_values,  # noqa: F401
)


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory):
    from engines.build import build

    root = make_bundle(tmp_path_factory.mktemp("trt") / "b", SIZE, dynamic=False)
    (root / "samples").mkdir()
    cv2.imwrite(str(root / "samples" / "000.png"), good_frame(SIZE))
    cv2.imwrite(str(root / "samples" / "001.png"), defect_frame(SIZE, (4, 4, 10, 8)))
    m = Bundle(root).manifest
    m.files["samples/000.png"] = FileEntry("", 0)
    m.files["samples/001.png"] = FileEntry("", 0)
    write_manifest(root, m)
    res = build(root, "fp32", workspace_mb=256)
    assert res.parity.ok and not res.reused
    assert build(root, "fp32").reused
    return Bundle(root)


@pytest.fixture
def backend(trt_bundle):
    be = load_backend("tensorrt", trt_bundle, "fp32")
    yield be
    be.close()


def test_no_engine_says_which_command_builds_it(trt_bundle):
    with pytest.raises(BundleError, match="run `engines quantize`"):
        load_backend("tensorrt", trt_bundle, "fp16")  # no fp16 graph at all


def test_sidecar_mismatch_refused_before_deserialising(trt_bundle, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(trt_bundle.root, root)
    (engine,) = (root / "engines").glob("*.engine")
    side = tc.sidecar_path(engine)
    meta = json.loads(side.read_text())
    meta["trt_version"] = "1.0.0"
    side.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="trt_version: sidecar has '1.0.0'"):
        load_backend("tensorrt", Bundle(root), "fp32")
    engine.unlink()
    side.unlink()
    with pytest.raises(BackendError, match="python -m engines build"):
        load_backend("tensorrt", Bundle(root), "fp32")
