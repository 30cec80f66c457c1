"""The deployment contract: what a compiled policy promises about the robot it drives.

It lives in the ONNX model's `metadata_props` (every value a string) so that a runtime can refuse
a policy for another robot, the way a loader refuses a binary for another architecture. export-onnx
writes it (`deployment_contract`), later passes extend it (`extend_contract`), and every load checks
it (`check_contract`, `check_io_widths`). `KEYS` says what each key means.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xcompile import __version__
from xcompile.errors import ContractError
from xcompile.sim.env import obs_dim, obs_layout
from xcompile.targets import RobotTarget

KEYS: dict[str, str] = {
    "robot": "name of the robot target the policy was compiled for",
    "joint_order": "JSON list: the joint (or, for an airframe, rotor) names, in the order of the "
                   "action vector",
    "default_pose": "JSON list: each joint's default angle (rad); action 0 holds it",
    "action_scale": "float: target angle = default_pose + action_scale * action (rad)",
    "action_clip": "float: actions are clipped to [-action_clip, action_clip] first",
    "kp": "JSON list: each joint's PD stiffness",
    "kd": "JSON list: each joint's PD damping",
    "torque_limit": "JSON list: each joint's torque limit (N m)",
    "control_period_s": "float: seconds between two calls of the policy",
    "obs_layout": "JSON list of [name, width]: the named slices of the flat observation, in order",
    "family": "task family (locomotion, reach, quadrotor)",
    "motor_order": "quadrotor: JSON list, the rotors in action order (as joint_order)",
    "action_meaning": "quadrotor: how an action entry a drives its rotor",
    "frame": "quadrotor: axis convention of the observation (FLU: x forward, y left, z up)",
    "airframe": ("quadrotor: JSON object, the airframe the policy was compiled for (mass_kg, "
                 "inertia_kgm2, rotor_positions_m, rotor_spin, thrust_curve_n, "
                 "torque_per_thrust_m, motor_time_constant_up_s / _down_s)"),
    "source_checkpoint_sha256": "sha256 of the fat checkpoint the policy was compiled from",
    "pass_history": "JSON list: the passes that made the policy, in order",
    "xcompile_version": "version of xcompile that compiled it",
    "precision": "fp32, fp16 or int8: the precision of the weights (absent: fp32)",
    "int8_activations": (
        'int8 models only: "true", int8 activations (QDQ on every product); "false", weight-only '
        "int8: int8 weights behind their DequantizeLinear and float activations, which "
        "`xcompile.onnx.session.ort_session` opens with the DequantizeLinears folded into float "
        "constants at load"),
    "recurrent_state": (
        'recurrent policies only: JSON {"rule", "states"}: the rule "at the start of every '
        "episode feed the reset value; afterwards feed each step's output as the next step's "
        'input", and per state its graph "input" and "output" (batch first), "shape" per batch '
        'row, "dtype" and "reset" ("zeros" or the values); see `xcompile.onnx.recurrent`'),
}

# Keys whose values are JSON (the others are plain strings or Python float reprs).
JSON_KEYS = ("joint_order", "default_pose", "kp", "kd", "torque_limit", "obs_layout",
             "pass_history", "motor_order", "airframe")


def deployment_contract(robot: RobotTarget, source_sha256: str,
                        history: list[str]) -> dict[str, str]:
    """The contract of a policy for `robot` made from the fat checkpoint with sha256
    `source_sha256` by the passes `history`."""
    j, af = robot.joints, robot.airframe
    body = {
        "default_pose": json.dumps(list(j.default)),
        "action_scale": repr(float(j.action_scale)),
        "kp": json.dumps(list(j.kp)),
        "kd": json.dumps(list(j.kd)),
        "torque_limit": json.dumps(list(j.torque_limit)),
    } if j is not None else {
        "motor_order": json.dumps(robot.actuators),
        "action_meaning": "rotor speed command u = (clip(a) + 1) / 2 in [0, 1] (normalised), "
                          "a first-order lag to the rotor's speed, thrust c0 + c1 u + c2 u^2",
        "frame": "FLU",
        "airframe": json.dumps(af.model_dump(exclude={"rotors", "action_clip", "size_m"})),
    }
    return {
        "robot": robot.name,
        "joint_order": json.dumps(robot.actuators),
        **body,
        "action_clip": repr(float(robot.action_clip)),
        "control_period_s": repr(1.0 / robot.control_hz),
        "obs_layout": json.dumps([[name, width] for name, width in obs_layout(robot)]),
        "family": robot.family,
        "source_checkpoint_sha256": source_sha256,
        "pass_history": json.dumps(list(history)),
        "xcompile_version": __version__,
    }


def extend_contract(meta: Mapping[str, str], pass_name: str, **props: str) -> dict[str, str]:
    """`meta` with `props` set and `pass_name` appended to its pass history."""
    history = json.loads(meta.get("pass_history", "[]"))
    return {**meta, **props, "pass_history": json.dumps([*history, pass_name])}


def weight_only_int8(meta: Mapping[str, str]) -> bool:
    """Whether the contract says weight-only int8 (`int8_activations` = "false")."""
    return meta.get("int8_activations") == "false"


def _json_field(meta: Mapping[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(meta[key])
    except (TypeError, ValueError) as e:
        raise ContractError(
            f"{path}: the model metadata field '{key}' is not valid JSON ({e}): "
            f"{meta[key]!r:.80}. The policy's deployment contract is damaged; recompile it "
            f"(xcompile build FAT_CKPT --target ROBOT)"
        ) from e


def check_contract(meta: Mapping[str, str], robot: RobotTarget, path: Path) -> None:
    """Refuse a policy whose contract names another robot or another joint order."""
    compiled_for = meta.get("robot")
    if compiled_for is None:
        raise ContractError(f"{path}: no 'robot' in the model metadata; not an xcompile policy "
                            "(a foreign fat policy? give its --interface FILE.toml)")
    if compiled_for != robot.name:
        raise ContractError(
            f"{path} was compiled for robot '{compiled_for}', not '{robot.name}'. "
            f"Compile it for {robot.name}: xcompile build FAT_CKPT --target {robot.name}"
        )
    parsed = {key: _json_field(meta, key, path) for key in JSON_KEYS if key in meta}
    joints = parsed.get("joint_order", [])
    if not isinstance(joints, list) or not all(isinstance(j, str) for j in joints):
        raise ContractError(f"{path}: the model metadata field 'joint_order' is not a list of "
                            f"joint names: {meta['joint_order']!r:.80}; recompile the policy")
    if joints != robot.actuators:
        raise ContractError(
            f"{path}: joint order in the policy {joints} differs from the target's "
            f"{robot.actuators}; recompile for this robot description"
        )


def check_io_widths(n_obs: int | None, n_actions: int | None, robot: RobotTarget,
                    path: Path) -> None:
    """Refuse a policy whose observation or action width is not the robot's (None: not known)."""
    want_obs = obs_dim(robot)
    if n_obs is not None and n_obs != want_obs:
        raise ContractError(
            f"{path}: the policy takes observations of width {n_obs}, but robot "
            f"'{robot.name}' produces observations of width {want_obs}; it was not compiled for "
            f"this robot description. Recompile: xcompile build FAT_CKPT --target {robot.name}"
        )
    if n_actions is not None and n_actions != robot.n_joints:
        raise ContractError(
            f"{path}: the policy outputs {n_actions} actions, but robot '{robot.name}' has "
            f"{robot.n_joints} joints; it was not compiled for this robot description. "
            f"Recompile: xcompile build FAT_CKPT --target {robot.name}"
        )
