"""Layers (`xcompile.cgen.graph`) -> the text of policy.c: static const weights, one static
function per layer with its sizes as literals, and the API functions.

Dense layers keep their weight as [in][out], so the inner loop runs over output channels with
independent accumulators and gcc vectorises it without -ffast-math; int8 weights are accumulated
as float (q - zero_point) * x, then scaled (per tensor, per output channel) once at the end, or
the input is scaled first (per input channel). Every float is printed as the shortest decimal
that reads back to the same float32, so the same layers always give the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from xcompile.cgen.layers import Act, Arith, Dense, FakeQuant
from xcompile.errors import UnsupportedModel

EMITTER_VERSION = 1
UNROLL = 4   # input rows per pass of a dense layer's inner loop (a1, gcc -O2: 4.0 vs 4.5 µs for 1)
_CTYPE = {np.dtype(np.float32): "float", np.dtype(np.int8): "int8_t",
          np.dtype(np.int16): "int16_t"}


def c_float(v: Any) -> str:
    """A C float literal that reads back as exactly float32(v) (shortest round-trip digits)."""
    f = np.float32(v)
    if not np.isfinite(f):
        raise UnsupportedModel(f"emit-c: the graph holds a non-finite constant ({f}); it cannot "
                               f"be a C constant of a working policy")
    a = abs(float(f))
    if a == 0.0 or 1e-4 <= a < 1e7:
        s = np.format_float_positional(f, unique=True, trim="0")
    else:
        s = np.format_float_scientific(f, unique=True, trim="0")
    return s + "f"


def c_comment(text: str) -> str:
    """`text` made safe inside /* */: printable ASCII only, no comment delimiters."""
    s = "".join(ch if " " <= ch <= "~" else "?" for ch in str(text))
    while "*/" in s or "/*" in s:
        s = s.replace("*/", "* /").replace("/*", "/ *")
    return s


def _array(ctype: str, name: str, values: Iterable[str], n: int, note: str) -> list[str]:
    lines = [f"/* {note} */", f"static const {ctype} {name}[{n}] = {{"]
    row: list[str] = []
    width = 4
    for v in values:
        if row and width + len(v) + 2 > 100:
            lines.append("    " + ", ".join(row) + ",")
            row, width = [], 4
        row.append(v)
        width += len(v) + 2
    if row:
        lines.append("    " + ", ".join(row))
    lines.append("};")
    return lines


def _values(arr: np.ndarray) -> list[str]:
    flat = arr.reshape(-1)
    if arr.dtype == np.float32:
        return [c_float(v) for v in flat]
    return [str(int(v)) for v in flat]


def _act_expr(act: Act | None, v: str) -> str:
    if act is None:
        return v
    a = c_float(act.alpha)
    if act.fn == "relu":
        return f"{v} > 0.0f ? {v} : 0.0f"
    if act.fn == "elu":
        scaled = "" if act.alpha == 1.0 else f"{a} * "
        return f"xc_max0({v}) + {scaled}(xc_exp(xc_min0({v})) - 1.0f)"
    if act.fn == "tanh":
        return f"tanhf({v})"
    if act.fn == "sigmoid":
        return f"1.0f / (1.0f + xc_exp(-{v}))"
    if act.fn == "leaky_relu":
        return f"{v} >= 0.0f ? {v} : {a} * {v}"
    expr = v
    if act.hi is not None:
        expr = f"({v} > {c_float(act.hi)} ? {c_float(act.hi)} : {v})"
    if act.lo is not None:
        expr = f"{v} < {c_float(act.lo)} ? {c_float(act.lo)} : {expr}"
    return expr


def _act_name(act: Act | None) -> str:
    if act is None:
        return ""
    if act.fn in ("elu", "leaky_relu") and act.alpha != np.float32(
            1.0 if act.fn == "elu" else 0.01):
        return f"{act.fn}(alpha={c_float(act.alpha)[:-1]})"
    if act.fn == "clip":
        lo = "-inf" if act.lo is None else c_float(act.lo)[:-1]
        hi = "inf" if act.hi is None else c_float(act.hi)[:-1]
        return f"clip({lo}, {hi})"
    return act.fn


def describe(layer: Any) -> dict[str, Any]:
    """A JSON-able description of one layer."""
    if isinstance(layer, Dense):
        d: dict[str, Any] = {"op": "dense", "in": layer.k, "out": layer.n,
                             "weights": layer.weights, "storage": _CTYPE[layer.w.dtype]}
        if layer.scale is not None:
            d["scale"] = {"tensor": "per-tensor", "out": "per-output",
                          "in": "per-input"}[layer.scale_axis]
        d["bias"] = layer.bias is not None
        if layer.alpha != 1.0:
            d["alpha"] = layer.alpha
        if layer.act is not None:
            d["activation"] = _act_name(layer.act)
        return d
    if isinstance(layer, Act):
        return {"op": "activation", "activation": _act_name(layer), "width": layer.width}
    if isinstance(layer, Arith):
        return {"op": "elementwise", "fn": layer.fn, "width": layer.width,
                "const": "scalar" if layer.const.ndim == 0 else "vector",
                "const_first": layer.const_first}
    assert isinstance(layer, FakeQuant)
    return {"op": "fake_quant", "width": layer.width, "qtype": layer.qtype,
            "scale": float(c_float(layer.scale)[:-1]), "range": [layer.lo, layer.hi]}


def summary(layer: Any) -> str:
    """One line about a layer, for the comment at the top of policy.c."""
    if isinstance(layer, Dense):
        w = {"fp16": "fp16 weights (stored as float)", "fp32": "float weights"}.get(
            layer.weights, f"{layer.weights} weights")
        if layer.scale is not None:
            w += f", {describe(layer)['scale']} scale"
        extra = [w] + (["bias"] if layer.bias is not None else []) + (
            [f"alpha {c_float(layer.alpha)[:-1]}"] if layer.alpha != 1.0 else []) + (
            [_act_name(layer.act)] if layer.act else [])
        return f"dense {layer.k} -> {layer.n}: " + ", ".join(extra)
    if isinstance(layer, Act):
        return f"{_act_name(layer)} on {layer.width}"
    if isinstance(layer, Arith):
        what = "a scalar" if layer.const.ndim == 0 else "a vector"
        return (f"{layer.fn} {what} on {layer.width}"
                + (" (constant first)" if layer.const_first else ""))
    return (f"{layer.qtype} quantize -> dequantize on {layer.width}, "
            f"scale {c_float(layer.scale)[:-1]}")


def _dense(i: int, d: Dense) -> tuple[list[str], list[str], int]:
    """(data lines, function lines, data bytes) of dense layer `i`."""
    ctype = _CTYPE[d.w.dtype]
    what = {"fp16": "fp16 values stored as float", "fp32": "float"}.get(
        d.weights, f"{d.weights} weights, zero point folded in")
    data = _array(ctype, f"xc_w{i}", _values(d.w), d.w.size,
                  f"layer {i}: weight [{d.k} in][{d.n} out], {what}")
    nbytes = d.w.nbytes
    scale_j = ""
    xi = "x[i]"
    if d.scale is not None and d.scale.ndim == 0:
        scale_j = f" * {c_float(d.scale)}"
    elif d.scale is not None:
        data += _array("float", f"xc_s{i}", _values(d.scale), d.scale.size,
                       f"layer {i}: scale per {'output' if d.scale_axis == 'out' else 'input'}")
        nbytes += d.scale.nbytes
        if d.scale_axis == "out":
            scale_j = f" * xc_s{i}[j]"
        else:
            xi = f"x[i] * xc_s{i}[i]"
    if d.alpha != 1.0:
        scale_j += f" * {c_float(d.alpha)}"
    bias = ""
    if d.bias is not None:
        data += _array("float", f"xc_b{i}", _values(d.bias), d.n, f"layer {i}: bias")
        nbytes += d.bias.nbytes
        bias = f" + xc_b{i}[j]"
    cast = "" if ctype == "float" else "(float)"
    fn = [f"/* layer {i}: dense {d.k} -> {d.n}{', ' + _act_name(d.act) if d.act else ''} */",
          f"static void xc_layer{i}(const float *restrict x, float *restrict y)", "{",
          "    int i, j;",
          f"    for (j = 0; j < {d.n}; ++j) {{", "        y[j] = 0.0f;", "    }"]
    # UNROLL input rows a pass over y: the same additions in the same order as one row a pass
    # (so the same rounding), with fewer loads and stores of y.
    full = d.k // UNROLL * UNROLL if UNROLL > 1 else 0
    if full:
        xs = ", ".join(f"x{u} = {xi.replace('[i]', f'[i + {u}]' if u else '[i]')}"
                       for u in range(UNROLL))
        fn += [f"    for (i = 0; i < {full}; i += {UNROLL}) {{", f"        const float {xs};",
               f"        const {ctype} *w0 = xc_w{i} + i * {d.n};",
               *(f"        const {ctype} *w{u} = w{u - 1} + {d.n};" for u in range(1, UNROLL)),
               f"        for (j = 0; j < {d.n}; ++j) {{",
               "            y[j] = y[j] + " + " + ".join(
                   f"x{u} * {cast}w{u}[j]" for u in range(UNROLL)) + ";", "        }", "    }"]
    if full < d.k:
        fn += [f"    for (i = {full}; i < {d.k}; ++i) {{",
               f"        const float xi = {xi};",
               f"        const {ctype} *w = xc_w{i} + i * {d.n};",
               f"        for (j = 0; j < {d.n}; ++j) {{",
               f"            y[j] += xi * {cast}w[j];", "        }", "    }"]
    if scale_j or bias or d.act is not None:
        fn += [f"    for (j = 0; j < {d.n}; ++j) {{",
               f"        const float v = y[j]{scale_j}{bias};",
               f"        y[j] = {_act_expr(d.act, 'v')};", "    }"]
    fn.append("}")
    return data, fn, nbytes


def _elementwise(i: int, layer: Any) -> tuple[list[str], list[str], int]:
    """(data lines, function lines, data bytes) of an activation, arithmetic or fake-quant op;
    `x` and `y` may be the same buffer."""
    data: list[str] = []
    nbytes = 0
    if isinstance(layer, Act):
        note, body = _act_name(layer), [f"        y[i] = {_act_expr(layer, 'v')};"]
    elif isinstance(layer, Arith):
        if layer.const.ndim == 0:
            c = c_float(layer.const)
        else:
            data = _array("float", f"xc_c{i}", _values(layer.const), layer.width,
                          f"layer {i}: {layer.fn} constant")
            nbytes, c = layer.const.nbytes, f"xc_c{i}[i]"
        sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[layer.fn]
        expr = f"{c} {sym} v" if layer.const_first else f"v {sym} {c}"
        note, body = f"{layer.fn} {'vector' if layer.const.ndim else 'scalar'}", [
            f"        y[i] = {expr};"]
    else:
        q = layer
        qv = f"xc_quantize(v / {c_float(q.scale)}, {q.lo}, {q.hi})"
        if q.shift:
            qv = f"({qv} + {c_float(q.shift)})"
        note = f"{q.qtype} quantize -> dequantize, scale {c_float(q.scale)[:-1]}"
        body = [f"        y[i] = {qv} * {c_float(q.dq_scale)};"]
    fn = [f"/* layer {i}: {c_comment(note)}, width {layer.width} */",
          f"static void xc_layer{i}(const float *x, float *y)", "{", "    int i;",
          f"    for (i = 0; i < {layer.width}; ++i) {{", "        const float v = x[i];",
          *body, "    }", "}"]
    return data, fn, nbytes


HELPERS = {
    "bits": """\
/* Float bit patterns, for the helpers below (C99 allows reading another union member). */
typedef union {
    float f;
    uint32_t u;
} xc_bits;
""",
    "quantize": """\
/* QuantizeLinear of v = x / scale, less the zero point: round to nearest, ties to even, then
 * saturate to [lo, hi] (qmin - zero_point, qmax - zero_point). |v| is first limited to 2^22,
 * below which adding 1.5 * 2^23 leaves no fraction bits, so the FPU's rounding (the default mode,
 * to nearest, ties to even, as onnxruntime's) does it; the integer is read back from the bits.
 * No libm, no branches: gcc vectorises the loops that call it. */
static inline float xc_quantize(float v, int32_t lo, int32_t hi)
{
    xc_bits a, t;
    int32_t mag, q;
    a.f = v;
    mag = (int32_t)(a.u & 0x7fffffffu);
    mag = mag < 0x4a800000 ? mag : 0x4a800000;
    a.u = (a.u & 0x80000000u) | (uint32_t)mag;
    t.f = a.f + 12582912.0f;
    q = (int32_t)(t.u - 0x4b400000u);
    q = q < lo ? lo : q;
    q = q > hi ? hi : q;
    return (float)q;
}
""",
    "exp": """\
/* exp(v) within 1 ulp of expf (Cephes' polynomial), |v| limited to 87.34 (NaN stays NaN):
 * v = n ln 2 + r, exp(r) by a degree-7 polynomial on |r| <= ln 2 / 2, times 2^n built from its
 * bits. No libm and no branches, so gcc vectorises the loops that call it. */
static inline float xc_exp(float v)
{
    xc_bits a, t, s;
    int32_t mag;
    float n, r, p;
    a.f = v;
    mag = (int32_t)(a.u & 0x7fffffffu);
    mag = mag < 0x42aeac50 ? mag : (mag > 0x7f800000 ? mag : 0x42aeac50);
    a.u = (a.u & 0x80000000u) | (uint32_t)mag;
    t.f = a.f * 1.44269504f + 12582912.0f;
    n = (float)(int32_t)(t.u - 0x4b400000u);
    r = a.f - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r
          + 4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    s.u = (t.u - 0x4b400000u + 127u) << 23;
    return p * s.f;
}
""",
    "min0": """\
/* min(v, 0) and max(v, 0) by the sign bit (-0 counts as negative): no branch. */
static inline float xc_min0(float v)
{
    xc_bits a;
    a.f = v;
    a.u &= 0u - (a.u >> 31);
    return a.f;
}

static inline float xc_max0(float v)
{
    xc_bits a;
    a.f = v;
    a.u &= (a.u >> 31) - 1u;
    return a.f;
}
""",
}


def policy_c(layers: list[Any], obs_dim: int, act_dim: int, header_name: str,
             sha256: str) -> tuple[str, int, int]:
    """(text of policy.c, weight bytes, widest buffer in floats) for `layers`."""
    data: list[str] = []
    funcs: list[str] = []
    total = 0
    for i, layer in enumerate(layers):
        d, f, n = _dense(i, layer) if isinstance(layer, Dense) else _elementwise(i, layer)
        data += d + [""]
        funcs += f + [""]
        total += n
    widths = [layer.n if isinstance(layer, Dense) else layer.width for layer in layers[:-1]]
    max_width = max(widths, default=0)
    calls, bufs, cur = [], set(), "obs"
    for i, layer in enumerate(layers):
        if i == len(layers) - 1:
            out = "action"
        elif isinstance(layer, Dense) or cur == "obs":
            out = "xc_buf1" if cur == "xc_buf0" else "xc_buf0"
        else:
            out = cur
        bufs.add(out)
        calls.append(f"    xc_layer{i}({cur}, {out});")
        cur = out
    bufs.discard("action")
    acts = [la.act if isinstance(la, Dense) else la for la in layers]
    fns = {a.fn for a in acts if isinstance(a, Act)}
    needs_math = "tanh" in fns
    helpers = [name for name, used in (
        ("quantize", any(isinstance(la, FakeQuant) for la in layers)),
        ("exp", bool(fns & {"elu", "sigmoid"})), ("min0", "elu" in fns)) if used]
    helpers = ["bits", *helpers] if helpers else []
    stack = 4 * max_width * len(bufs)
    lines = [f"/* Generated by xcompile emit-c, emitter version {EMITTER_VERSION}; do not edit.",
             f" * Source ONNX sha256: {c_comment(sha256) or 'unknown'}",
             f" * Observation {obs_dim} floats -> action {act_dim} floats. Layers:"]
    for i, layer in enumerate(layers):
        lines.append(" *   " + c_comment(f"{i}: {summary(layer)}"))
    lines += [f" * Weight data: {total} bytes of static const arrays.",
              f" * Stack: {len(bufs)} activation buffer(s) of {max_width} floats ({stack} bytes) "
              "in xc_policy_step, plus a few scalars.",
              " * Stateless and reentrant: no heap, no writable globals, no recursion.",
              " * Build with any C99 compiler, e.g. cc -std=c99 -O2 -c"
              + ("; link with -lm (tanhf)." if needs_math else "; needs no libm."),
              " * Do not build with -ffast-math: results would drift from onnxruntime. */",
              f'#include "{header_name}"', ""]
    if needs_math:
        lines.append("#include <math.h>")
    lines += ["#include <stdint.h>", "", f"#if XC_OBS_DIM != {obs_dim} || XC_ACT_DIM != {act_dim}",
              f"#error {c_comment(header_name)} does not belong to this policy.c", "#endif", ""]
    lines += data
    for name in helpers:
        lines += HELPERS[name].splitlines() + [""]
    lines += funcs
    body = [f"    float {b}[{max_width}];" for b in sorted(bufs)]
    if not layers:
        body = ["    int i;", f"    for (i = 0; i < {obs_dim}; ++i) {{",
                "        action[i] = obs[i];", "    }"]
    lines += ["/* One control step: obs (XC_OBS_DIM floats) -> action (XC_ACT_DIM floats); the two",
              " * must not overlap. */",
              "void xc_policy_step(const float *obs, float *action)", "{", *body, *calls, "}", "",
              "/* n steps: rows of XC_OBS_DIM observations -> rows of XC_ACT_DIM actions. */",
              "void xc_policy_step_batch(const float *obs, float *action, int n)", "{",
              "    long r;", "    for (r = 0; r < (long)n; ++r) {",
              "        xc_policy_step(obs + r * XC_OBS_DIM, action + r * XC_ACT_DIM);", "    }",
              "}", "",
              "/* The policy is stateless: there is nothing to reset. */",
              "void xc_policy_reset(void)", "{", "}", "",
              "int xc_policy_obs_dim(void)", "{", "    return XC_OBS_DIM;", "}", "",
              "int xc_policy_act_dim(void)", "{", "    return XC_ACT_DIM;", "}"]
    return "\n".join(lines) + "\n", total, max_width
