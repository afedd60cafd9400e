"""engines: graph split and FP16 conversion, export (cleaning, parity, samples), quantize (FP16,
INT8 Q/DQ layout, manifest, --eval budget), and tamper refusal by every loader."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edge.backends import load_backend
from edge.bundle import Bundle
from edge.errors import BundleError, DataError
from engines import graph, parity
from engines import quantize as quant_mod
from engines.__main__ import main
from engines.export import ParityError, export
from train.models import build_model

S = 32  # smallest useful input (multiple of the coarsest stride, 16): seconds on 2 cores


# ---------------------------------------------------------------------------------------------
# graph split and FP16 on a hand-written graph


def _toy(path=None):
    """image uint8 (1,3,8,8) -> /Cast -> /model/normalize/Mul -> two 'networks' (Conv+Clip)
    -> head: ReduceSum of the product -> /model/scale/Mul (in a submodule, after a reduction)
    -> anomaly_map (1,1,8,8), score = ReduceMax."""
    rng = np.random.default_rng(0)
    w = lambda n, shape: numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), n)  # noqa: E731
    c = lambda n, v: numpy_helper.from_array(np.array(v, np.float32), n)  # noqa: E731
    inits = [
        w("wt", (4, 3, 3, 3)),
        w("ws", (4, 3, 3, 3)),
        c("k", 1 / 255),
        c("lo", 0.0),
        c("hi", 6.0),
        c("sc", 0.5),
        numpy_helper.from_array(np.array([1], np.int64), "ax"),
    ]
    n = helper.make_node
    nodes = [
        n("Cast", ["image"], ["x"], to=TensorProto.FLOAT, name="/Cast"),
        n("Mul", ["x", "k"], ["xn"], name="/model/normalize/Mul"),
        n("Conv", ["xn", "wt"], ["t0"], pads=[1, 1, 1, 1], name="/model/teacher/c0/Conv"),
        n("Clip", ["t0", "lo", "hi"], ["t"], name="/model/teacher/c0/Clip"),
        n("Conv", ["xn", "ws"], ["s0"], pads=[1, 1, 1, 1], name="/model/student/c0/Conv"),
        n("Clip", ["s0", "lo", "hi"], ["s"], name="/model/student/c0/Clip"),
        n("Mul", ["t", "s"], ["ts"], name="/model/Mul"),
        n("ReduceSum", ["ts", "ax"], ["d"], keepdims=1, name="/model/ReduceSum"),
        n("Mul", ["d", "sc"], ["anomaly_map"], name="/model/scale/Mul"),
        n(
            "ReduceMax",
            ["anomaly_map"],
            ["score"],
            axes=[1, 2, 3],
            keepdims=0,
            name="/model/ReduceMax",
        ),
    ]
    g = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 3, 8, 8])],
        [
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [1, 1, 8, 8]),
            helper.make_tensor_value_info("score", TensorProto.FLOAT, [1]),
        ],
        initializer=inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x})


def test_split_network_vs_head():
    m = _toy()
    sp = graph.split(m)
    assert sp.network == [
        "/model/teacher/c0/Conv",
        "/model/teacher/c0/Clip",
        "/model/student/c0/Conv",
        "/model/student/c0/Clip",
    ]
    # pre-processing by scope, the model's own ops by scope, and /model/scale/Mul because it is
    # downstream of a reduction although it sits in a submodule
    assert "/model/scale/Mul" in sp.kept_float and "/model/normalize/Mul" in sp.kept_float
    assert graph.split(m, keep_float=["student"]).network == sp.network[:2]


def test_split_refuses_foreign_graph():
    m = _toy()
    for node in m.graph.node:
        node.name = ""
    with pytest.raises(ValueError, match="no network nodes"):
        graph.split(m)


def test_fp16_conversion_keeps_io_and_head_fp32():
    m = _toy()
    h = graph.to_fp16(m, graph.split(m).network)
    assert (
        graph.io_types(h)
        == graph.io_types(m)
        == {
            "image": "UINT8",
            "anomaly_map": "FLOAT",
            "score": "FLOAT",
        }
    )
    inits = {i.name: i.data_type for i in h.graph.initializer}
    assert inits["wt__fp16"] == TensorProto.FLOAT16 and inits["lo__fp16"] == TensorProto.FLOAT16
    assert "wt" not in inits  # the FP32 copy is gone
    assert inits["sc"] == TensorProto.FLOAT  # head constant untouched
    casts = [n for n in h.graph.node if n.op_type == "Cast"]
    # input cast + one cast into FP16 (shared by both convs) + one out of each network
    assert len(casts) == 4
    x = np.random.default_rng(1).integers(0, 256, (1, 3, 8, 8), dtype=np.uint8)
    (m32, s32), (m16, s16) = _run(m, x), _run(h, x)
    np.testing.assert_allclose(s16, s32, rtol=2e-2)
    assert m16.dtype == np.float32 and s16.dtype == np.float32
    np.testing.assert_allclose(m16, m32, rtol=2e-2, atol=2e-2 * np.abs(m32).max())
    assert not np.array_equal(m16, m32)  # it really computed in FP16


def test_fp16_graph_output_made_by_network_gets_cast_back():
    m = _toy()
    # make a network tensor a graph output as well
    m.graph.output.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4, 8, 8]))
    h = graph.to_fp16(m, graph.split(m).network)
    assert graph.io_types(h)["t"] == "FLOAT"
    x = np.full((1, 3, 8, 8), 100, np.uint8)
    np.testing.assert_allclose(_run(h, x)[2], _run(m, x)[2], rtol=1e-2, atol=1e-2)


def test_check_qdq_rejects_asymmetric():
    n = helper.make_node
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(3, np.int8), "zp"),
    ]
    g = helper.make_graph(
        [n("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q0")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("q", TensorProto.INT8, [1])],
        initializer=inits,
    )
    with pytest.raises(quant_mod.QuantizeError, match="q0: zero point must be int8 0"):
        quant_mod.check_qdq(helper.make_model(g))


def test_parity_names_the_failing_image(tmp_path):
    files = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), np.full((S, S, 3), 40 * i, np.uint8))
        files.append(p)

    def ref(x):
        m = x.astype(np.float32).mean(axis=1, keepdims=True) / 255
        return m, m.reshape(len(x), -1).max(axis=1) + 1

    def test(x):  # wrong only on image 3 (value 120), and only in the score
        m, s = ref(x)
        return m, s + (0.01 * (x[:, 0, 0, 0] == 120))

    rep = parity.compare(ref, test, files, (S, S), 2, 1e-3, 1e-4)
    assert not rep.ok and rep.worst_image == str(files[3]) and rep.map_max_abs == 0.0
    assert str(files[3]) in rep.failure("x")
    rep = parity.compare(ref, ref, files, (S, S), 2, 1e-3, 1e-4)
    assert rep.ok and rep.images == 5


# ---------------------------------------------------------------------------------------------
# export and quantize on a tiny real model


def _images(folder, n, rng, defect=False):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = (rng.random((48, 48, 3)) * 40 + 100).astype(np.uint8)
        if defect:
            img[10:22, 12:26] = 0
        cv2.imwrite(str(folder / f"{i:03d}.png"), img)
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A checkpoint of an untrained tiny STPM + an MVTec-layout category for it."""
    root = tmp_path_factory.mktemp("eng")
    rng = np.random.default_rng(0)
    data = root / "cat"
    _images(data / "train" / "good", 14, rng)  # 4 calibrate INT8, 10 check its decisions
    _images(data / "test" / "good", 3, rng)
    _images(data / "test" / "hole", 3, rng, defect=True)
    (data / "ground_truth" / "hole").mkdir(parents=True)
    for i in range(3):
        mask = np.zeros((48, 48), np.uint8)
        mask[10:22, 12:26] = 255
        cv2.imwrite(str(data / "ground_truth" / "hole" / f"{i:03d}_mask.png"), mask)
    torch.manual_seed(0)
    model = build_model("stpm", image_size=S).eval()
    run = root / "run"
    run.mkdir()
    torch.save(
        {
            "kind": "stpm",
            "args": model.args,
            "state_dict": model.state_dict(),
            "config": {"data": str(data)},
            "provenance": {"seed": 0},
        },
        run / "checkpoint.pt",
    )
    return run, data


@pytest.fixture(scope="module")
def bundle_dir(run_dir, tmp_path_factory):
    run, data = run_dir
    out, rep = export(run, tmp_path_factory.mktemp("bundle") / "b", parity_count=4)
    assert rep.ok
    return out


def test_export_cleaned_parity_samples(bundle_dir):
    b = Bundle(bundle_dir)
    b.verify_all()
    model = onnx.load(str(b.model_path()))
    ops = {n.op_type for n in model.graph.node}
    assert "Constant" not in ops and "Pad" not in ops  # folded by onnxslim into Conv / inits
    exp = b.manifest.provenance["export"]
    assert exp["cleaned_by"].startswith("onnxslim") and exp["opset"] == 17
    assert exp["parity"]["map_max_abs"] <= 1e-3 * exp["parity"]["map_range"]
    samples = sorted(n for n in b.manifest.files if n.startswith("samples/"))
    assert len(samples) == 4
    # a sample read back through edge's preprocessing is the exact model input it was made from
    x = cv2.imread(str(bundle_dir / samples[0]))
    assert x.shape == (S, S, 3)


def test_export_fixed_batch(run_dir, tmp_path):
    run, data = run_dir
    out, rep = export(run, tmp_path / "b2", batch=2, parity_count=3)  # 3 images: one padded
    assert rep.ok and rep.images == 3
    b = Bundle(out)
    assert b.manifest.input.batch == 2
    be = load_backend("onnxruntime", b, "fp32")
    assert be.input_shape == (2, 3, S, S)
    be.close()


def test_export_parity_failure_names_worst_image(run_dir, tmp_path, monkeypatch, capsys):
    import engines.export as export_mod

    real = export_mod.ort_infer

    def skewed(path):
        run = real(path)
        return lambda x: (lambda m, s: (m + 0.01 * (x.mean() > 0), s))(*run(x))

    monkeypatch.setattr(export_mod, "ort_infer", skewed)
    run, data = run_dir
    with pytest.raises(ParityError) as e:
        export(run, tmp_path / "b", parity_count=3)
    assert "worst image" in str(e.value) and str(data / "train" / "good") in str(e.value)
    assert main(["export", str(run), "--out", str(tmp_path / "c"), "--parity-images", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "worst image" in err


def test_quantize_writes_fp16_and_qdq_int8(bundle_dir, run_dir, capsys):
    run, data = run_dir
    code = main(
        [
            "quantize",
            str(bundle_dir),
            "--calib",
            str(data / "train" / "good"),
            "--calib-count",
            "4",
            "--method",
            "minmax",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "layers INT8" in out and "int8: decisions changed" in out
    b = Bundle(bundle_dir)
    b.verify_all()
    q = b.manifest.quantization
    assert q["source_sha256"] == b.model_sha256("fp32")
    int8 = onnx.load(str(b.model_path("int8")))
    fp32 = onnx.load(str(b.model_path("fp32")))
    assert graph.io_types(int8) == graph.io_types(fp32)
    assert graph.io_types(onnx.load(str(b.model_path("fp16")))) == graph.io_types(fp32)
    # symmetric int8, per-channel weights, one per quantised layer
    qdq = quant_mod.check_qdq(int8)
    assert qdq["per_channel_dequantize"] == q["int8"]["quantized_layers"] > 0
    floats = q["int8"]["float_layers"]
    assert sum(v == "head" for v in floats.values()) == 2  # the blur's two convs
    assert sum(v.startswith("entry") for v in floats.values()) == 2  # teacher + student stem
    # Q/DQ sit only in front of quantised layers: nothing of the head is quantised
    conv_inputs = {i for n in int8.graph.node if n.op_type == "Conv" for i in n.input}
    for n in int8.graph.node:
        if n.op_type == "DequantizeLinear":
            assert n.output[0] in conv_inputs
    # every precision loads through edge and agrees roughly with FP32 on a real image
    x = np.stack(
        [cv2.imread(str(bundle_dir / "samples" / "000.png"))[:, :, ::-1].transpose(2, 0, 1)]
    )
    outs = {}
    for p in ("fp32", "fp16", "int8"):
        be = load_backend("onnxruntime", b, p)
        outs[p] = be.infer(np.ascontiguousarray(x))
        be.close()
    rng = float(outs["fp32"][0].max() - outs["fp32"][0].min())
    assert np.abs(outs["fp16"][0] - outs["fp32"][0]).max() < 0.02 * rng
    assert np.abs(outs["int8"][1] - outs["fp32"][1]).max() < 0.2 * abs(float(outs["fp32"][1][0]))


def test_quantize_eval_table_and_budget(bundle_dir, run_dir, monkeypatch, capsys):
    run, data = run_dir
    monkeypatch.setitem(quant_mod.MAX_DROP, "int8", 100.0)  # any untrained model passes
    monkeypatch.setitem(quant_mod.MAX_DROP, "fp16", 100.0)
    code = main(
        [
            "quantize",
            str(bundle_dir),
            "--calib",
            str(data / "train" / "good"),
            "--calib-count",
            "4",
            "--eval",
            str(data),
            "--method",
            "minmax",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "image AUROC" in out and "int8" in out
    ev = Bundle(bundle_dir).manifest.quantization["eval"]
    assert ev["images"] == 6
    for p in ("fp32", "fp16", "int8"):
        assert 0.0 <= ev[p]["image_auroc"] <= 1.0 and 0.0 <= ev[p]["pixel_auroc"] <= 1.0
    assert ev["int8"]["image_auroc_drop_points"] == pytest.approx(
        100 * (ev["fp32"]["image_auroc"] - ev["int8"]["image_auroc"])
    )


def test_budget_logic(monkeypatch, tmp_path):
    import calibration.evaluate as ev_mod

    aurocs = {"fp32": (0.990, 0.980), "fp16": (0.989, 0.980), "int8": (0.980, 0.978)}
    monkeypatch.setattr(
        ev_mod,
        "evaluate",
        lambda b, d, p, backend, progress: SimpleNamespace(
            summary={
                "image_auroc": aurocs[p][0],
                "pixel_auroc": aurocs[p][1],
                "pro": None,
                "images": 10,
            }
        ),
    )
    rows, over = quant_mod.evaluate_precisions(tmp_path, tmp_path)
    assert rows["int8"]["image_auroc_drop_points"] == pytest.approx(1.0)
    assert over == ["int8 image_auroc drops 1.00 points (budget 0.5)"]
    table = quant_mod.format_table(rows)
    assert "98.00" in table and "-1.00" in table and "n/a" in table


def test_engines_fit_without_importing_calibration(tmp_path):
    """engines quantize's decision check fits its reference thresholds with thresholding, not
    calibration: only `--eval` (engines.quantize.evaluate_precisions) reaches calibration."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, numpy as np\n"
        "import engines.__main__, engines.quantize, engines.build\n"
        "from engines import qcheck\n"
        "from pathlib import Path\n"
        "rng = np.random.default_rng(0)\n"
        "files = [Path(f'g{i}.png') for i in range(40)]\n"
        "maps = rng.random((40, 16, 16), dtype=np.float32)\n"
        "ref = qcheck.Reference.fitted(files, maps, maps.max(axis=(1, 2)), 0.05)\n"
        "assert ref.th.image_threshold > 0\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'calibration']\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_tampered_model_refused_by_every_loader(bundle_dir, run_dir, tmp_path):
    import shutil

    run, data = run_dir
    root = tmp_path / "t"
    shutil.copytree(bundle_dir, root)
    want = Bundle(root).model_sha256("fp32")
    blob = bytearray((root / "model.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one byte changed
    (root / "model.onnx").write_bytes(bytes(blob))
    loaders = [
        lambda: load_backend("onnxruntime", Bundle(root), "fp32"),
        lambda: quant_mod.quantize(root, data / "train" / "good", calib_count=4),
        lambda: __import__("calibration.evaluate").evaluate.evaluate(root, data, "fp32"),
    ]  # engines build: tests/test_tensorrt_build.py::test_tampered_graph_refused_before_building
    for load in loaders:
        with pytest.raises(BundleError) as e:
            load()
        msg = str(e.value)
        assert str(root / "model.onnx") in msg and want in msg and "file has" in msg


# ---------------------------------------------------------------------------- decision check


@pytest.fixture(scope="module")
def fragile_bundle(run_dir, tmp_path_factory):
    """An STPM whose student is the teacher plus a little noise: its map is a small difference
    of two large feature maps, the case where per-tensor INT8 noise swamps the signal."""
    run, data = run_dir
    torch.manual_seed(1)
    model = build_model("stpm", image_size=S).eval()
    with torch.no_grad():
        for (_, t), (_, st) in zip(
            model.teacher.state_dict().items(), model.student.state_dict().items(), strict=True
        ):
            st.copy_(t)
            if st.dim() == 4:  # conv weights get the noise; BN statistics stay valid
                st.add_(0.03 * t.abs().mean() * torch.randn_like(t))
    root = tmp_path_factory.mktemp("fragile")
    (root / "run").mkdir()
    ckpt = {
        "kind": "stpm",
        "args": model.args,
        "state_dict": model.state_dict(),
        "config": {"data": str(data)},
        "provenance": {"seed": 0},
    }
    torch.save(ckpt, root / "run" / "checkpoint.pt")
    out, rep = export(root / "run", root / "b", parity_count=2)
    return out, data


def test_quantize_refuses_int8_that_decides_unlike_fp32(fragile_bundle, capsys):
    bundle, data = fragile_bundle
    args = ["quantize", str(bundle), "--calib", str(data / "train" / "good")]
    code = main([*args, "--calib-count", "4", "--no-mixed"])
    err = capsys.readouterr().err
    assert code == 2
    # INT8 refused (FP16 too here: this model is fragile at any reduced precision)
    assert err.startswith("error: refused to write ") and "INT8 (decision check" in err
    assert "--allow-over-budget" in err
    assert "int8: decisions changed" in err and "OVER BUDGET" in err and "\n" not in err.strip()
    b = Bundle(bundle)
    q = b.manifest.quantization
    assert quant_mod.INT8_FILE not in b.manifest.files and q["int8"]["file"] is None
    assert not (bundle / quant_mod.INT8_FILE).exists()
    assert not list(bundle.glob("*.tmp"))
    failed = q["decision_check"]["int8"]
    assert failed["passed"] is False and failed["failures"] and failed["images"] == 10
    assert failed["score_error"] > quant_mod.qcheck.Budget().max_score_error
    with pytest.raises(BundleError, match="int8"):
        b.model_path("int8")
    # asked for explicitly, it is written, and the manifest says it failed
    assert main([*args, "--calib-count", "4", "--no-mixed", "--allow-over-budget"]) == 0
    q = Bundle(bundle).manifest.quantization
    assert q["int8"]["file"] == quant_mod.INT8_FILE
    assert "int8" in q["decision_check"]["written_over_budget"]


def test_mixed_precision_search_keeps_sensitive_layers_in_float(fragile_bundle, capsys):
    bundle, data = fragile_bundle
    rep = quant_mod.quantize(bundle, data / "train" / "good", calib_count=4, allow_over_budget=True)
    search = Bundle(bundle).manifest.quantization["decision_check"]["int8_search"]
    # the search kept doubling the float layers, each try measured and recorded
    assert [s["float_layers"] for s in search][:3] == [0, 1, 2]
    assert search[-1]["score_error"] < search[0]["score_error"]
    kept = [n for n, why in rep.float_layers.items() if why.startswith("sensitive")]
    assert len(kept) == search[-1]["float_layers"]


def test_check_needs_enough_held_out_images(bundle_dir, run_dir):
    run, data = run_dir
    with pytest.raises(DataError, match="held-out good images"):
        quant_mod.quantize(bundle_dir, data / "train" / "good", calib_count=10)
