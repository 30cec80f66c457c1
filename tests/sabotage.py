"""Sabotaged policies for fidelity tests: a test that says "B scores as well as A" must fail when B
is a broken copy of A. Each helper breaks a policy the way a compiler bug would: the actions
scaled (a lost normalisation), one joint's action zeroed (a dropped row), the joints in another
order (a permuted output).

Batch policies (`act(obs (B, obs_dim)) -> (B, n_act)`) are wrapped in memory; an ONNX policy is
sabotaged on disk (`sabotage_onnx`), metadata (the deployment contract) kept, so that
`xcompile eval` and `xcompile.measure.score` load it like the real one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

BatchPolicy = Callable[[np.ndarray], np.ndarray]

SCALE = 0.7        # "actions x 0.7"
ZEROED_JOINT = 1   # a1: the front-right thigh; panda: the shoulder (joint2)


def scaled(act: BatchPolicy, factor: float = SCALE) -> BatchPolicy:
    """`act` with every action multiplied by `factor`."""
    return lambda obs: factor * np.asarray(act(obs))


def zero_joint(act: BatchPolicy, joint: int = ZEROED_JOINT) -> BatchPolicy:
    """`act` with joint `joint`'s action always 0 (the joint held at its default pose)."""
    def sabotaged(obs: np.ndarray) -> np.ndarray:
        a = np.array(act(obs), copy=True)
        a[:, joint] = 0.0
        return a
    return sabotaged


def permuted(act: BatchPolicy, order: Sequence[int]) -> BatchPolicy:
    """`act` with output column k taken from column order[k]."""
    idx = np.asarray(order)
    return lambda obs: np.ascontiguousarray(np.asarray(act(obs))[:, idx])


def reversed_joints(act: BatchPolicy) -> BatchPolicy:
    """`act` with its joints in reverse order."""
    return lambda obs: np.ascontiguousarray(np.asarray(act(obs))[:, ::-1])


def rolled_joints(act: BatchPolicy, shift: int = 1) -> BatchPolicy:
    """`act` with its joints shifted cyclically by `shift` places."""
    return lambda obs: np.ascontiguousarray(np.roll(np.asarray(act(obs)), shift, axis=1))


SABOTAGES: dict[str, Callable[[BatchPolicy], BatchPolicy]] = {
    "scaled": scaled,
    "zeroed": zero_joint,
    "reversed": reversed_joints,
    "rolled": rolled_joints,
}


def onnx_sabotage(name: str, n_joints: int) -> dict:
    """`sabotage_onnx` keyword arguments that do on disk what SABOTAGES[name] (or rolled_joints)
    does in memory."""
    joints = list(range(n_joints))
    return {"scaled": {"scale": SCALE},
            "zeroed": {"scale": [0.0 if j == ZEROED_JOINT else 1.0 for j in joints]},
            "reversed": {"scale": 1.0, "order": joints[::-1]},
            "rolled": {"scale": 1.0, "order": np.roll(joints, 1).tolist()}}[name]


def sabotage_onnx(src: str | Path, dst: str | Path, scale: float | Sequence[float] = SCALE,
                  order: Sequence[int] | None = None) -> Path:
    """Write a copy of the ONNX policy `src` to `dst` whose action is multiplied by `scale` (a
    number, or one factor per joint: 0 zeroes a joint) and then, with `order`, permuted (column k
    from column order[k]). The graph's action output is rerouted through a Mul (and a Gather);
    inputs, outputs, their names and shapes and the metadata stay as they were."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    out_name = graph.output[0].name
    pre = out_name + "_before_sabotage"
    for node in graph.node:
        node.output[:] = [pre if o == out_name else o for o in node.output]
        # (a node that reads the action inside the graph would now read the sabotaged one: none do)
    factor = np.asarray(scale, dtype=np.float32)
    graph.initializer.append(numpy_helper.from_array(factor, "sabotage_scale"))
    nodes = [helper.make_node("Mul", [pre, "sabotage_scale"],
                              [out_name if order is None else pre + "_scaled"],
                              name="sabotage_mul")]
    if order is not None:
        graph.initializer.append(numpy_helper.from_array(np.asarray(order, dtype=np.int64),
                                                         "sabotage_order"))
        nodes.append(helper.make_node("Gather", [pre + "_scaled", "sabotage_order"], [out_name],
                                      axis=1, name="sabotage_gather"))
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def sabotage_checkpoint(src: str | Path, dst: str | Path, factor: float = SCALE) -> Path:
    """Write a copy of the fat checkpoint `src` to `dst` whose actions, for every body, are
    multiplied by `factor`: each family's action head (weight and bias) and joint-state skip are
    scaled, and the action is their sum. Registry and config are kept."""
    import torch

    from xcompile.models.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(src)
    with torch.no_grad():
        for family in ckpt.config.families:
            for p in (*ckpt.model.heads[family].parameters(),
                      *ckpt.model.skips[family].parameters()):
                p.mul_(factor)
    return save_checkpoint(dst, ckpt.model, ckpt.registry,
                           extra={**ckpt.extra, "sabotaged": f"actions x {factor}"})
