"""ONNX graph of a slim policy -> a list of layers the C emitter prints (`fold`).

Constant subgraphs (Cast of fp16 initializers, DequantizeLinear of int8 ones, Transpose, Reshape and
elementwise arithmetic of constants) are folded in numpy; a DequantizeLinear weight stays integer
with its scales (`QConst`) so the C keeps int8 data. What is left must be one chain from `obs` to
`action` of dense products, elementwise constants, activations, QuantizeLinear -> DequantizeLinear
pairs and reshapes that are no-ops at batch 1; anything else is `UnsupportedModel`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from xcompile.cgen.layers import Act, Arith, Const, Dense, FakeQuant, QConst
from xcompile.errors import UnsupportedModel

ACTIVATIONS = {"Relu": "relu", "Elu": "elu", "Tanh": "tanh", "Sigmoid": "sigmoid",
               "LeakyRelu": "leaky_relu", "Clip": "clip"}
ARITH = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}
RESHAPES = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity")
SUPPORTED = ("Gemm", "MatMul", *ARITH, *ACTIVATIONS, "QuantizeLinear", "DequantizeLinear", "Cast",
             "Constant", *RESHAPES)
SUPPORTED_TEXT = ("Gemm/MatMul with constant weights, Add/Sub/Mul/Div by a constant, Relu, Elu, "
                  "Tanh, Sigmoid, LeakyRelu, Clip, QuantizeLinear/DequantizeLinear, Cast, "
                  "Flatten/Reshape/Squeeze/Unsqueeze/Identity")
MAX_WEIGHTS = 4 << 20     # constants in one policy: a slim policy has tens of thousands
MAX_WIDTH = 1 << 16       # features of one activation (two such buffers go on the stack)
QRANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255),
          np.dtype(np.int16): (-32768, 32767), np.dtype(np.uint16): (0, 65535)}


def refuse(what: str) -> UnsupportedModel:
    return UnsupportedModel(f"emit-c compiles dense feed-forward policies ({SUPPORTED_TEXT}); "
                            f"{what}: distill it to an MLP first (the default plan does)")


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _fold_const(node: Any, ins: list[Any]) -> Any:
    """Value of a node whose inputs are all constant, or None when it is not one we fold."""
    from onnx import TensorProto, helper, numpy_helper
    op, at = node.op_type, _attrs(node)
    if op == "Constant":
        if "value" in at:
            return Const(numpy_helper.to_array(at["value"]), "fp32")
        for key, dt in (("value_float", np.float32), ("value_floats", np.float32),
                        ("value_int", np.int64), ("value_ints", np.int64)):
            if key in at:
                return Const(np.asarray(at[key], dtype=dt), "fp32")
        return None
    if op == "DequantizeLinear":
        q = ins[0]
        if (not isinstance(q, Const) or q.arr.dtype.kind not in "iu" or at.get("block_size", 0)
                or len(ins) < 2 or not isinstance(ins[1], Const)):
            return None
        zp = ins[2].arr if len(ins) > 2 and isinstance(ins[2], Const) else np.zeros((), q.arr.dtype)
        scale = ins[1].arr.astype(np.float32)
        axis = int(at.get("axis", 1)) % max(q.arr.ndim, 1)
        return QConst(q.arr, scale, zp, axis)
    if any(isinstance(v, QConst) for v in ins) and op == "Transpose":
        v = ins[0]
        perm = at.get("perm", list(range(v.q.ndim))[::-1])
        return QConst(np.transpose(v.q, perm), v.scale, v.zp, list(perm).index(v.axis))
    vals = [v.value() if isinstance(v, QConst) else v.arr for v in ins]
    origin = "fp32"
    if op == "Cast":
        to = helper.tensor_dtype_to_np_dtype(at["to"])
        if at["to"] == TensorProto.FLOAT and isinstance(ins[0], Const) and ins[0].origin == "fp16":
            origin = "fp16"
        elif at["to"] == TensorProto.FLOAT and vals[0].dtype == np.float16:
            origin = "fp16"
        return Const(vals[0].astype(to), origin)
    if op == "Identity":
        return ins[0] if isinstance(ins[0], Const) else Const(vals[0], "fp32")
    if op == "Transpose":
        return Const(np.transpose(vals[0], at.get("perm")), ins[0].origin)
    if op in ARITH:
        if np.prod(np.broadcast_shapes(*(v.shape for v in vals)), dtype=float) > MAX_WEIGHTS:
            return None
        fn = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[ARITH[op]]
        with np.errstate(all="ignore"):
            return Const(np.asarray(fn(vals[0], vals[1])).astype(vals[0].dtype), "fp32")
    if op == "Neg":
        return Const(-vals[0], "fp32")
    if op == "Reshape":
        return Const(vals[0].reshape([d if d != 0 else vals[0].shape[i]
                                      for i, d in enumerate(vals[1].tolist())]), ins[0].origin)
    if op in ("Squeeze", "Unsqueeze"):
        axes = at.get("axes", vals[1].tolist() if len(vals) > 1 else None)
        if op == "Squeeze":
            return Const(np.squeeze(vals[0], tuple(axes) if axes is not None else None),
                         ins[0].origin)
        out = vals[0]
        for a in sorted(a % (out.ndim + len(axes)) for a in axes):
            out = np.expand_dims(out, a)
        return Const(out, ins[0].origin)
    return None


def _io(model: Any, consts: dict[str, Any]) -> tuple[str, str, int, int | None]:
    from onnx import TensorProto
    inputs = [i for i in model.graph.input if i.name not in consts]
    outputs = list(model.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise refuse(f"this graph has {len(inputs)} inputs and {len(outputs)} outputs, not one "
                     f"observation input and one action output")
    dims = []
    for v, role in ((inputs[0], "input"), (outputs[0], "output")):
        t = v.type.tensor_type
        if not v.type.HasField("tensor_type") or t.elem_type != TensorProto.FLOAT:
            raise refuse(f"its {role} {v.name!r} is not a float32 tensor")
        d = [x.dim_value if x.HasField("dim_value") else None for x in t.shape.dim]
        dims.append(d)
    obs_dims, act_dims = dims
    if not 1 <= len(obs_dims) <= 2 or not obs_dims[-1] or obs_dims[-1] > MAX_WIDTH:
        raise refuse(f"its input {inputs[0].name!r} has shape {obs_dims}, not [batch, obs_dim] "
                     f"with a fixed obs_dim")
    return inputs[0].name, outputs[0].name, int(obs_dims[-1]), act_dims[-1] if act_dims else None


def _const_vector(v: Any, width: int, what: str) -> np.ndarray:
    """A constant that broadcasts along the last axis only: () or (width,), float32."""
    arr = v.value() if isinstance(v, QConst) else v.arr
    if arr.dtype != np.float32:
        raise refuse(f"{what} is a {arr.dtype} constant, not float32")
    if arr.size == 1:
        return arr.reshape(()).astype(np.float32)
    if arr.shape[-1] != width or arr.size != width:
        raise refuse(f"{what} has shape {list(arr.shape)}, which does not broadcast along the "
                     f"features (width {width}) alone")
    return arr.reshape(width).astype(np.float32)


def _dense(node: Any, at: dict[str, Any], w: Any, bias: Any, width: int) -> Dense:
    """A Gemm/MatMul with constant weight `w` on an activation of `width` features."""
    name = f"{node.op_type} {node.name!r}"
    if at.get("transA", 0):
        raise refuse(f"{name} transposes its activation input (transA=1)")
    trans = bool(at.get("transB", 0))
    arr = w.q if isinstance(w, QConst) else w.arr
    if arr.ndim != 2:
        raise refuse(f"{name} has a weight of rank {arr.ndim}, not a matrix")
    k, n = arr.shape[::-1] if trans else arr.shape
    if k != width:
        raise refuse(f"{name} takes {k} features but its input has {width}")
    scale, axis, kind = None, "", "fp32"
    if isinstance(w, QConst):
        zp = w.zp.astype(np.int64)
        if w.scale.size > 1 or zp.size > 1:
            rows = trans ^ (w.axis == 0)   # per-axis along the input features?
            axis_len = arr.shape[w.axis]
            if w.scale.size not in (1, axis_len) or zp.size not in (1, axis_len):
                raise refuse(f"{name} dequantizes its weight with {w.scale.size} scales and "
                             f"{zp.size} zero points along an axis of {axis_len}")
            shape = [1, 1]
            shape[w.axis] = axis_len
            zp = zp.reshape(shape) if zp.size > 1 else zp.reshape(())
            scale = w.scale.reshape(-1) if w.scale.size > 1 else w.scale.reshape(())
            axis = ("out" if not rows else "in") if w.scale.size > 1 else "tensor"
        else:
            zp, scale, axis = zp.reshape(()), w.scale.reshape(()), "tensor"
        vals = arr.astype(np.int64) - zp
        kind = str(arr.dtype)
        if vals.min(initial=0) >= -128 and vals.max(initial=0) <= 127:
            data = vals.astype(np.int8)
        elif vals.min(initial=0) >= -32768 and vals.max(initial=0) <= 32767:
            data = vals.astype(np.int16)
        else:    # wider than int16 (int32 weights): dequantize
            data, scale, axis, kind = w.value(), None, "", "fp32"
        scale = None if scale is None else scale.astype(np.float32)
    else:
        data, kind = arr.astype(np.float32), w.origin
        if arr.dtype != np.float32:
            raise refuse(f"{name} has a {arr.dtype} weight, not float32")
    data = np.ascontiguousarray(data.T if trans else data)
    b = None
    if bias is not None:
        barr = _const_vector(bias, n, f"the bias of {name}")
        beta = np.float32(at.get("beta", 1.0))
        b = np.broadcast_to(barr * beta if beta != 1 else barr, (n,)).astype(np.float32)
    return Dense(k, n, data, kind, scale, axis, b, float(np.float32(at.get("alpha", 1.0))))


def _reshape_width(node: Any, at: dict[str, Any], ins: list[Any], rank: int,
                   width: int) -> int:
    """The rank after a reshape-like node that keeps the `width` features of one row, with every
    other dimension 1 (batch 1); refuse one that moves features into other dimensions."""
    op = node.op_type
    dims = [1] * (rank - 1) + [width]
    if op == "Identity":
        return rank
    if op == "Flatten":
        ax = int(at.get("axis", 1)) % (rank + 1)
        out = [int(np.prod(dims[:ax])), int(np.prod(dims[ax:]))]
    elif op == "Reshape":
        shape = [int(x) for x in ins[1].arr.reshape(-1)] if len(ins) > 1 else []
        out = [dims[i] if d == 0 and not at.get("allowzero", 0) and i < rank else d
               for i, d in enumerate(shape)]
        if out.count(-1) == 1:
            known = int(np.prod([d for d in out if d != -1]))
            out = [width // known if d == -1 and known and width % known == 0 else d for d in out]
    else:
        axes = at.get("axes")
        if axes is None and len(ins) > 1:
            axes = [int(x) for x in ins[1].arr.reshape(-1)]
        if op == "Squeeze":
            axes = [a % rank for a in axes] if axes is not None else [
                i for i, d in enumerate(dims) if d == 1]
            out = [d for i, d in enumerate(dims) if i not in axes]
        else:
            out = list(dims)
            for a in sorted(a % (rank + len(axes)) for a in axes):
                out.insert(a, 1)
    if int(np.prod(out)) != width or not out or out[-1] != width:
        raise refuse(f"{op} {node.name!r} gives shape {out} for one row of {width} features: "
                     f"only reshapes that are no-ops at batch 1 are supported")
    return len(out)


def fold(model: Any) -> tuple[list[Any], int, int]:
    """(layers, obs_dim, act_dim) of `model`; UnsupportedModel when it is no dense chain."""
    from onnx import numpy_helper
    g = model.graph
    consts: dict[str, Any] = {}
    for t in g.initializer:
        arr = numpy_helper.to_array(t)
        consts[t.name] = Const(arr, "fp16" if arr.dtype == np.float16 else "fp32")
    dyn = []
    for node in g.node:
        ins = [i for i in node.input if i]
        if node.domain not in ("", "ai.onnx") or any(i not in consts for i in ins) or \
                node.op_type not in SUPPORTED + ("Transpose", "Neg"):
            dyn.append(node)
            continue
        try:
            val = _fold_const(node, [consts[i] for i in ins])
        except (ValueError, TypeError, IndexError, KeyError):   # let the chain walk report it
            val = None
        if val is None:
            dyn.append(node)
        else:
            consts[node.output[0]] = val
    bad = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                  for n in dyn if n.op_type not in SUPPORTED or n.domain not in ("", "ai.onnx"))
    if bad:
        raise refuse("this graph has " + ", ".join(f"{op} x{c}" for op, c in sorted(
            bad.items(), key=lambda kv: (-kv[1], kv[0]))))
    obs, action, obs_dim, act_decl = _io(model, consts)
    users: dict[str, list[Any]] = {}
    for node in dyn:
        for name in {i for i in node.input if i and i not in consts}:
            users.setdefault(name, []).append(node)
    layers: list[Any] = []
    cur, width = obs, obs_dim
    rank = next(len(i.type.tensor_type.shape.dim) for i in g.input if i.name == obs)
    seen: set[int] = set()
    while cur != action:
        nxt = users.get(cur, [])
        if len(nxt) == 1 and id(nxt[0]) in seen:
            raise refuse(f"the graph has a cycle through {cur!r}")
        if len(nxt) != 1:
            raise refuse(f"the value {cur!r} feeds {len(nxt)} nodes, not a chain to the action")
        node = nxt[0]
        seen.add(id(node))
        op, at = node.op_type, _attrs(node)
        ins = [consts.get(i) if i else None for i in node.input]
        dyn_in = [i for i, name in enumerate(node.input) if name and name not in consts]
        if len(dyn_in) != 1 or len([o for o in node.output if o]) != 1:
            raise refuse(f"{op} {node.name!r} combines {len(dyn_in)} activations "
                         f"(not one activation and constants)")
        if op in ("Gemm", "MatMul"):
            if dyn_in != [0]:
                raise refuse(f"{op} {node.name!r} takes an activation as its weight")
            layers.append(_dense(node, at, ins[1], ins[2] if len(ins) > 2 else None, width))
            width = layers[-1].n
        elif op in ARITH:
            c = _const_vector(ins[1 - dyn_in[0]], width, f"the constant of {op} {node.name!r}")
            prev = layers[-1] if layers else None
            if (op == "Add" and isinstance(prev, Dense) and prev.bias is None
                    and prev.act is None):
                prev.bias = np.broadcast_to(c, (width,)).astype(np.float32)
            else:
                layers.append(Arith(ARITH[op], width, c, dyn_in[0] == 1))
        elif op in ACTIVATIONS:
            lo = hi = None
            if op == "Clip":
                lo, hi = at.get("min"), at.get("max")
                if len(ins) > 1 and ins[1] is not None:
                    lo = float(ins[1].arr.reshape(()))
                if len(ins) > 2 and ins[2] is not None:
                    hi = float(ins[2].arr.reshape(()))
            alpha = at.get("alpha", {"Elu": 1.0, "LeakyRelu": 0.01}.get(op, 0.0))
            act = Act(ACTIVATIONS[op], width, float(np.float32(alpha)), lo, hi)
            prev = layers[-1] if layers else None
            if isinstance(prev, Dense) and prev.act is None:
                prev.act = act
            else:
                layers.append(act)
        elif op == "QuantizeLinear":
            layers.append(_fake_quant(node, at, ins, users, consts, width))
            node = users[node.output[0]][0]
            seen.add(id(node))
        elif op in RESHAPES:
            rank = _reshape_width(node, at, ins, rank, width)
        elif op == "Cast" and at.get("to") == 1:   # float -> float: a copy
            pass
        else:
            raise refuse(f"{op} {node.name!r} reads an activation")
        cur = node.output[0]
        if width > MAX_WIDTH:
            raise refuse(f"an activation has {width} features (more than {MAX_WIDTH}); this is "
                         f"no slim policy")
    n_weights = sum(la.w.size for la in layers if isinstance(la, Dense))
    if n_weights > MAX_WEIGHTS:
        raise refuse(f"this graph has {n_weights} weights (more than {MAX_WEIGHTS}), too many "
                     f"for a slim policy")
    if act_decl and act_decl != width:
        raise refuse(f"the output {action!r} is declared with {act_decl} features but the graph "
                     f"computes {width}")
    return layers, obs_dim, width


def _fake_quant(node: Any, at: dict[str, Any], ins: list[Any], users: dict[str, list[Any]],
                consts: dict[str, Any], width: int) -> FakeQuant:
    """A QuantizeLinear on an activation and the one DequantizeLinear that reads it."""
    name = f"QuantizeLinear {node.name!r}"
    nxt = users.get(node.output[0], [])
    if len(nxt) != 1 or nxt[0].op_type != "DequantizeLinear" or nxt[0].input[0] != node.output[0]:
        raise refuse(f"{name} is not followed by exactly one DequantizeLinear")
    dq = nxt[0]
    dq_ins = [consts.get(i) if i else None for i in dq.input]
    if (any(i and i not in consts for i in dq.input[1:]) or len(ins) < 2 or
            not isinstance(ins[1], Const) or not isinstance(dq_ins[1], Const)):
        raise refuse(f"{name} or its DequantizeLinear has a non-constant scale")
    zq = ins[2].arr if len(ins) > 2 and ins[2] is not None else np.zeros((), np.uint8)
    zd = dq_ins[2].arr if len(dq_ins) > 2 and dq_ins[2] is not None else np.zeros((), np.uint8)
    if ins[1].arr.size != 1 or dq_ins[1].arr.size != 1 or zq.size != 1 or zd.size != 1:
        raise refuse(f"{name} quantizes an activation per channel (only per tensor is supported)")
    if zq.dtype not in QRANGE or zd.dtype != zq.dtype:
        raise refuse(f"{name} quantizes to {zq.dtype} (int8, uint8, int16 or uint16 are supported)")
    qmin, qmax = QRANGE[zq.dtype]
    z1, z2 = int(zq.reshape(())), int(zd.reshape(()))
    return FakeQuant(width, float(ins[1].arr.astype(np.float32).reshape(())), qmin - z1,
                     qmax - z1, float(z1 - z2),
                     float(dq_ins[1].arr.astype(np.float32).reshape(())), str(zq.dtype))
