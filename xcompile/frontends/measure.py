"""The report's row for a foreign fat graph, and `measure_any`, which the pass manager uses.

A fat-graph artifact is measured as the fat policy driven for the target: parameters are the
graph's stored weight elements (initializers and Constant tensors, int64 left out, as
`xcompile.measure.onnx_param_count` counts an ONNX policy), bytes the model file's size, MACs those
of the graph with the body's values bound but not folded (every body's work the fat policy does
on each call), latency batch-1 in onnxruntime with the body's values fed, and the score on the
"report" seed stream like every other stage. Other formats go to `xcompile.measure`.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from xcompile.artifact import Artifact
from xcompile.evaluate import score_policy
from xcompile.frontends import FAT_GRAPH
from xcompile.frontends.graph import graph_params
from xcompile.measure import REPORT_STREAM, measure_artifact, onnx_macs
from xcompile.sim.observations import random_obs
from xcompile.targets import RobotTarget


def _bound_macs(model: Any, values: dict[str, np.ndarray]) -> int | None:
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name, v in values.items():
        for vi in list(m.graph.input):
            if vi.name == name:
                m.graph.input.remove(vi)
        m.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(v), name))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fat.onnx"
        path.write_bytes(m.SerializeToString())
        try:
            return onnx_macs(path)
        except Exception:  # noqa: BLE001 (shapes a foreign graph leaves dynamic: MACs unknown)
            return None


def measure_fat_graph(art: Artifact, robot: RobotTarget, episodes: int, seed: int = 0,
                      latency_n: int = 2000) -> dict[str, Any]:
    from xcompile.frontends.graph import artifact_graph, fat_act

    fg = artifact_graph(art, robot)
    act = fat_act(fg)
    obs = random_obs(robot, 64, seed=1)
    for i in range(min(200, max(10, latency_n // 10))):
        act(obs[i % 64:i % 64 + 1])
    times = np.empty(latency_n)
    for i in range(latency_n):
        x = obs[i % 64:i % 64 + 1]
        t0 = time.perf_counter_ns()
        act(x)
        times[i] = time.perf_counter_ns() - t0
    row: dict[str, Any] = {
        "format": art.format, "params": graph_params(fg.model), "bytes": art.n_bytes,
        "macs": _bound_macs(fg.model, fg.values),
        "latency_p50_us": round(float(np.percentile(times, 50)) / 1e3, 2),
        "latency_p99_us": round(float(np.percentile(times, 99)) / 1e3, 2),
        "runtime": "onnxruntime", "score": None, "score_std": None, "score_ci95": None,
        "scores": None, "episodes": episodes}
    if episodes > 0:
        res = score_policy(act, robot, episodes, seed, stream=REPORT_STREAM, record_obs=True)
        row.update(score=round(res.score, 4), score_std=round(float(np.std(res.scores)), 4),
                   score_ci95=res.score_ci95, scores=[round(float(s), 4) for s in res.scores],
                   nonfinite_action_episodes=res.nonfinite_action_episodes)
        if not math.isfinite(row["score"]):
            row["score"] = None
    return row


def measure_any(art: Artifact, robot: RobotTarget, episodes: int, seed: int = 0,
                latency_n: int = 2000) -> dict[str, Any]:
    """`xcompile.measure.measure_artifact`, and the fat-graph row for a foreign fat policy."""
    if art.format == FAT_GRAPH:
        return measure_fat_graph(art, robot, episodes, seed, latency_n)
    return measure_artifact(art, robot, episodes, seed, latency_n)


def inspect_graph(path: str | Path, interface: str | Path | None = None) -> dict[str, Any]:
    """What `xcompile inspect` prints for a foreign fat policy (.onnx or .pt2): its inputs and
    outputs, stored weights and bytes and, with an interface, what each body it serves keeps
    after pin-embodiment (the graph pinned for that body and its weights counted)."""
    from xcompile.artifact import file_sha256
    from xcompile.frontends.graph import FatGraph, graph_io, load_graph, state_outputs
    from xcompile.frontends.interface import check_bodies, read_interface
    from xcompile.frontends.pin import pin_graph
    from xcompile.targets import list_robots, load_robot

    path = Path(path)
    iface = read_interface(interface) if interface is not None else None
    model = load_graph(path, iface.action if iface else "action",
                       state_outputs(iface) if iface else ())
    ins, outs = graph_io(model)
    total = graph_params(model)

    def io(g: Any) -> dict[str, Any]:
        return {"name": g.name, "dtype": np.dtype(g.dtype).name, "shape": list(g.shape)}

    info: dict[str, Any] = {
        "format": f"foreign ({path.suffix[1:]})", "path": str(path), "bytes": path.stat().st_size,
        "sha256": file_sha256(path), "params_total": total, "inputs": [io(g) for g in ins],
        "outputs": [io(g) for g in outs], "interface": None if interface is None else str(interface),
        "family": iface.family if iface else None, "bodies": []}
    if iface is None:
        return info
    states, tables = check_bodies(iface, ins, outs, str(interface))
    info["recurrent"] = [s.as_json() for s in states]
    known = set(list_robots())
    for body, values in tables.items():
        used = graph_params(pin_graph(FatGraph(model, iface, ins, outs, values, states)))
        info["bodies"].append({
            "name": body, "family": iface.family,
            "n_joints": load_robot(body).n_joints if body in known else None,
            "params_used": used, "fraction_used": used / total if total else 0.0})
    return info
