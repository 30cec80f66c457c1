"""Generic pin-embodiment for a foreign fat graph (fat-graph -> onnx).

Method: partial evaluation with a maintained optimizer. The target's value of every embodiment
input (from the interface's body table) becomes an initializer of the same name, the observation
input and the action output are renamed `obs` and `action` (xcompile's policy signature), the
recurrent state inputs and outputs (`xcompile.onnx.recurrent`) keep their names and come after
them, and other outputs are dropped; then `onnxscript.optimizer.optimize` folds every node whose
inputs are now all constant (a Gather on stacked per-body weights becomes that body's weights)
and removes what no longer reaches the outputs: other bodies' stems, heads and embeddings, and
the initializers only they used. A body code concatenated to every observation, which the
optimizer cannot fold (it is expanded to the batch size), is split off the product it feeds by
`fold_constant_columns`: its columns of the weight become part of the bias. The result carries
the deployment contract (`xcompile.onnx.contract`) like any xcompile ONNX policy, so quantize,
emit-c and eval take it; a recurrent one records its states and their rule under
`recurrent_state`.

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
    def optimize(m: Any) -> Any:
        return onnxscript.optimizer.optimize(m, num_iterations=3, input_size_limit=FOLD_LIMIT,
                                             output_size_limit=FOLD_LIMIT)

    model = optimize(model)
    if fold_constant_columns(model):        # what that left unused goes now
        model = optimize(model)
    _order(model.graph.input, ["obs", *(st.input for st in fg.states)])
    _order(model.graph.output, ["action", *(st.output for st in fg.states)])
    strip_volatile(model)
    return model


def fold_constant_columns(model: Any) -> int:
    """Split each product of a Concat of the observation side and a constant row (a one-hot or
    body code concatenated to every observation: `Expand` of a constant) into the product on the
    observation side alone plus a constant, the row times its columns of the weight, folded into
    the bias (Gemm) or added after it (MatMul). The optimizer cannot: the row is expanded to the
    batch size, which only the observation knows. Returns the products rewritten; the weights'
    constant columns are then unused and go with the next optimizer pass."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    done = 0
    for node in list(g.node):
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        cat = producer.get(node.input[0]) if node.input else None
        if (node.op_type not in ("Gemm", "MatMul") or cat is None or cat.op_type != "Concat"
                or len(cat.input) != 2 or a.get("transA", 0) or uses.get(cat.output[0]) != 1
                or node.input[1] not in inits
                or helper.get_attribute_value(cat.attribute[0]) not in (1, -1)):
            continue
        row, side = None, 0
        for j, name in enumerate(cat.input):
            e = producer.get(name)
            src = e.input[0] if e is not None and e.op_type == "Expand" else name
            if src in inits and (e is not None or name in inits):
                value = numpy_helper.to_array(inits[src])
                if value.ndim <= 2 and value.reshape(-1).size == value.shape[-1]:
                    row, side = value.reshape(1, -1).astype(np.float32), j
        w = numpy_helper.to_array(inits[node.input[1]])
        if row is None or w.ndim != 2 or w.dtype != np.float32:
            continue
        wm = w.T if a.get("transB", 0) else w                   # (inputs, outputs)
        k = row.shape[1]
        x_rows = slice(0, len(wm) - k) if side == 1 else slice(k, len(wm))
        c_rows = slice(len(wm) - k, len(wm)) if side == 1 else slice(0, k)
        const = (row @ wm[c_rows]).reshape(-1) * float(a.get("alpha", 1.0))
        w_x = wm[x_rows].T if a.get("transB", 0) else wm[x_rows]
        base = f"{node.input[1]}__obs"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w_x), base))
        node.input[0], node.input[1] = cat.input[1 - side], base
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in inits:
            bias = numpy_helper.to_array(inits[node.input[2]]) * float(a.get("beta", 1.0))
            g.initializer.append(numpy_helper.from_array(
                (bias + const).astype(np.float32), f"{node.input[2]}__folded"))
            node.input[2] = f"{node.input[2]}__folded"
            for x in node.attribute:
                if x.name == "beta":
                    x.f = 1.0
        else:                                  # MatMul or Gemm without a bias: add it after
            out = node.output[0]
            node.output[0] = f"{out}__nobias"
            g.initializer.append(numpy_helper.from_array(const.astype(np.float32),
                                                         f"{out}__bias"))
            g.node.insert(list(g.node).index(node) + 1, helper.make_node(
                "Add", [node.output[0], f"{out}__bias"], [out]))
        done += 1
    return done


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
