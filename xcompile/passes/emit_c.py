"""emit-c: the slim ONNX policy as dependency-free C99 (`policy.c`, `policy.h`), for control loops
and microcontrollers that cannot host a runtime.

onnx -> c. Cost: a second or two (emit, two compiler runs, a timing harness) plus the closed-loop
episodes of the check.

Method: the ONNX graph (a dense feed-forward policy: what distill makes, in fp32, fp16 weights or
int8) is folded into a list of dense layers and printed as C by `xcompile.cgen`: weights as
`static const` arrays (int8 stays int8, with its scales), no heap, no state, one
`xc_policy_step(obs, action)`; the deployment contract (joint order, default pose, action scale
and clip, gains, control period, observation layout, source hash) as `#define`s in the header.
Output is byte-identical for the same input. A graph with anything else (attention, layer norm:
the fat network) is refused in one line: distill first.

Check: the emitted code compiles with `-std=c99 -Wall -Wextra -Werror` (the system compiler,
`$CC` or cc/gcc/clang; without one the pass is skipped with a note and the build goes on) and,
run through ctypes, matches onnxruntime on the same graph: on `check_random` random observations
and on the observations of `check_episodes` closed-loop episodes (seed stream "emit-c-check") —
within `max_error` (absolute, action units) when every activation stays float, within the quantize
pass's `max_action_error` on average where activations are quantized (rounding at a quantization
step can differ by one step). It records the object's text/data/bss, the stack use of
`xc_policy_step` and the C harness latency (p50/p99/max). The closed-loop score of the C policy is
the report's own measurement of this stage (through ctypes).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import Field

from xcompile.artifact import Artifact
from xcompile.errors import PassCheckError
from xcompile.evaluate import evaluate
from xcompile.onnx.model import get_metadata
from xcompile.onnx.session import ort_session, read_onnx
from xcompile.passes.base import BuildContext, Pass, PassConfig, PassResult, register_pass
from xcompile.passes.quantize import QuantizeConfig
from xcompile.sim.observations import random_obs
from xcompile.targets import HardwareTarget

CHECK_STREAM = "emit-c-check"      # closed-loop episodes whose observations the check compares on
C_FILE, H_FILE = "policy.c", "policy.h"


class EmitCConfig(PassConfig):
    check_random: int = Field(10_000, ge=0, le=1_000_000, description="random observations "
                              "(shaped like the simulator's) on which C must match onnxruntime")
    check_episodes: int = Field(1, ge=0, le=100, description="closed-loop episodes of the ONNX "
                                "policy whose observations C must also match it on")
    max_error: float = Field(1e-5, gt=0, description="largest |C - onnxruntime| action "
                             "difference when no activation is quantized")
    timing_calls: int = Field(20_000, ge=100, le=10_000_000, description="calls timed in the C "
                              "harness (p50/p99/max per call)")


def _ort_actions(sess: Any, obs: np.ndarray) -> np.ndarray:
    inp = sess.get_inputs()[0]
    b = inp.shape[0] if isinstance(inp.shape[0], int) else 512
    return np.concatenate([sess.run(None, {inp.name: obs[i:i + b]})[0]
                           for i in range(0, len(obs), b)])


def quantized_activations(layers: tuple[Mapping[str, Any], ...]) -> bool:
    """Whether any layer fake-quantizes its activations (C may then differ by a rounding step)."""
    return any(layer.get("op") == "fake_quant" for layer in layers)


@register_pass
class EmitC(Pass):
    name = "emit-c"
    version = 1
    input_format = "onnx"
    output_format = "c"
    Config = EmitCConfig
    summary = "dependency-free C99 policy (policy.c/policy.h), checked against onnxruntime"
    refuses_recurrent = ("emit-c does not take a recurrent policy yet (the C it writes keeps no "
                         "state); end the plan at quantize: --passes "
                         "pin-embodiment,export-onnx,quantize")
    emit_option = "c"      # `xcompile build --emit c` ends the plan with this pass

    def run(self, art: Artifact, cfg: PassConfig, ctx: BuildContext) -> PassResult:
        from xcompile.cgen import compile_shared, emit_c, find_cc, object_sizes, stack_usage

        assert isinstance(cfg, EmitCConfig)
        cc = find_cc()                          # ToolUnavailable: skipped, the build goes on
        model = read_onnx(art.path)
        src = emit_c(model, contract=get_metadata(model), header_name=H_FILE,
                     source_sha256=art.sha256)
        shutil.copyfile(art.path, ctx.workdir / "policy.onnx")   # the C's source, beside it
        c_path = ctx.workdir / C_FILE
        c_path.write_text(src.c)
        (ctx.workdir / H_FILE).write_text(src.h)
        compile_shared(c_path, ctx.workdir / "libpolicy.so", cc=cc)   # -Werror: must be clean
        sizes = object_sizes(c_path, cc=cc)
        stack = stack_usage(c_path, cc=cc).get("xc_policy_step")
        info = {"compiler": cc, "obs_dim": src.obs_dim, "act_dim": src.act_dim,
                "weight_bytes": src.weight_bytes, "object": sizes,
                "object_bytes": sizes["text"] + sizes["data"], "stack_bytes": stack,
                "layers": list(src.layers), "c_bytes": len(src.c.encode()),
                "h_bytes": len(src.h.encode()), "params": _params(src.layers)}
        out = Artifact.create("c", c_path, ctx.robot.name,
                              meta={"onnx_sha256": art.sha256,
                                    "precision": art.meta.get("precision", "fp32"),
                                    "object_bytes": info["object_bytes"],
                                    "params": info["params"]},
                              lineage=(*art.lineage, self.name))
        return PassResult(out, info, files=(H_FILE,))

    def check(self, inp: Artifact, result: PassResult, cfg: PassConfig,
              ctx: BuildContext) -> dict[str, Any]:
        from xcompile.cgen import CPolicy, harness_latency

        assert isinstance(cfg, EmitCConfig)
        s = result.summary
        c = CPolicy(result.artifact.path.parent / "libpolicy.so", s["obs_dim"], s["act_dim"])
        sess = ort_session(inp.path)
        parts = []
        if cfg.check_random:
            parts.append(random_obs(ctx.robot, cfg.check_random, seed=ctx.seed + 3))
        if cfg.check_episodes:
            res = evaluate(lambda o: _ort_actions(sess, np.asarray(o, np.float32)), ctx.robot,
                           episodes=cfg.check_episodes, seed=ctx.seed, stream=CHECK_STREAM,
                           record_obs=True)
            parts.append(np.concatenate(res.observations).astype(np.float32))
        checks: dict[str, Any] = {}
        if parts:
            obs = np.concatenate(parts)
            err = np.abs(c(obs) - _ort_actions(sess, obs))
            mean_err, max_err = float(err.mean()), float(err.max())
            fake_quant = quantized_activations(tuple(s["layers"]))
            limit = QuantizeConfig().max_action_error if fake_quant else cfg.max_error
            measured = mean_err if fake_quant else max_err
            if not measured <= limit:
                raise PassCheckError(
                    f"emit-c: the C policy's actions differ from onnxruntime's by {max_err:.3g} "
                    f"at most ({mean_err:.3g} on average) on {len(obs)} observations; limit "
                    f"{limit:g} ({'mean, quantized activations' if fake_quant else 'max'}). "
                    "This is a bug in xcompile's C emitter: please report it with the ONNX file")
            checks.update(n_check_obs=len(obs), max_abs_err=max_err, mean_abs_err=mean_err,
                          error_limit=limit, error_measure="mean" if fake_quant else "max")
        lat = harness_latency(result.artifact.path, random_obs(ctx.robot, 256, seed=ctx.seed + 4),
                              n=cfg.timing_calls)
        checks.update({f"c_{k}": round(v, 3) for k, v in lat.items() if k.endswith("_us")},
                      c_timed_calls=cfg.timing_calls, object_bytes=s["object_bytes"],
                      object=s["object"], stack_bytes=s["stack_bytes"],
                      weight_bytes=s["weight_bytes"], c_bytes=s["c_bytes"], h_bytes=s["h_bytes"],
                      compiler=s["compiler"])
        return checks

    @classmethod
    def notes(cls, stage: Mapping[str, Any], stages: list[Mapping[str, Any]], cfg: PassConfig,
              hardware: HardwareTarget) -> list[str]:
        c = stage["checks"]
        if "object_bytes" not in c:
            return []
        o = c["object"]
        err = (f"; matches onnxruntime on {c['n_check_obs']} observations ({c['error_measure']} "
               f"|error| {c[c['error_measure'] + '_abs_err']:.2g} <= {c['error_limit']:g})"
               if "n_check_obs" in c else "")
        return [f"emit-c: policy.c ({c['c_bytes']:,} B source) and policy.h; compiled by "
                f"{c['compiler']}: text {o['text']:,} B + data {o['data']:,} B (bss "
                f"{o['bss']:,} B), stack {c['stack_bytes']} B in xc_policy_step; C harness "
                f"p50 {c['c_p50_us']:.2f} µs, p99 {c['c_p99_us']:.2f} µs, max "
                f"{c['c_max_us']:.1f} µs over {c['c_timed_calls']:,} calls{err}. The stage's "
                "bytes are text + data (what a microcontroller holds in flash), its latency "
                "the C harness's, its score the C policy's through ctypes"]


def _params(layers: tuple[Mapping[str, Any], ...]) -> int:
    return sum(int(la.get("in", 0)) * int(la.get("out", 0)) + int(la.get("out", 0))
               for la in layers if la.get("op") == "dense")

