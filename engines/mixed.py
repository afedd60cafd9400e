"""Automatic mixed precision for the INT8 graph: keep the layers that move the map most in float.

Found by measurement on good images, not by hand:

1. Sensitivity: for every quantised layer L, the graph in which *only* L is quantised (every
   other node reads float tensors again) is run against FP32 on a few held-out good images; L's
   sensitivity is the decision-level error that alone causes (engines.qcheck: score and map
   error in units of the threshold margins). One quantisation, then graph surgery: no
   re-calibration per layer, so ranking 80 layers costs about a minute on a CPU.
2. Search: keep the top 1, 2, 4, ... layers in float (again by surgery on the same calibrated
   graph) until the whole check passes.

Taking a layer's Q/DQ out means: its input reads the float tensor the QuantizeLinear read, and
its weight input is the FP32 graph's initializer again. Dangling Q/DQ nodes and initializers
are pruned so the result is a clean graph TensorRT builds as written.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from engines import graph, qcheck


def dequantize_layers(
    int8: onnx.ModelProto, fp32: onnx.ModelProto, keep: set[str] | list[str]
) -> onnx.ModelProto:
    """Copy of the Q/DQ graph in which only the layers `keep` read quantised inputs: every other
    node reads the float tensors again (see the module doc). A node outside `keep` may read a
    DequantizeLinear too (ONNX Runtime quantises a tensor once for all its consumers), so every
    node is rewired, not only the layers taken out: with `keep` empty this is the FP32 graph."""
    keep = set(keep)
    m = graph.copy(int8)
    producer = {o: n for n in m.graph.node for o in n.output}
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    fp32_inits = {i.name: i for i in fp32.graph.initializer}
    have = {i.name for i in m.graph.initializer}
    for node in m.graph.node:
        if node.name in keep or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for k, src in enumerate(node.input):
            dq = producer.get(src)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]  # activation: the float tensor before Q/DQ
            else:  # a weight: the FP32 graph's initializer under its own name
                name = fp32_nodes[node.name].input[k]
                node.input[k] = name
                if name not in have:
                    m.graph.initializer.append(fp32_inits[name])
                    have.add(name)
    return prune(m)


def prune(m: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes whose outputs nobody reads, and initializers no node reads (in place)."""
    outputs = {o.name for o in m.graph.output}
    while True:
        used = outputs | {i for n in m.graph.node for i in n.input}
        dead = [n for n in m.graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            m.graph.node.remove(n)
    used = {i for n in m.graph.node for i in n.input}
    for init in [i for i in m.graph.initializer if i.name not in used]:
        m.graph.initializer.remove(init)
    return m


def _run(m: onnx.ModelProto, files, size, batch):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        onnx.save(m, str(path))
        return qcheck.run_graph(path, files, size, batch)


def layer_sensitivity(
    int8: onnx.ModelProto,
    fp32: onnx.ModelProto,
    layers: list[str],
    ref: qcheck.Reference,
    files: list[Path],
    size: tuple[int, int],
    batch: int,
    budget: qcheck.Budget,
) -> list[tuple[str, float]]:
    """[(layer, error when only it is quantised)], largest first. `ref` must be the FP32
    reference on exactly `files`."""
    out = []
    for name in layers:
        alone = dequantize_layers(int8, fp32, {name})
        c = ref.compare("int8", *_run(alone, files, size, batch), budget)
        out.append((name, max(c.score_error, c.map_error)))
    return sorted(out, key=lambda kv: -kv[1])


def search(
    int8: onnx.ModelProto,
    fp32: onnx.ModelProto,
    layers: list[str],
    ref: qcheck.Reference,
    probe: qcheck.Reference,
    size: tuple[int, int],
    batch: int,
    budget: qcheck.Budget,
    log=None,
) -> tuple[onnx.ModelProto, list[str], list[dict]]:
    """Keep the most sensitive 1, 2, 4, ... layers in float until `ref`'s check passes.

    Args:
        ref: the FP32 reference on all held-out images (the check that must pass).
        probe: the FP32 reference on a few of them (the per-layer ranking).
    Returns:
        (graph, layers kept in float, one dict of check figures per try).
    """
    ranked = [
        n for n, _ in layer_sensitivity(int8, fp32, layers, probe, probe.files, size, batch, budget)
    ]
    tries, k = [], 1
    while True:
        kept = ranked[: min(k, len(ranked))]
        g = dequantize_layers(int8, fp32, set(ranked) - set(kept))
        c = ref.compare("int8", *_run(g, ref.files, size, batch), budget)
        tries.append({"float_layers": len(kept), **c.as_dict()})
        if log is not None:
            log.info("int8 with %d sensitive layers in float: %s", len(kept), c.line())
        if c.passed or len(kept) >= len(ranked):
            return g, kept, tries
        k *= 2
