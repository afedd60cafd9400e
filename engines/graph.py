"""ONNX graph surgery shared by export and quantize: cleaning, the network/head split, FP16.

The exported graph has three parts:

    image uint8 -> Cast -> normalise          pre-processing   (kept FP32)
                -> teacher / student networks the network      (FP16 or INT8)
                -> cosine, resize, mean, blur  the head         (kept FP32)
                -> anomaly_map, score

The split needs no knowledge of a particular model. A node is network when
  - it sits in a submodule scope: `RawPixelGraph` holds the model as `model`, so the exporter names
    sub-network nodes `/model/<submodule>/...`, while ops of the model's own forward (the cosine
    discrepancy, the upsampling, the mean over scales) are `/model/<Op>_N`; the `normalize` and
    `blur` submodules are pre/post-processing by name;
  - its op type is in NETWORK_OPS (convolutions, activations, elementwise arithmetic...);
  - it is not downstream of a reduction (HEAD_MARKERS: ReduceSum, Sqrt, Pow, ...): everything
    computed from a discrepancy is head, whichever submodule computes it (DSKD's running map
    normalisation, for one).
Anything else stays FP32. `keep_float` regexes move more nodes to the FP32 side.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger("lineinspect.engines.graph")

# Submodules of the model that are pre/post-processing, not a network.
HEAD_SCOPES = ("normalize", "blur")
# Op types that may run in FP16 / be quantised when they sit inside a network scope.
NETWORK_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "BatchNormalization",
        "Clip",
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Concat",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "Pad",
        "Reshape",
        "Flatten",
        "Transpose",
        "Identity",
        "Resize",
    }
)
# Ops that start the head: channel reductions of the discrepancy and what follows them.
HEAD_MARKERS = frozenset(
    {
        "ReduceSum",
        "ReduceMean",
        "ReduceMax",
        "ReduceMin",
        "ReduceL1",
        "ReduceL2",
        "ReduceSumSquare",
        "ReduceProd",
        "ReduceLogSumExp",
        "Pow",
        "Sqrt",
        "Reciprocal",
        "Softmax",
        "LpNormalization",
        "ArgMax",
        "TopK",
    }
)
# Inputs that are float32 whatever the node's compute type (ONNX type constraints).
FIXED_FLOAT_INPUTS = {"Resize": {1, 2}}  # roi, scales
# Op types INT8 quantises (Q/DQ on their activation and weight inputs).
QUANT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FP16_MAX = 65504.0


@dataclass
class Split:
    """Which nodes are network (may be lowered) and which stay FP32 (pre/post-processing)."""

    network: list[str]  # node names, graph order
    kept_float: list[str]  # node names, graph order

    def summary(self, model: onnx.ModelProto) -> dict:
        ops = {n.name: n.op_type for n in model.graph.node}
        kept: dict[str, int] = {}
        for name in self.kept_float:
            kept[ops[name]] = kept.get(ops[name], 0) + 1
        return {"network_nodes": len(self.network), "kept_float_ops": kept}


def clean(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """Constant folding and graph cleaning with onnxslim (Pad folded into Conv, Constant nodes
    become initializers, dead nodes removed). Returns (model, tool); tool is "" when onnxslim is
    not installed and the model is returned unchanged."""
    try:
        import onnxslim
    except ImportError:
        log.warning("onnxslim is not installed: exporting the graph without cleaning")
        return model, ""
    slim = onnxslim.slim(model)
    if slim is None:  # onnxslim returns None when it could not process the model
        log.warning("onnxslim could not process the graph: exporting it without cleaning")
        return model, ""
    return slim, f"onnxslim {getattr(onnxslim, '__version__', '?')}"


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant nodes (value tensors) -> initializers, so their dtype can be converted."""
    keep = []
    for node in model.graph.node:
        if (
            node.op_type == "Constant"
            and len(node.attribute) == 1
            and node.attribute[0].name == "value"
        ):
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            model.graph.initializer.append(t)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def split(model: onnx.ModelProto, keep_float: Iterable[str] = ()) -> Split:
    """Network vs kept-FP32 nodes; `keep_float` regexes (matched against node names) add more
    nodes to the FP32 side (for a model whose head lives in a submodule)."""
    pats = [re.compile(p) for p in keep_float]
    network, kept = [], []
    downstream: set[str] = set()  # tensors computed from a head marker
    for i, node in enumerate(model.graph.node):  # ONNX graphs are topologically sorted
        if not node.name:
            node.name = f"{node.op_type}_{i}"  # every node must be nameable in the manifest
        tainted = node.op_type in HEAD_MARKERS or any(t in downstream for t in node.input)
        if tainted:
            downstream.update(o for o in node.output if o)
        parts = node.name.split("/")
        in_net = (
            len(parts) >= 4
            and parts[1] == "model"
            and parts[2] not in HEAD_SCOPES
            and node.op_type in NETWORK_OPS
            and not tainted
            and not any(p.search(node.name) for p in pats)
        )
        (network if in_net else kept).append(node.name)
    if not network:
        raise ValueError(
            "no network nodes found (expected node names /model/<submodule>/..., as written by "
            "`engines export`); was this graph exported by another tool?"
        )
    return Split(network, kept)


def _float_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> elem_type, from shape inference, inputs, outputs and initializers."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types


def to_fp16(model: onnx.ModelProto, fp16_nodes: Iterable[str]) -> onnx.ModelProto:
    """Copy of `model` whose `fp16_nodes` compute in FP16; everything else, and the graph's
    inputs and outputs, keep their types. Cast nodes are inserted at every boundary, once per
    tensor. Float initializers read by FP16 nodes are converted (clipped to the FP16 range)."""
    model = constants_to_initializers(copy(model))
    g = model.graph
    fp16 = set(fp16_nodes)
    types = _float_types(model)
    inits = {i.name: i for i in g.initializer}
    produced_by_fp16 = {o for n in g.node if n.name in fp16 for o in n.output if o}
    graph_outputs = {o.name for o in g.output}

    new_inits: dict[str, str] = {}
    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            out = f"{name}__to_{'fp16' if to == TensorProto.FLOAT16 else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=out))
            casts[key] = out
        return casts[key]

    # Graph outputs computed in FP16: the producer writes <name>__fp16, a Cast restores <name>.
    renamed = {}
    for o in graph_outputs & produced_by_fp16:
        if types.get(o) == TensorProto.FLOAT:
            renamed[o] = f"{o}__fp16"
    for node in g.node:
        for i, name in enumerate(node.output):
            if name in renamed:
                node.output[i] = renamed[name]
        if node.name in fp16:
            for i, name in enumerate(node.input):
                if name in renamed:
                    node.input[i] = renamed[name]
    for o, r in renamed.items():
        new_nodes.append(
            helper.make_node("Cast", [r], [o], to=TensorProto.FLOAT, name=f"{o}__to_fp32")
        )
        produced_by_fp16.discard(o)
        produced_by_fp16.add(r)
        types[r] = TensorProto.FLOAT

    for node in g.node:
        lowered = node.name in fp16
        fixed = FIXED_FLOAT_INPUTS.get(node.op_type, set())
        for i, name in enumerate(node.input):
            if not name or types.get(name) != TensorProto.FLOAT:
                continue
            if lowered and i not in fixed:
                if name in inits:
                    if name not in new_inits:
                        arr = numpy_helper.to_array(inits[name])
                        half = np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16)
                        t = numpy_helper.from_array(half, f"{name}__fp16")
                        g.initializer.append(t)
                        new_inits[name] = t.name
                    node.input[i] = new_inits[name]
                elif name not in produced_by_fp16:
                    node.input[i] = cast(name, TensorProto.FLOAT16)
            elif name in produced_by_fp16:
                node.input[i] = cast(name, TensorProto.FLOAT)
        if lowered and node.op_type == "Cast":
            raise ValueError(f"node {node.name}: a Cast cannot be lowered to FP16")

    # Insert each Cast right after its producer keeps the graph topologically sorted.
    producer_pos = {o: k for k, n in enumerate(g.node) for o in n.output}
    order = sorted(
        [(k, 0, n) for k, n in enumerate(g.node)]
        + [(producer_pos.get(c.input[0], -1), 1, c) for c in new_nodes],
        key=lambda t: (t[0], t[1]),
    )
    del g.node[:]
    g.node.extend(n for _, _, n in order)
    # Drop initializers no longer read (the FP32 copies of converted weights).
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def io_types(model: onnx.ModelProto) -> dict[str, str]:
    """Input/output name -> ONNX type name, e.g. {'image': 'UINT8', 'score': 'FLOAT'}."""
    return {
        v.name: TensorProto.DataType.Name(v.type.tensor_type.elem_type)
        for v in [*model.graph.input, *model.graph.output]
    }
