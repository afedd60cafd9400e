"""Backend contract: every backend in BACKENDS passes the same test (skipped where not loadable)."""

from __future__ import annotations

import numpy as np
import pytest

from edge.backends import AUTO_ORDER, BACKENDS, backend_class, load_backend
from edge.bundle import Bundle
from edge.errors import BackendError, BundleError
from edge.preprocess import to_input
from tests.fakebundle import defect_frame, good_frame, make_bundle

SIZE = (32, 48)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return Bundle(make_bundle(tmp_path_factory.mktemp("bundle"), SIZE))


def _load(name, bundle):
    try:
        return load_backend(name, bundle, "fp32")
    except BackendError as exc:
        pytest.skip(f"backend {name} not loadable here: {exc}")


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, bundle):
    be = _load(request.param, bundle)
    yield be
    be.close()


def batch(*frames):
    return np.stack([to_input(f, SIZE) for f in frames])


def test_contract_shapes_dtypes_values(backend):
    assert backend.name in BACKENDS
    b, c, h, w = backend.input_shape
    assert (c, h, w) == (3, *SIZE) and b >= 1
    x = batch(defect_frame((64, 96), (24, 16, 24, 16)))
    maps, scores = backend.infer(x)
    assert maps.shape == (1, 1, *SIZE) and maps.dtype == np.float32
    assert scores.shape == (1,) and scores.dtype == np.float32
    # The fake model: map = mean_c |x-128|/128, score = max(map).
    want = np.abs(x.astype(np.float32) - 128).mean(axis=1, keepdims=True) / 128
    np.testing.assert_allclose(maps, want, atol=1e-5)
    np.testing.assert_allclose(scores, want.reshape(1, -1).max(axis=1), atol=1e-5)


def test_contract_deterministic(backend):
    x = batch(defect_frame((64, 96)))
    m1, s1 = backend.infer(x)
    m2, s2 = backend.infer(x.copy())
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(s1, s2)


def test_contract_good_vs_defect(backend):
    _, s_good = backend.infer(batch(good_frame()))
    _, s_bad = backend.infer(batch(defect_frame()))
    assert s_good[0] < 0.01 and s_bad[0] > 0.9


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((1, 3, *SIZE), np.float32),  # wrong dtype
        np.zeros((1, *SIZE, 3), np.uint8),  # NHWC instead of NCHW
        np.zeros((1, 3, SIZE[0] + 1, SIZE[1]), np.uint8),  # wrong size
        np.zeros((3, *SIZE), np.uint8),  # no batch dim
        [[0]],  # not an array
    ],
    ids=["float32", "nhwc", "size", "no-batch", "list"],
)
def test_contract_bad_input_says_expected_and_got(backend, bad):
    with pytest.raises(BackendError) as e:
        backend.infer(bad)
    msg = str(e.value)
    assert "expected" in msg and "got" in msg and "uint8" in msg


def test_registry_and_auto_order():
    assert "onnxruntime" in BACKENDS and "tensorrt" in BACKENDS
    assert AUTO_ORDER[0] == "tensorrt" and "onnxruntime" in AUTO_ORDER


def test_unknown_backend():
    with pytest.raises(BackendError, match="unknown backend 'tensorflow'"):
        backend_class("tensorflow")


def test_tensorrt_unavailable_says_what_to_install(bundle):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is importable here")
    except ImportError:
        pass
    with pytest.raises(BackendError, match="tensorrt") as e:
        load_backend("tensorrt", bundle)
    msg = str(e.value)
    # Until edge/backends/tensorrt.py lands the message says so; after, it says what to install.
    assert "is missing" in msg or ("TensorRT" in msg and "pycuda" in msg)


def test_auto_loads_something(bundle):
    be = load_backend("auto", bundle)
    assert be.name in AUTO_ORDER
    be.close()


def test_onnxruntime_options_and_providers(bundle):
    be = _load("onnxruntime", bundle)
    assert "CPUExecutionProvider" in be.providers
    be.close()
    with pytest.raises(BackendError, match="not in this build"):
        load_backend("onnxruntime", bundle, providers=["NoSuchExecutionProvider"])
    be = load_backend("onnxruntime", bundle, intra_op_threads=1)
    m, _ = be.infer(batch(good_frame(), defect_frame()))  # dynamic batch in the fake graph
    assert m.shape == (2, 1, *SIZE)


def test_fixed_batch_graph_rejects_other_batch(tmp_path):
    b = Bundle(make_bundle(tmp_path / "b", SIZE, dynamic=False))
    be = _load("onnxruntime", b)
    assert be.input_shape == (1, 3, *SIZE)
    with pytest.raises(BackendError, match=r"expected uint8 \(1,3,32,48\)"):
        be.infer(batch(good_frame(), good_frame()))


def test_tampered_model_refused(tmp_path):
    root = make_bundle(tmp_path / "b", SIZE)
    with open(root / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_backend("onnxruntime", Bundle(root))


def test_manifest_tensor_names_are_checked(tmp_path):
    import yaml

    from edge.bundle import MANIFEST

    root = make_bundle(tmp_path / "b", SIZE)
    m = yaml.safe_load((root / MANIFEST).read_text())
    m["outputs"]["score"] = "image_score"
    (root / MANIFEST).write_text(yaml.safe_dump(m))
    with pytest.raises(BackendError, match="no output 'image_score'"):
        load_backend("onnxruntime", Bundle(root))


def test_onnxruntime_threads_spin_and_batch_flags(bundle):
    be = load_backend("onnxruntime", bundle, intra_op_threads=1, spin=True)
    assert be.threads == 1 and be.spin is True and be.dynamic_batch is True
    be.close()


def test_tuning_options_go_only_to_backends_that_take_them(bundle, monkeypatch):
    """A station's ONNX Runtime thread settings must not stop another backend from loading."""
    import edge.backends as backends

    class Plain:
        name = "plain"
        input_shape = (1, 3, *SIZE)

        def __init__(self, bundle, precision="fp32", *, device_id=0):
            self.device_id = device_id

        def infer(self, batch):
            raise NotImplementedError

        def close(self):
            pass

    monkeypatch.setattr(backends, "backend_class", lambda name: Plain)
    be = backends.load_backend("plain", bundle, "fp32", intra_op_threads=2, spin=True, device_id=3)
    assert isinstance(be, Plain) and be.device_id == 3
