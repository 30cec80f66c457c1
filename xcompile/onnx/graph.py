"""Reading and rewriting ONNX graphs of compiled policies: which matrix products read the
observation or write the action, weight-only int8 and fp16 weight rewrites of a QDQ graph, and
whether TensorRT can build a QDQ graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _nearest_products(model: Any, from_inputs: bool) -> list[str]:
    """Names of the MatMul/Gemm nodes met first when walking from the graph's inputs (forward)
    or from its outputs (backward); the walk stops at each one it meets. A recurrent policy's
    state inputs and outputs (its contract's `recurrent_state`) are not where the walk starts:
    the state is the network's own, not the observation or the action."""
    nodes = model.graph.node
    if from_inputs:
        nexts: dict[str, list[Any]] = {}
        for node in nodes:
            for name in node.input:
                nexts.setdefault(name, []).append(node)
        todo, onward = [i.name for i in model.graph.input], "output"
    else:
        nexts = {out: [node] for node in nodes for out in node.output}
        todo, onward = [o.name for o in model.graph.output], "input"
    state = _state_names(model)
    todo = [name for name in todo if name not in state]
    seen, found = set(), []
    while todo:
        for node in nexts.get(todo.pop(0), []):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in ("MatMul", "Gemm"):
                found.append(str(node.name))
            else:
                todo += list(getattr(node, onward))
    return found


def _state_names(model: Any) -> set[str]:
    """The graph inputs and outputs that carry a recurrent state (its contract says which; loading
    the policy checks that contract, here an unreadable one only means no names)."""
    import json

    from xcompile.onnx.recurrent import CONTRACT_KEY

    meta = {p.key: p.value for p in model.metadata_props}
    try:
        states = json.loads(meta[CONTRACT_KEY])["states"]
        return {str(st[k]) for st in states for k in ("input", "output")}
    except (KeyError, ValueError, TypeError):
        return set()


def output_layers(model: Any) -> list[str]:
    """Names of the matrix products that write the action with no other one in between.

    For an MLP that is its last layer; for a pinned fat network, the action head and the
    joint-state skip that is added to it.
    """
    return _nearest_products(model, from_inputs=False)


def input_layers(model: Any) -> list[str]:
    """Names of the matrix products that read the observation with no other one in between.

    The observation mixes quantities of very different scales (joint angles in rad, goal errors of
    a few cm, scaled velocities); under one int8 range for the whole vector the small ones round
    away. Keeping these products in float keeps the observation in float.
    """
    return _nearest_products(model, from_inputs=True)


def rename_in_nodes(graph: Any, old: str, new: str) -> None:
    """Every node input and output named `old` renamed `new` (graph inputs/outputs untouched)."""
    for node in graph.node:
        for i, n in enumerate(node.input):
            if n == old:
                node.input[i] = new
        for i, n in enumerate(node.output):
            if n == old:
                node.output[i] = new


def own_output_nodes(model: Any) -> Any:
    """`model` with every graph output that a node also reads (a recurrent policy's next state,
    which its head reads too) written by an Identity of its own: onnxconverter_common's fp16
    conversion with `keep_io_types` otherwise casts it where a node reads it and leaves that node
    with mixed types. Other graphs come back unchanged."""
    from onnx import helper  # heavy: only when a graph is rewritten

    g = model.graph
    read = {name for node in g.node for name in node.input}
    for name in [o.name for o in g.output if o.name in read]:
        inner = f"{name}__value"
        rename_in_nodes(g, name, inner)
        g.node.append(helper.make_node("Identity", [inner], [name], name=f"{name}__output"))
    return model


def drop_unused_opsets(model: Any) -> None:
    """Remove the opset imports of domains no node uses (quantize_static declares every contrib
    domain it knows)."""
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def weight_only(model: Any) -> Any:
    """`model` (QDQ) with every activation Q/DQ pair removed: int8 weights through their
    DequantizeLinear, float activations (W8A32). The unused scales and zero points go too."""
    import onnx  # heavy: only when a graph is rewritten

    inits = {t.name for t in model.graph.initializer}
    nodes = list(model.graph.node)
    # Activation Q -> DQ pairs (a Q that reads no initializer): each DQ output becomes the Q input.
    q_in = {n.output[0]: n.input[0] for n in nodes
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    rename = {n.output[0]: q_in[n.input[0]] for n in nodes
              if n.op_type == "DequantizeLinear" and n.input[0] in q_in}
    # Copies: protobuf hands out fresh wrappers on every access, so keep what we keep by value.
    keep = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes
            if n.output[0] not in q_in and n.output[0] not in rename]
    for n in keep:
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, name)
    for out in model.graph.output:    # a graph output a DQ wrote: now a copy of the float value
        if out.name in rename:
            keep.append(onnx.helper.make_node("Identity", [rename[out.name]], [out.name],
                                              name=f"{out.name}_float"))
    del model.graph.node[:]
    model.graph.node.extend(keep)
    used = {name for n in keep for name in n.input}
    unused = [t for t in model.graph.initializer if t.name not in used]
    for t in unused:
        model.graph.initializer.remove(t)
    return model


def fp16_weights(model: Any, names: list[str]) -> Any:
    """`model` with the float weights of the MatMul/Gemm nodes `names` stored in fp16 behind a
    Cast to float (which onnxruntime folds at load: fp32 arithmetic, half the bytes on disk).

    For the first layer of a weight-only model: its weights carry the folded observation
    normalisation (W / std), so their columns differ in scale as much as the observation entries
    do. int8 with one scale per tensor rounds the small ones away, and even one scale per input
    feature cost a1 0.999 -> 0.966 (action error 0.0075 vs 0.0020 in float); fp16 keeps 11
    significant bits in every entry."""
    import onnx  # heavy: only when a graph is rewritten
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.name not in names or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w_name = node.input[1]
        w = numpy_helper.to_array(inits[w_name]).astype(np.float16)
        model.graph.initializer.remove(inits[w_name])
        model.graph.initializer.append(numpy_helper.from_array(w, f"{w_name}_fp16"))
        node.input[1] = f"{w_name}_float"
        model.graph.node.insert(0, onnx.helper.make_node(
            "Cast", [f"{w_name}_fp16"], [node.input[1]], to=onnx.TensorProto.FLOAT,
            name=f"{w_name}_Cast"))
    return model


def tensorrt_ready(model: Any) -> list[str]:
    """Problems that keep TensorRT from building a QDQ model: [] when there are none.

    Every Q/DQ zero point must be an int8 0 (symmetric; a missing zero point means uint8), and no
    DequantizeLinear may read an int32 tensor (a quantized bias).
    """
    import onnx  # heavy: only when a graph is checked
    from onnx import numpy_helper

    consts = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = a.t
    problems = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) < 3 or not node.input[2]:
            problems.append(f"{node.op_type} {node.name!r} has no zero point (defaults to uint8)")
        elif node.input[2] not in consts:
            problems.append(f"{node.op_type} {node.name!r}: zero point is not a constant")
        else:
            zp = consts[node.input[2]]
            if zp.data_type != onnx.TensorProto.INT8:
                problems.append(f"{node.op_type} {node.name!r}: zero point is "
                                f"{onnx.TensorProto.DataType.Name(zp.data_type)}, not INT8")
            elif np.any(numpy_helper.to_array(zp) != 0):
                problems.append(f"{node.op_type} {node.name!r}: non-zero zero point "
                                "(asymmetric quantization)")
        if node.op_type == "DequantizeLinear":
            x = consts.get(node.input[0])
            if x is not None and x.data_type == onnx.TensorProto.INT32:
                problems.append(f"DequantizeLinear {node.name!r} reads int32 {node.input[0]!r} "
                                "(a quantized bias)")
    return problems
