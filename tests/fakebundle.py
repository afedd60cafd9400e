"""A real, tiny bundle for edge tests: no torch, no training.

The graph (built with the onnx helper API) is a stand-in anomaly model:
    image uint8 (B,3,H,W) -> anomaly_map = mean_c |x - 128| / 128   float32 (B,1,H,W)
                          -> score       = max over the map           float32 (B,)
so a uniform mid-grey frame (128) is perfectly "good" (map 0) and a black or white patch is a
defect whose map value is ~1 exactly where the patch is.

`poison` makes a graph that misbehaves on a "poisoned" frame (`poison_frame`: a dark block of
value POISON = 20 in the top-left corner, so the model input's first pixel p is 20; a good or
defective frame has p = 128, a backend's all-zero warm-up input p = 0; both behave):
    "nan"   score += 0 * log(|p - 20| - 10): NaN for a poisoned frame, unchanged otherwise
    "fail"  score += Gather(zeros(50), max(0, 100 - 5 |p - 20|)): index 100 is out of range, so
            onnxruntime raises for a poisoned frame (a failing inference), and adds 0 otherwise
    "slow"  score += 0 * sum(Loop of SLOW_ITERS (1024x1024 @ 1024x1024) matmuls): a poisoned
            frame takes seconds to infer (a wedged accelerator, as the pipeline sees it), every
            other frame runs 0 iterations; the values stay exact (all zeros)
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper

from edge.bundle import FileEntry, InputSpec, Manifest, write_manifest

GREY = 128
POISON = 20
SLOW_ITERS = 200  # "slow" poison: 1024^3 multiply-adds each (60 took 2.5 s on a loaded core
# and 0.65 s on a fast day, under the stalled scenario's 1 s: 200 keeps the stall far past it)


def make_model(
    path: str | Path,
    size: tuple[int, int] = (64, 64),
    dynamic: bool = True,
    batch: int = 1,
    poison: str | None = None,
) -> Path:
    """dynamic: batch dimension "B"; else fixed at `batch`. poison: None, "nan" or "fail"."""
    h, w = size
    b = "B" if dynamic else batch
    x = helper.make_tensor_value_info("image", TensorProto.UINT8, [b, 3, h, w])
    amap = helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [b, 1, h, w])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, [b])
    c128 = helper.make_tensor("c128", TensorProto.FLOAT, [], [128.0])
    nodes = [
        helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["xf", "c128"], ["d"]),
        helper.make_node("Abs", ["d"], ["ad"]),
        helper.make_node("Div", ["ad", "c128"], ["nd"]),
        helper.make_node("ReduceMean", ["nd"], ["anomaly_map"], axes=[1], keepdims=1),
    ]
    inits = [c128]
    if poison is None:
        nodes.append(
            helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2, 3], keepdims=0)
        )
    else:
        nodes += _poison_nodes(poison, inits)
    graph = helper.make_graph(nodes, "fake_anomaly", [x], [amap, score], initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests.fakebundle"
    )
    model.ir_version = 8  # loadable by older onnxruntime builds (JetPack ones lag behind)
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def _poison_nodes(poison: str, inits: list) -> list:
    """score = max(map) + extra, where extra is 0 for a normal frame (see the module doc)."""
    t = helper.make_tensor
    inits += [
        t("s0", TensorProto.INT64, [4], [0, 0, 0, 0]),
        t("s1", TensorProto.INT64, [4], [2**62, 1, 1, 1]),  # the batch, pixel (0, 0) of R
        t("flat", TensorProto.INT64, [1], [-1]),
    ]
    nodes = [
        helper.make_node("ReduceMax", ["anomaly_map"], ["peak"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Slice", ["xf", "s0", "s1"], ["p4"]),
        helper.make_node("Reshape", ["p4", "flat"], ["p"]),  # (B,) first pixel of each frame
    ]
    inits += [t("cpoison", TensorProto.FLOAT, [], [float(POISON)])]
    nodes += [
        helper.make_node("Sub", ["p", "cpoison"], ["pd"]),
        helper.make_node("Abs", ["pd"], ["dist"]),  # |p - 20|: 0 only for a poisoned frame
    ]
    if poison == "nan":
        inits += [t("c10", TensorProto.FLOAT, [], [10.0]), t("zero", TensorProto.FLOAT, [], [0.0])]
        nodes += [
            helper.make_node("Sub", ["dist", "c10"], ["pm"]),
            helper.make_node("Log", ["pm"], ["lg"]),  # NaN when |p - 20| < 10
            helper.make_node("Mul", ["lg", "zero"], ["extra"]),
        ]
    elif poison == "fail":
        inits += [
            t("c100", TensorProto.FLOAT, [], [100.0]),
            t("c5", TensorProto.FLOAT, [], [5.0]),
            t("zero", TensorProto.FLOAT, [], [0.0]),
            t("table", TensorProto.FLOAT, [50], [0.0] * 50),
        ]
        nodes += [
            helper.make_node("Mul", ["dist", "c5"], ["d5"]),
            helper.make_node("Sub", ["c100", "d5"], ["pi0"]),
            helper.make_node("Max", ["pi0", "zero"], ["pi"]),
            helper.make_node("Cast", ["pi"], ["idx"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "idx"], ["extra"], axis=0),  # fails if p ~ 20
        ]
    elif poison == "slow":
        nodes += _slow_nodes(inits)
    else:
        raise ValueError(f"poison: expected None, 'nan', 'fail' or 'slow', got {poison!r}")
    nodes.append(helper.make_node("Add", ["peak", "extra"], ["score"]))
    return nodes


def _slow_nodes(inits: list) -> list:
    """extra = 0 * sum(Loop(trips = SLOW_ITERS * max(0, 10 - |p - 20|) / 10) { m = m @ w }): the
    matrices come from ConstantOfShape on a data-dependent shape, so nothing is constant-folded."""
    t = helper.make_tensor
    inits += [
        t("c10s", TensorProto.FLOAT, [], [10.0]),
        t("zero_s", TensorProto.FLOAT, [], [0.0]),
        t("iters", TensorProto.FLOAT, [], [SLOW_ITERS / 10.0]),
        t("zero_f", TensorProto.FLOAT, [], [0.0]),
        t("dims", TensorProto.INT64, [2], [1024, 1024]),
    ]
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["m_in", "w"], ["mm"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["mm"], ["m_out"]),
        ],
        "slow_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("m_in", TensorProto.FLOAT, [1024, 1024]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("m_out", TensorProto.FLOAT, [1024, 1024]),
        ],
    )
    return [
        helper.make_node("ReduceMin", ["dist"], ["dmin"], keepdims=0),
        helper.make_node("Sub", ["c10s", "dmin"], ["near"]),
        helper.make_node("Max", ["near", "zero_s"], ["dark"]),  # 10 for a poisoned frame, else 0
        helper.make_node("Mul", ["dark", "iters"], ["tripf"]),
        helper.make_node("ReduceMin", ["p"], ["pmin"], keepdims=0),
        helper.make_node("Cast", ["tripf"], ["trips"], to=TensorProto.INT64),
        helper.make_node("Mul", ["pmin", "zero_f"], ["z"]),
        helper.make_node("Cast", ["z"], ["zi"], to=TensorProto.INT64),
        helper.make_node("Add", ["dims", "zi"], ["shape"]),  # (1024, 1024), data-dependent
        helper.make_node("ConstantOfShape", ["shape"], ["m0"]),
        helper.make_node("ConstantOfShape", ["shape"], ["w"]),
        helper.make_node("Loop", ["trips", "", "m0"], ["m_end"], body=body),
        helper.make_node("ReduceSum", ["m_end"], ["msum"], keepdims=0),
        helper.make_node("Mul", ["msum", "zero_f"], ["extra"]),
    ]


def make_bundle(
    root: str | Path,
    size: tuple[int, int] = (64, 64),
    *,
    thresholds: dict | None = None,
    with_thresholds: bool = True,
    name: str = "fake",
    dynamic: bool = True,
    batch: int = 1,
    poison: str | None = None,
) -> Path:
    """Write a bundle under `root`. Default thresholds: image 0.5, pixel 0.5, min area 4,
    fitted on (model_sha256) the bundle's graph."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    make_model(root / "model.onnx", size, dynamic, batch, poison)
    manifest = Manifest(
        name=name,
        model="fake",
        backbone="none",
        input=InputSpec(height=size[0], width=size[1], batch=batch),
        files={"model.onnx": FileEntry("", 0)},
        provenance={"note": "tests/fakebundle.py"},
    )
    write_manifest(root, manifest)
    if with_thresholds:
        th = {
            "image_threshold": 0.5,
            "pixel_threshold": 0.5,
            "min_region_area": 4,
            "model_sha256": manifest.files["model.onnx"].sha256,
        }
        th.update(thresholds or {})
        (root / "thresholds.yaml").write_text(yaml.safe_dump(th))
    return root


def good_frame(shape: tuple[int, int] = (96, 128)) -> np.ndarray:
    """(H,W,3) uint8 BGR, uniform grey: map 0, score 0."""
    return np.full((*shape, 3), GREY, np.uint8)


def defect_frame(
    shape: tuple[int, int] = (96, 128), box: tuple[int, int, int, int] = (40, 30, 24, 20)
) -> np.ndarray:
    """Grey frame with a black (x, y, w, h) patch: map ~1 over the patch."""
    img = good_frame(shape)
    x, y, w, h = box
    img[y : y + h, x : x + w] = 0
    return img


def poison_frame(shape: tuple[int, int] = (96, 128)) -> np.ndarray:
    """A grey frame with a dark (POISON) 8x8 block at the top-left: a `poison` graph misbehaves
    on it (the block is also a defect for the normal graph)."""
    img = good_frame(shape)
    img[:8, :8] = POISON
    return img


def write_frames(
    folder: str | Path,
    defective: set[int],
    n: int,
    shape=(96, 128),
    poisoned: set[int] = frozenset(),
) -> Path:
    """n PNG frames frame_000.png.. in `folder`; indices in `defective` get a defect patch,
    those in `poisoned` the poison block."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if i in poisoned:
            img = poison_frame(shape)
        else:
            img = defect_frame(shape) if i in defective else good_frame(shape)
        cv2.imwrite(str(folder / f"frame_{i:03d}.png"), img)
    return folder
