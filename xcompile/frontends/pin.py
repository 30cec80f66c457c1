"""Generic pin-embodiment for a foreign fat graph (fat-graph -> onnx).

Method: partial evaluation with a maintained optimizer. The target's value of every embodiment
input (from the interface's body table) becomes an initializer of the same name, the observation
input and the action output are renamed `obs` and `action` (xcompile's policy signature), the
recurrent state inputs and outputs (`xcompile.onnx.recurrent`) keep their names and come after
them, and other outputs are dropped; then `onnxscript.optimizer.optimize` folds every node whose
inputs are now all constant (a Gather on stacked per-body weights becomes that body's weights, a
one-hot matmul becomes a bias) and removes what no longer reaches the outputs: other bodies'
stems, heads and embeddings, and the initializers only they used. The result carries the deployment contract
(`xcompile.onnx.contract`) like any xcompile ONNX policy, so quantize, emit-c and eval take it;
a recurrent one records its states and their rule under `recurrent_state`.

Check (`check_pinned`): the pinned graph (reloaded from its file) and the fat graph with the body's
values fed give the same outputs (the action and every next state) to `tolerance` on random
observations (with random states) and in closed loop: the fat graph's episodes of seed stream
"pin-check", replayed call by call through the pinned graph with its own state carried;
parameters and bytes removed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xcompile.artifact import Artifact
from xcompile.errors import PassCheckError
from xcompile.evaluate import score_policy
from xcompile.frontends.graph import FatGraph, artifact_graph, fat_act, graph_params
from xcompile.measure import count_params_bytes
from xcompile.onnx.contract import deployment_contract
from xcompile.onnx.graph import rename_in_nodes
from xcompile.onnx.model import save_onnx, set_metadata, strip_volatile
from xcompile.onnx.recurrent import (
    CONTRACT_KEY,
    StatefulPolicy,
    Step,
    contract_value,
    max_step_error,
    random_states,
    replay,
)
from xcompile.onnx.session import ort_session
from xcompile.passes.base import BuildContext, PassResult
from xcompile.sim.observations import random_obs

FOLD_LIMIT = 1 << 28   # elements a folded constant may have (the optimizer's default is 8192)


def _rename(graph: Any, old: str, new: str) -> None:
    if old == new:
        return
    rename_in_nodes(graph, old, new)
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.name == old:
            vi.name = new


def pin_graph(fg: FatGraph) -> Any:
    """The fat graph with the body's values bound and folded away: obs -> action (recurrent:
    obs, *state inputs -> action, *state outputs)."""
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
    keep = [iface.action, *(st.output for st in fg.states)]
    for vi in list(g.output):
        if vi.name not in keep:
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
    _order(model.graph.input, ["obs", *(st.input for st in fg.states)])
    _order(model.graph.output, ["action", *(st.output for st in fg.states)])
    strip_volatile(model)
    return model


def _order(values: Any, first: list[str]) -> None:
    """Put the ValueInfos named `first` first, in that order (the policy's signature)."""
    items = sorted(values, key=lambda vi: first.index(vi.name) if vi.name in first
                   else len(first))
    copies = [type(vi)() for vi in items]
    for c, vi in zip(copies, items):
        c.CopyFrom(vi)
    del values[:]
    values.extend(copies)


def run_pinned(art: Artifact, ctx: BuildContext, lineage: tuple[str, ...]) -> PassResult:
    import onnx

    fg = artifact_graph(art, ctx.robot)
    model = pin_graph(fg)
    left = [i.name for i in model.graph.input
            if i.name not in {t.name for t in model.graph.initializer}]
    if left != ["obs", *(st.input for st in fg.states)]:
        raise PassCheckError(f"pin-embodiment: after binding the body's inputs the graph still "
                             f"takes {left}; the interface must give a value for every input "
                             "but the observation and the recurrent state")
    props = deployment_contract(ctx.robot, ctx.source_sha256, [*ctx.history, "pin-embodiment"])
    if fg.states:
        props[CONTRACT_KEY] = contract_value(fg.states)
    set_metadata(model, props)
    onnx.checker.check_model(model)
    path = save_onnx(model, ctx.workdir / "pinned.onnx")
    return PassResult(Artifact.create(
        "onnx", path, ctx.robot.name,
        meta={"precision": "fp32", "kind": "pinned", "family": ctx.robot.family,
              "known_body": True, "foreign": art.meta.get("source", "onnx"),
              **({"recurrent": True} if fg.states else {})},
        lineage=lineage))


def check_pinned(inp: Artifact, out: Artifact, n_obs: int, episodes: int, tolerance: float,
                 ctx: BuildContext, stream: str) -> dict[str, Any]:
    robot = ctx.robot
    fg = artifact_graph(inp, robot)
    fat = fat_act(fg)
    if fg.states:
        err, n = _check_recurrent(fg, fat, out, n_obs, episodes, ctx, stream)
    else:
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
        n = len(x)
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
            "n_check_obs": int(n), "known_body": True, "zero_shot": False,
            "foreign": inp.meta.get("source", "onnx"),
            **({"recurrent_states": len(fg.states)} if fg.states else {})}


def _check_recurrent(fg: FatGraph, fat: StatefulPolicy, out: Artifact, n_obs: int,
                     episodes: int, ctx: BuildContext, stream: str) -> tuple[float, int]:
    """(largest |pinned - fat| over the action and every next state, observations compared): on
    random observations with random states, and on the fat graph's closed-loop episodes replayed
    call by call through the pinned graph, each carrying its own state."""
    iface, sess = fg.interface, ort_session(out.path)
    fat_sess = ort_session(fg.model.SerializeToString())
    x = random_obs(ctx.robot, n_obs, seed=ctx.seed)
    h = random_states(fg.states, n_obs, np.random.default_rng(ctx.seed))
    names = [st.output for st in fg.states]
    err = 0.0
    for i in range(0, n_obs, 256):
        hs = {k: v[i:i + 256] for k, v in h.items()}
        want = fat_sess.run([iface.action, *names],
                            {iface.observation: x[i:i + 256], **fg.values, **hs})
        got = sess.run(["action", *names], {"obs": x[i:i + 256], **hs})
        for g, w in zip(got, want):
            e = float(np.abs(g - w).max()) if g.shape == w.shape else float("inf")
            err = max(err, e) if e == e else float("inf")
    n = n_obs
    if episodes:
        fat.log = []
        score_policy(fat, ctx.robot, episodes, ctx.seed, stream=stream)
        steps, fat.log = fat.log, None
        pinned = StatefulPolicy.of_session(sess, "obs", "action", fg.states)
        got_steps = replay(pinned, steps, iface.observation)
        renamed = [Step(s.rows, s.inputs, {("action" if k == iface.action else k): v
                                           for k, v in s.outputs.items()}) for s in steps]
        err = max(err, max_step_error(got_steps, renamed))
        n += sum(len(s.rows) for s in steps)
    return err, n
