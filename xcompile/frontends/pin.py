"""Generic pin-embodiment for a foreign fat graph (fat-graph -> onnx).

Method: partial evaluation with a maintained optimizer. The target's value of every embodiment
input (from the interface's body table) becomes an initializer of the same name, the observation
input and the action output are renamed `obs` and `action` (xcompile's policy signature) and
other outputs are dropped; then `onnxscript.optimizer.optimize` folds every node whose inputs are
now all constant (a Gather on stacked per-body weights becomes that body's weights, a one-hot
matmul becomes a bias) and removes what no longer reaches the output: other bodies' stems, heads
and embeddings, and the initializers only they used. The result carries the deployment contract
(`xcompile.onnx.contract`) like any xcompile ONNX policy, so quantize, emit-c and eval take it.

Check (`check_pinned`): the pinned graph (reloaded from its file) and the fat graph with the body's
values fed act the same to `tolerance` on random observations and on observations recorded in
closed loop by the fat graph (seed stream "pin-check"); parameters and bytes removed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xcompile.artifact import Artifact
from xcompile.errors import PassCheckError
from xcompile.evaluate import score_policy
from xcompile.frontends.graph import FatGraph, artifact_graph, fat_act
from xcompile.frontends.measure import graph_params
from xcompile.measure import count_params_bytes
from xcompile.onnx.contract import deployment_contract
from xcompile.onnx.model import save_onnx, set_metadata, strip_volatile
from xcompile.onnx.session import ort_session
from xcompile.passes.base import BuildContext, PassResult
from xcompile.sim.observations import random_obs

FOLD_LIMIT = 1 << 28   # elements a folded constant may have (the optimizer's default is 8192)


def _rename(graph: Any, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        for i, n in enumerate(node.input):
            if n == old:
                node.input[i] = new
        for i, n in enumerate(node.output):
            if n == old:
                node.output[i] = new
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.name == old:
            vi.name = new


def pin_graph(fg: FatGraph) -> Any:
    """The fat graph with the body's values bound and folded away: obs -> action."""
    import onnx
    import onnxscript.optimizer
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(fg.model)
    g = model.graph
    iface = fg.interface
    for name, value in fg.values.items():
        for vi in list(g.input):
            if vi.name == name:
                g.input.remove(vi)
        for t in list(g.initializer):
            if t.name == name:
                g.initializer.remove(t)
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    for vi in list(g.output):
        if vi.name != iface.action:
            g.output.remove(vi)
    clash = {n for node in g.node for n in [*node.input, *node.output]} | {
        t.name for t in g.initializer}
    for old, new in ((iface.observation, "obs"), (iface.action, "action")):
        if old != new and new in clash:      # free the name first
            _rename(g, new, f"{new}__fat")
        _rename(g, old, new)
    model = onnxscript.optimizer.optimize(model, num_iterations=3,
                                          input_size_limit=FOLD_LIMIT,
                                          output_size_limit=FOLD_LIMIT)
    strip_volatile(model)
    return model


def run_pinned(art: Artifact, ctx: BuildContext, lineage: tuple[str, ...]) -> PassResult:
    import onnx

    fg = artifact_graph(art, ctx.robot)
    model = pin_graph(fg)
    left = [i.name for i in model.graph.input
            if i.name not in {t.name for t in model.graph.initializer}]
    if left != ["obs"]:
        raise PassCheckError(f"pin-embodiment: after binding the body's inputs the graph still "
                             f"takes {left}; the interface must give a value for every input "
                             "but the observation")
    set_metadata(model, deployment_contract(ctx.robot, ctx.source_sha256,
                                            [*ctx.history, "pin-embodiment"]))
    onnx.checker.check_model(model)
    path = save_onnx(model, ctx.workdir / "pinned.onnx")
    return PassResult(Artifact.create(
        "onnx", path, ctx.robot.name,
        meta={"precision": "fp32", "kind": "pinned", "family": ctx.robot.family,
              "known_body": True, "foreign": art.meta.get("source", "onnx")},
        lineage=lineage))


def check_pinned(inp: Artifact, out: Artifact, n_obs: int, episodes: int, tolerance: float,
                 ctx: BuildContext, stream: str) -> dict[str, Any]:
    robot = ctx.robot
    fg = artifact_graph(inp, robot)
    fat = fat_act(fg)
    obs = [random_obs(robot, n_obs, seed=ctx.seed)]
    if episodes:
        obs += score_policy(fat, robot, episodes, ctx.seed, stream=stream,
                            record_obs=True).observations
    x = np.concatenate(obs).astype(np.float32)
    sess = ort_session(out.path)
    want = np.concatenate([fat(x[i:i + 256]) for i in range(0, len(x), 256)])
    got = np.concatenate([sess.run(None, {"obs": x[i:i + 256]})[0]
                          for i in range(0, len(x), 256)])
    err = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
    if not err <= tolerance:
        raise PassCheckError(
            f"pin-embodiment: the pinned graph differs from the fat graph on {robot.name} by "
            f"{err:.3g} (tolerance {tolerance:g}); the fold changed the model's numbers")
    params_fat, bytes_fat = graph_params(fg.model), inp.n_bytes
    pin_pb = count_params_bytes(out)
    return {"params_fat": params_fat, "params_pinned": pin_pb["params"],
            "params_removed": params_fat - pin_pb["params"],
            "bytes_fat": bytes_fat, "bytes_pinned": pin_pb["bytes"],
            "bytes_removed": bytes_fat - pin_pb["bytes"], "max_abs_err": err,
            "n_check_obs": int(len(x)), "known_body": True, "zero_shot": False,
            "foreign": inp.meta.get("source", "onnx")}
