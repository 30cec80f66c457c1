"""Measurements every report uses: parameters, bytes, MACs, batch-1 latency and closed-loop score.

Artifacts are immutable, so every measurement is cached in memory under `(artifact.id, what)`
(`what` includes the robot and the measurement's settings); nothing ever needs invalidating.

How each number is taken:

- params: stored weight elements. fat-checkpoint: all parameters of the fat network. torch: the
  module's parameters plus its floating-point buffers (a pinned policy's folded body constants are
  weights the deployed graph carries too). onnx: elements of the graph's initializers and Constant
  tensors, except int64 ones (shapes and indices, not weights); the exporter stores equal tensors
  once, so this can be a little below the torch count. A quantized graph counts its int8
  weights plus its scales and zero points. tensorrt: those of the ONNX it was built from. c: the
  weights and biases of its dense layers.
- bytes: the artifact's file size on disk; for C, the compiled object's text + data (what a
  microcontroller keeps in flash), not the size of the source text.
- MACs: multiply-accumulates of one batch-1 call, counted over matrix products only (Linear/Gemm,
  MatMul, the attention products); element-wise work (norms, softmax, activations) is left out.
  torch and fat-checkpoint: `torch.utils.flop_counter.FlopCounterMode` over one call (its matmul
  FLOPs / 2), which sees the attention matmuls that a hook on nn.Linear would miss. onnx: from the
  graph, batch fixed to 1 and shapes inferred, every MatMul and Gemm as prod(batch dims) * M*K*N.
  The two agree on an exported policy (a test checks it).
- latency: batch-1 calls from Python on one thread (torch.set_num_threads(1), restored afterwards;
  onnxruntime intra_op=1, inter_op=1, sequential), after a warm-up, on random observations shaped
  like the robot's; median and p99 over `n` calls. `ort_floor_us` is onnxruntime's own per-call
  floor (an Identity graph of the same input shape) measured the same way, so a report can tell
  what the model costs from what calling it costs. C: timed inside a C harness
  (`xcompile.cgen.harness_latency`, clock_gettime around each call), no Python in the loop.
- score: `xcompile.evaluate.score_policy` on the robot target, on the episodes of seed stream
  "report" (`xcompile.seeds`), which no pass trains, checks or chooses on. Every stage of a build
  is scored on the same episodes, so two stages' per-episode `scores` pair up (the report's
  ratios and their intervals, `xcompile.stats.ratio_ci95`); `score_ci95` is the bootstrap 95%
  interval of the mean (`xcompile.stats.mean_ci95`).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from xcompile.artifact import Artifact
from xcompile.errors import ToolUnavailable
from xcompile.evaluate import EvalResult, score_policy, torch_single_thread
from xcompile.executors import current_executor, evaluate_file
from xcompile.models.checkpoint import load_checkpoint
from xcompile.models.fat import count_params
from xcompile.models.recurrent import is_recurrent, reset_states
from xcompile.models.slim import load_torch_policy
from xcompile.onnx.recurrent import session_states
from xcompile.onnx.session import ort_session
from xcompile.policy import body_descriptors, load_fat_checkpoint, load_policy
from xcompile.sim.observations import random_obs
from xcompile.targets import RobotTarget

# What a measurement means, for caches that outlive this process (the manager's measurement cache
# keys on the artifact id, which the seed streams do not change): bump it when the same artifact
# would measure differently. 2: scores on the "report" seed stream, rows with score_ci95 and scores.
# 3: the tasks of 2026-11-26 (changing commands, randomised worlds, several goals) and their
# continuous per-step score.
MEASURE_VERSION = 3

_CACHE: dict[tuple[str, Any], Any] = {}


def clear_cache() -> None:
    _CACHE.clear()


def _cached(key: tuple[str, Any], compute: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = compute()
    return _CACHE[key]


def _robot_key(robot: RobotTarget) -> str:
    # By content, not name: two TOML files may name different bodies the same.
    return hashlib.sha256(robot.model_dump_json().encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# params and bytes


def count_params_bytes(art: Artifact) -> dict[str, int]:
    """{"params": stored weight elements, "bytes": file size}; see the module docstring."""
    return _cached((art.id, "params_bytes"), lambda: {
        "params": _count_params(art),
        "bytes": int(art.meta["object_bytes"]) if art.format == "c" else art.n_bytes})


def _count_params(art: Artifact) -> int:
    if art.format == "fat-checkpoint":
        return count_params(load_checkpoint(art.path).model)
    if art.format == "torch":
        module = load_torch_policy(art.path)
        return (sum(p.numel() for p in module.parameters())
                + sum(b.numel() for b in module.buffers() if b.is_floating_point()))
    if art.format == "onnx":
        return onnx_param_count(art.path)
    if art.format == "tensorrt":
        onnx_path = art.meta.get("onnx_path")
        return onnx_param_count(onnx_path) if onnx_path and Path(onnx_path).exists() else 0
    if art.format == "c":
        return int(art.meta["params"])
    raise ValueError(f"unknown artifact format {art.format!r}")


def onnx_param_count(path: str | Path) -> int:
    import onnx  # heavy: only for ONNX artifacts
    from onnx import numpy_helper

    model = onnx.load(str(path))
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors += [a.t for a in node.attribute if a.name == "value"]
    return sum(int(np.prod(t.dims)) if t.dims else (1 if numpy_helper.to_array(t).size else 0)
               for t in tensors if t.data_type != onnx.TensorProto.INT64)


# --------------------------------------------------------------------------------------------
# MACs


def macs(art: Artifact, robot: RobotTarget) -> int:
    """Multiply-accumulates of one batch-1 call for `robot` (matrix products only)."""
    return _cached((art.id, ("macs", _robot_key(robot))), lambda: _macs(art, robot))


def _macs(art: Artifact, robot: RobotTarget) -> int:
    if art.format == "onnx":
        return onnx_macs(art.path)
    if art.format == "tensorrt":
        onnx_path = art.meta.get("onnx_path")
        return onnx_macs(onnx_path) if onnx_path and Path(onnx_path).exists() else 0
    if art.format == "c":                 # emit-c keeps its source ONNX beside the C
        return onnx_macs(art.path.parent / "policy.onnx")
    call, _ = _torch_callable(art, robot)
    x = torch.as_tensor(random_obs(robot, 1))
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        call(x)
    return int(counter.get_total_flops()) // 2


def onnx_macs(path: str | Path) -> int:
    """MACs of a batch-1 call of an ONNX graph: its MatMul and Gemm nodes, shapes inferred."""
    import onnx  # heavy: only for ONNX artifacts

    model = onnx.load(str(path))
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int]] = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)

    total = 0
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        if not a or not b or -1 in a or -1 in b:
            raise ValueError(f"{path}: cannot infer the shapes of {node.op_type} {node.name!r}")
        if node.op_type == "Gemm":
            attrs = {at.name: at.i for at in node.attribute}
            m, k = (a[1], a[0]) if attrs.get("transA") else (a[0], a[1])
            n = b[0] if attrs.get("transB") else b[1]
            total += m * k * n
        else:
            a2, b2 = (a if len(a) > 1 else [1, *a]), (b if len(b) > 1 else [*b, 1])
            batch = np.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2]))
            total += int(np.prod(batch)) * a2[-2] * a2[-1] * b2[-1]
    return int(total)


# --------------------------------------------------------------------------------------------
# latency


def _torch_callable(art: Artifact, robot: RobotTarget) -> tuple[Callable[[Any], Any], str]:
    """A batch callable on torch tensors for a fat-checkpoint or torch artifact."""
    if art.format == "fat-checkpoint":
        ckpt = load_fat_checkpoint(art.path, robot)
        desc = torch.as_tensor(body_descriptors(ckpt, robot)[0])
        model, family = ckpt.model, robot.family
        return (lambda x: model.act(x, desc, family)), "torch"
    if art.format == "torch":
        module = load_torch_policy(art.path)
        if is_recurrent(module):      # a call with its reset states, as a step of an episode
            states = reset_states(module, 1)
            return (lambda x: module(x, *states)), "torch"
        return module, "torch"
    raise ValueError(f"not a torch artifact: {art.format!r}")


def _time_calls(call: Callable[[Any], Any], inputs: list[Any], n: int) -> dict[str, float]:
    warmup = min(200, max(10, n // 10))
    for i in range(warmup):
        call(inputs[i % len(inputs)])
    times = np.empty(n, dtype=np.float64)
    clock = time.perf_counter_ns
    for i in range(n):
        x = inputs[i % len(inputs)]
        t0 = clock()
        call(x)
        times[i] = clock() - t0
    return {"p50_us": float(np.percentile(times, 50) / 1e3),
            "p99_us": float(np.percentile(times, 99) / 1e3)}


def _ort_latency(sess: Any, obs: np.ndarray, n: int) -> dict[str, float]:
    """A recurrent policy's calls are fed its reset states (`xcompile.onnx.recurrent`)."""
    name = sess.get_inputs()[0].name
    run = sess.run
    states = {s.input: s.reset_value()[None] for s in session_states(sess, "the policy")}
    feeds = [{name: obs[i:i + 1], **states} for i in range(len(obs))]
    return _time_calls(lambda f: run(None, f), feeds, n)


def latency(art: Artifact, robot: RobotTarget, n: int = 2000) -> dict[str, Any]:
    """Batch-1, one-thread latency: {"p50_us", "p99_us", "runtime"}."""
    if n < 1:
        raise ValueError("latency needs n >= 1 calls")
    return _cached((art.id, ("latency", _robot_key(robot), n)), lambda: _latency(art, robot, n))


def _latency(art: Artifact, robot: RobotTarget, n: int) -> dict[str, Any]:
    obs = random_obs(robot, 64, seed=1)
    if art.format == "onnx":
        return {**_ort_latency(ort_session(art.path), obs, n), "runtime": "onnxruntime"}
    if art.format == "tensorrt":
        raise ToolUnavailable("latency of a TensorRT engine is measured on its GPU; this "
                              "measurement runs TensorRT-free")
    if art.format == "c":
        from xcompile.cgen import harness_latency

        lat = harness_latency(art.path, obs, n=n)
        return {"p50_us": lat["p50_us"], "p99_us": lat["p99_us"], "runtime": "c"}
    call, runtime = _torch_callable(art, robot)
    inputs = [torch.as_tensor(obs[i:i + 1]) for i in range(len(obs))]
    with torch_single_thread(), torch.inference_mode():
        res = _time_calls(call, inputs, n)
    return {**res, "runtime": runtime}


def ort_floor_us(obs_dim: int, n: int = 2000) -> float:
    """onnxruntime's per-call floor (median µs) for a (1, obs_dim) float input: the latency of an
    Identity graph, measured like `latency`. Call it in the same run as the model's latency."""
    from onnx import TensorProto, helper  # heavy: only when the floor is measured

    graph = helper.make_graph(
        [helper.make_node("Identity", ["obs"], ["action"])], "floor",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, [1, obs_dim])],
        [helper.make_tensor_value_info("action", TensorProto.FLOAT, [1, obs_dim])])
    # onnx 1.23 writes IR 14 by default, which onnxruntime 1.31 refuses.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    obs = np.random.default_rng(1).standard_normal((64, obs_dim)).astype(np.float32)
    return _ort_latency(ort_session(model.SerializeToString()), obs, n)["p50_us"]


# --------------------------------------------------------------------------------------------
# score


REPORT_STREAM = "report"   # the seed stream every reported score is taken on


def score(art: Artifact, robot: RobotTarget, episodes: int, seed: int = 0) -> EvalResult:
    """Closed-loop score of the artifact's policy on `robot`, on episodes 0..episodes-1 of the
    "report" seed stream (observations recorded)."""
    return _cached((art.id, ("score", _robot_key(robot), episodes, seed)),
                   lambda: _score(art, robot, episodes, seed))


def _score(art: Artifact, robot: RobotTarget, episodes: int, seed: int) -> EvalResult:
    if art.format == "tensorrt":
        raise ToolUnavailable("a TensorRT engine is scored on its GPU; score its ONNX instead")
    if art.format == "c":
        from xcompile.cgen.load import load_c_policy

        policy, *_ = load_c_policy(art.path)
        return score_policy(policy, robot, episodes, seed, stream=REPORT_STREAM, record_obs=True)
    ex = current_executor()
    if ex != "serial":              # a pool (`use_executor`): workers load the file themselves
        return evaluate_file(art.path, robot, episodes, seed, REPORT_STREAM, record_obs=True,
                             executor=ex)
    return score_policy(load_policy(art.path, robot).act, robot, episodes, seed,
                        stream=REPORT_STREAM, record_obs=True)


# --------------------------------------------------------------------------------------------
# all of it


def measure_artifact(art: Artifact, robot: RobotTarget, episodes: int, seed: int = 0,
                     latency_n: int = 2000) -> dict[str, Any]:
    """One row of the report's stage table (stable keys). episodes=0 skips the score; a
    measurement that needs a missing tool (TensorRT) is None. The score comes with
    `score_ci95` ([low, high], bootstrap over episodes) and the per-episode `scores` (4 decimals,
    episode i of the "report" stream at index i: the same episodes for every stage)."""
    pb = count_params_bytes(art)
    row: dict[str, Any] = {"format": art.format, "params": pb["params"], "bytes": pb["bytes"],
                           "macs": None, "latency_p50_us": None, "latency_p99_us": None,
                           "runtime": None, "score": None, "score_std": None,
                           "score_ci95": None, "scores": None, "episodes": episodes}
    row["macs"] = macs(art, robot)
    try:
        lat = latency(art, robot, latency_n)
        row.update(latency_p50_us=round(lat["p50_us"], 2), latency_p99_us=round(lat["p99_us"], 2),
                   runtime=lat["runtime"])
    except ToolUnavailable:
        row["runtime"] = "tensorrt"
    if episodes > 0:
        try:
            res = score(art, robot, episodes, seed)
            row.update(score=round(res.score, 4),
                       score_std=round(float(np.std(res.scores)), 4),
                       score_ci95=res.score_ci95,
                       scores=[round(float(s), 4) for s in res.scores],
                       nonfinite_action_episodes=res.nonfinite_action_episodes)
        except ToolUnavailable:
            pass
    for k in ("latency_p50_us", "latency_p99_us", "score"):
        if isinstance(row[k], float) and not math.isfinite(row[k]):
            row[k] = None
    return row
