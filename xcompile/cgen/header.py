"""The text of policy.h: the C API of a compiled policy and its deployment contract as macros.

Every contract value becomes a #define (an initializer-list macro for per-joint lists, so the
header defines no storage); missing keys are omitted. Strings are C-escaped byte by byte, so a
hostile robot or joint name cannot break out of its literal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from xcompile.cgen.emit import EMITTER_VERSION, c_comment, c_float
from xcompile.errors import ContractError

_PLAIN = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _.,:;+-/=()#@!%&*<>[]{}|~^'$")


def c_string(text: str) -> str:
    """`text` as a C string literal: UTF-8, anything but plain ASCII as 3-digit octal escapes."""
    out = []
    for b in str(text).encode("utf-8"):
        ch = chr(b)
        out.append(ch if ch in _PLAIN else f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def c_ident(name: str) -> str:
    """`name` as the upper-case tail of a C identifier."""
    s = re.sub(r"[^0-9A-Za-z]+", "_", str(name)).strip("_").upper()
    return s or "UNNAMED"


def _num(v: Any) -> str:
    lit = c_float(float(v))
    return f"({lit})" if lit.startswith("-") else lit


def _json_list(contract: Mapping[str, str], key: str) -> list[Any] | None:
    if key not in contract:
        return None
    try:
        val = json.loads(contract[key])
    except (TypeError, ValueError) as e:
        raise ContractError(f"contract key {key!r} is not JSON ({e}): {contract[key]!r:.80}") from e
    if not isinstance(val, list):
        raise ContractError(f"contract key {key!r} is not a JSON list: {contract[key]!r:.80}")
    return val


def _contract(contract: Mapping[str, str], obs_dim: int, act_dim: int) -> list[str]:
    lines: list[str] = []
    try:
        for key, macro in (("robot", "XC_ROBOT"), ("family", "XC_FAMILY"),
                           ("precision", "XC_PRECISION"),
                           ("source_checkpoint_sha256", "XC_SOURCE_CHECKPOINT_SHA256"),
                           ("xcompile_version", "XC_XCOMPILE_VERSION"), ("frame", "XC_FRAME")):
            if key in contract:
                lines.append(f"#define {macro} {c_string(contract[key])}")
        if "int8_activations" in contract:
            lines.append("#define XC_INT8_ACTIVATIONS "
                         f"{1 if contract['int8_activations'] == 'true' else 0}")
        history = _json_list(contract, "pass_history")
        if history is not None:
            lines.append(f"#define XC_PASS_HISTORY {c_string(','.join(map(str, history)))}")
        joints = _json_list(contract, "joint_order")
        if joints:
            lines += [f"#define XC_JOINT_ORDER {c_string(','.join(map(str, joints)))}",
                      f"#define XC_N_JOINTS {len(joints)}"]
        lists = []
        for key, macro in (("default_pose", "XC_DEFAULT_POSE"), ("kp", "XC_KP"),
                           ("kd", "XC_KD"), ("torque_limit", "XC_TORQUE_LIMIT")):
            vals = _json_list(contract, key)
            if vals:
                lists.append(f"#define {macro} {{ {', '.join(c_float(float(v)) for v in vals)} }}")
        if lists:
            lines += ["", "/* Per-joint lists, in joint order, as initializer lists, e.g.",
                      " *   static const float q0[XC_N_JOINTS] = XC_DEFAULT_POSE; */", *lists]
        for key, macro in (("action_scale", "XC_ACTION_SCALE"), ("action_clip", "XC_ACTION_CLIP"),
                           ("control_period_s", "XC_CONTROL_PERIOD_S")):
            if key in contract:
                lines.append(f"#define {macro} {_num(contract[key])}")
        layout = _json_list(contract, "obs_layout")
    except (TypeError, ValueError) as e:
        raise ContractError(f"the deployment contract has a malformed value ({e})") from e
    if layout:
        try:
            parts = [(str(name), int(width)) for name, width in layout]
        except (TypeError, ValueError) as e:
            raise ContractError(f"contract key 'obs_layout' is not a list of [name, width] "
                                f"({e})") from e
        if sum(w for _, w in parts) != obs_dim or any(w < 0 for _, w in parts):
            raise ContractError(f"contract key 'obs_layout' covers {sum(w for _, w in parts)} "
                                f"observation entries but the policy takes {obs_dim}")
        lines += ["", "/* Observation layout (the named slices of obs, in order):",
                  " *   offset  size  name"]
        offset, used, defs = 0, set(), []
        for name, width in parts:
            ident, n = c_ident(name), 2
            while ident in used:
                ident, n = f"{c_ident(name)}_{n}", n + 1
            used.add(ident)
            lines.append(f" *   {offset:6d}  {width:4d}  {c_comment(name)}")
            defs += [f"#define XC_OBS_{ident}_OFFSET {offset}", f"#define XC_OBS_{ident}_SIZE {width}"]
            offset += width
        lines += [" */", *defs]
    return lines


QUADROTOR_FORMULA = """\
/* Rotor commands. Each control period (XC_CONTROL_PERIOD_S), with obs built as in the layout
 * above (frame XC_FRAME: x forward, y left, z up), call xc_policy_step(obs, action) and command
 * rotor i (in XC_JOINT_ORDER) to the normalised speed
 *     u_i = (clip(action_i, -action_clip, action_clip) + 1) / 2, in [0, 1]
 * (XC_ACTION_CLIP); the airframe the policy was compiled for is in the ONNX model's metadata
 * ("airframe": mass, inertia, rotor positions, thrust curve, motor time constants). */"""

FORMULA = """\
/* Joint targets. Each control period (XC_CONTROL_PERIOD_S), with obs built as in the layout
 * above, call xc_policy_step(obs, action) and command joint i (in XC_JOINT_ORDER) to
 *     q*_i = default_pose_i + action_scale * clip(action_i, -action_clip, action_clip)
 * (XC_DEFAULT_POSE, XC_ACTION_SCALE, XC_ACTION_CLIP), tracked by a PD loop with gains XC_KP,
 * XC_KD and torques limited to XC_TORQUE_LIMIT. */"""


def policy_h(obs_dim: int, act_dim: int, contract: Mapping[str, str] | None, sha256: str,
             header_name: str, stack_bytes: int) -> str:
    """The text of the header for a policy of these widths and `contract`."""
    guard = "XC_" + c_ident(header_name) + "_INCLUDED"
    robot = (contract or {}).get("robot")
    lines = [f"/* {c_comment(header_name)}: compiled policy"
             + (f" for robot {c_comment(robot)}." if robot else "."),
             f" * Generated by xcompile emit-c, emitter version {EMITTER_VERSION}; do not edit. */",
             f"#ifndef {guard}", f"#define {guard}", "", "#ifdef __cplusplus",
             'extern "C" {', "#endif", "",
             f"#define XC_EMITTER_VERSION {EMITTER_VERSION}",
             f"#define XC_OBS_DIM {obs_dim}", f"#define XC_ACT_DIM {act_dim}"]
    if sha256:
        lines.append(f"#define XC_SOURCE_SHA256 {c_string(sha256)}")
    if contract:
        lines += ["", "/* Deployment contract (from the ONNX model's metadata). */"]
        lines += _contract(contract, obs_dim, act_dim)
        formula = QUADROTOR_FORMULA if contract.get("family") == "quadrotor" else FORMULA
        lines += ["", *formula.splitlines()]
    lines += ["",
              "/* One control step: obs[XC_OBS_DIM] -> action[XC_ACT_DIM] (must not overlap).",
              f" * Stateless and reentrant; uses about {stack_bytes} bytes of stack for its",
              " * activation buffers, no heap. */",
              "void xc_policy_step(const float *obs, float *action);",
              "/* n steps on n rows at once (row-major, XC_OBS_DIM and XC_ACT_DIM floats a row). */",
              "void xc_policy_step_batch(const float *obs, float *action, int n);",
              "/* Start of an episode. A no-op: this policy is stateless (kept so that callers",
              " * need not change when a policy with state is compiled). */",
              "void xc_policy_reset(void);",
              "/* XC_OBS_DIM and XC_ACT_DIM, for loaders that cannot read the macros. */",
              "int xc_policy_obs_dim(void);", "int xc_policy_act_dim(void);", "",
              "#ifdef __cplusplus", "}", "#endif", "", f"#endif /* {guard} */"]
    return "\n".join(lines) + "\n"
