"""export-onnx: the one-robot torch policy as an ONNX graph carrying its deployment contract.

torch -> onnx. Cost: a few seconds (one torch.export trace).

Method: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript) at a pinned opset, weights
inside the file, inputs/outputs named `obs` -> `action`. One graph, `policy.onnx`, with a dynamic
batch (traced with an example batch of 2, or the batch may silently stay fixed): a control loop
calls it at batch 1 as fast as a static batch-1 graph (measured in onnxruntime, one thread: 8.3 vs
8.8 µs p50 for a 48-64-64-12 MLP, 11.8 vs 12.2 µs for 256-256), so no second graph is written.
An MLP's observation normalisation is folded into its first layer before export.

The deployment contract (robot, joint order, default pose, action scale and clip, PD gains, torque
limits, control period, observation layout, task family, source checkpoint hash, pass history,
xcompile version: `xcompile.onnx.contract`) goes into the model's `metadata_props`, so a runtime
can refuse a policy for another robot. The output is byte-identical for the same input: the
exporter's graph names are deterministic, and doc strings and per-node metadata (stack traces,
paths) are stripped.

Check: onnxruntime against torch on random observations, at batch 1 and at batch 64.

onnx -> onnx: an ONNX policy (what pin-embodiment makes of a foreign fat graph) is passed through:
its contract must name this robot, its signature be `obs` -> `action` of the robot's widths; the
file is copied with export-onnx added to its pass history, and the check compares it with its
input the same way. So one plan text (pin-embodiment,export-onnx,quantize) serves both kinds of
fat input. A recurrent ONNX policy (its contract records `recurrent_state`) also takes and gives
its states, after `obs` and `action`; the check feeds both graphs the same random states and
compares every output. So does a recurrent torch student (`xcompile.models.recurrent`, what
distill makes of a recurrent teacher): it is exported with its state inputs and outputs after
`obs` and `action`, every one with a dynamic batch, and its states go into the contract's
`recurrent_state`.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from pydantic import Field

from xcompile.artifact import Artifact
from xcompile.errors import PassCheckError
from xcompile.models.recurrent import is_recurrent, reset_states
from xcompile.models.slim import load_torch_policy
from xcompile.onnx.contract import (
    check_contract,
    check_io_widths,
    deployment_contract,
    extend_contract,
)
from xcompile.onnx.model import (
    get_metadata,
    quiet_exporter,
    save_onnx,
    set_metadata,
    strip_volatile,
)
from xcompile.onnx.recurrent import (
    CONTRACT_KEY,
    contract_value,
    random_states,
    read_contract,
    session_states,
)
from xcompile.onnx.session import ort_session, read_onnx
from xcompile.passes.base import BuildContext, Pass, PassConfig, PassResult, register_pass
from xcompile.sim.env import obs_dim
from xcompile.sim.observations import random_obs


class ExportConfig(PassConfig):
    opset: int = Field(17, ge=17, le=21, description="ONNX opset the graph is written for")
    n_check_obs: int = Field(1000, ge=64, description="random observations the check compares on")
    tolerance: float = Field(1e-4, gt=0, description="largest allowed |onnxruntime - torch|, in "
                             "action units")


def _export(module: Any, n_obs: int, opset: int) -> Any:
    """`module` as an ONNX ModelProto with a dynamic batch, volatile fields stripped; a
    recurrent module's states follow `obs` and `action` (`states()` names them)."""
    import onnx  # heavy: only when the pass runs

    states = module.states() if is_recurrent(module) else []
    args = (torch.zeros(2, n_obs), *reset_states(module, 2)) if states else (torch.zeros(2, n_obs),)
    batch = torch.export.Dim("batch")
    names = ["obs", *(s.input for s in states)]
    # torch.export keys the dynamic shapes by forward's argument names
    params = list(inspect.signature(module.forward).parameters)[:len(args)]
    dynamic_shapes = {p: {0: batch} for p in params}
    with quiet_exporter():
        prog = torch.onnx.export(module, args, dynamo=True, input_names=names,
                                 output_names=["action", *(s.output for s in states)],
                                 dynamic_shapes=dynamic_shapes,
                                 opset_version=opset, external_data=False, verbose=False)
    assert prog is not None
    model = prog.model_proto
    model = onnx.load_from_string(model.SerializeToString())
    strip_volatile(model)
    return model


def _side_by_side(outputs: list[np.ndarray]) -> np.ndarray:
    """Every output of a batch, flattened per row and side by side: (batch, total width)."""
    return np.concatenate([o.reshape(len(o), -1) for o in outputs], axis=1)


@register_pass
class ExportOnnx(Pass):
    name = "export-onnx"
    version = 2     # 2: one dynamic-batch graph (no policy_b1.onnx)
    input_format = "torch"
    output_format = "onnx"
    input_formats = ("torch", "onnx")
    Config = ExportConfig
    summary = "export to ONNX (dynamic batch) with the deployment contract"

    def run(self, art: Artifact, cfg: PassConfig, ctx: BuildContext) -> PassResult:
        import onnx  # heavy: only when the pass runs

        assert isinstance(cfg, ExportConfig)
        if art.format == "onnx":
            return self._pass_through(art, ctx)
        module = load_torch_policy(art.path)
        if getattr(module, "normalize", False):
            module = module.fold_normalization().eval()
        n_obs = obs_dim(ctx.robot)
        if getattr(module, "obs_dim", n_obs) != n_obs:
            raise PassCheckError(
                f"export-onnx: the policy takes {module.obs_dim} observations but robot "
                f"{ctx.robot.name} gives {n_obs}; it was made for another robot")
        props = deployment_contract(ctx.robot, ctx.source_sha256, [*ctx.history, self.name])
        model = _export(module, n_obs, cfg.opset)
        if is_recurrent(module):
            props[CONTRACT_KEY] = contract_value(module.states())
        set_metadata(model, props)
        onnx.checker.check_model(model)
        path = save_onnx(model, ctx.workdir / "policy.onnx")
        return PassResult(Artifact.create(
            "onnx", path, ctx.robot.name,
            meta={"precision": "fp32", "opset": cfg.opset, "kind": art.meta.get("kind", "")},
            lineage=(*art.lineage, self.name)))

    def _pass_through(self, art: Artifact, ctx: BuildContext) -> PassResult:
        """An ONNX policy for this robot, copied with export-onnx added to its history."""
        from xcompile.frontends.graph import graph_io

        model = read_onnx(art.path)
        meta = get_metadata(model)
        check_contract(meta, ctx.robot, art.path)
        gins, gouts = graph_io(model)
        states = read_contract(meta, {i.name: i.shape for i in gins},
                               {o.name: o.shape for o in gouts}, art.path)
        ins, outs = [i.name for i in gins], [o.name for o in gouts]
        if (ins != ["obs", *(s.input for s in states)]
                or outs[:1 + len(states)] != ["action", *(s.output for s in states)]):
            raise PassCheckError(f"export-onnx: {art.path.name} takes {ins} and returns "
                                 f"{outs}; an ONNX policy takes 'obs' (and its recurrent "
                                 "state inputs) and returns 'action' (then its next states)")
        set_metadata(model, extend_contract(meta, self.name))
        path = save_onnx(model, ctx.workdir / "policy.onnx")
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        return PassResult(Artifact.create(
            "onnx", path, ctx.robot.name,
            meta={"precision": "fp32", "opset": opset, "kind": art.meta.get("kind", "")},
            lineage=(*art.lineage, self.name)))

    def check(self, inp: Artifact, result: PassResult, cfg: PassConfig,
              ctx: BuildContext) -> dict[str, Any]:
        out = result.artifact
        assert isinstance(cfg, ExportConfig)
        obs = random_obs(ctx.robot, cfg.n_check_obs, seed=ctx.seed + 1)
        sess = ort_session(out.path)
        feeds = {"obs": obs, **random_states(session_states(sess, out.path), len(obs),
                                             np.random.default_rng(ctx.seed + 1))}
        if inp.format == "onnx":
            outs = ort_session(inp.path).run(None, feeds)
            check_io_widths(None, int(outs[0].shape[1]), ctx.robot, inp.path)
            want = _side_by_side(outs)
        else:
            module = load_torch_policy(inp.path)
            with torch.inference_mode():
                got = module(*(torch.as_tensor(v) for v in feeds.values()))
            want = _side_by_side([o.numpy() for o in (got if isinstance(got, tuple) else (got,))])

        def run(i: int, n: int) -> np.ndarray:     # every output, side by side
            return _side_by_side(sess.run(None, {k: v[i:i + n] for k, v in feeds.items()}))

        got_b1 = np.concatenate([run(i, 1) for i in range(len(obs))])
        got_b64 = np.concatenate([run(i, 64) for i in range(0, len(obs), 64)])
        errs = {"max_abs_err_b1": float(np.abs(got_b1 - want).max()),
                "max_abs_err_b64": float(np.abs(got_b64 - want).max())}
        worst = max(errs.values())
        if not worst <= cfg.tolerance:
            raise PassCheckError(
                f"export-onnx: onnxruntime and torch disagree by {worst:.3g} (tolerance "
                f"{cfg.tolerance:g}; {errs}); the export is wrong for this model")
        return {**errs, "opset": out.meta.get("opset", cfg.opset), "bytes": out.n_bytes,
                "n_check_obs": cfg.n_check_obs, "passed_through": inp.format == "onnx"}
