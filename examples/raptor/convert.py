"""Convert RAPTOR, the quadrotor foundation policy, into xcompile's ONNX front-end form.

    pip install foundation-policy        # 1.0.2: MIT, weights and test vectors inside the package
    python examples/raptor/convert.py OUT_DIR [--checkpoint PATH/checkpoint.h5]

writes OUT_DIR/raptor.onnx and OUT_DIR/raptor.toml. Nothing is fetched from the internet: the
weights are the package's own `foundation_policy/blob/checkpoint.h5`, read as data with h5py (no
code from the package runs here).

The network (the checkpoint's `actor`, a 3-layer sequential model; 2,084 stored parameters with
the GRU's initial state):

    x      = relu(obs @ W0.T + b0)                      Dense 22 -> 16
    gi     = x @ Wi.T + bi,  gh = h_in @ Wh.T + bh      GRU(16): 48 = [r | z | n] rows
    r, z   = sigmoid(gi[:16] + gh[:16]), sigmoid(gi[16:32] + gh[16:32])
    n      = tanh(gi[32:] + r * gh[32:])                 r gates the hidden product *with* its bias
    h_out  = z * h_in + (1 - z) * n
    action = h_out @ W2.T + b2                          Dense 16 -> 4, identity

Gate order r, z, n and the reset applied after the hidden bias are PyTorch's GRU convention (not
ONNX's GRU operator, whose gate order is z, r, h), read from the package's numpy reference. The
graph is written node by node (MatMul/Add/Split/Sigmoid/Tanh/Mul), not as an ONNX GRU operator:
every weight is a plain MatMul initializer, which xcompile's quantizers and C back end understand.
The state is explicit: inputs `obs` (batch, 22) and `h_in` (batch, 16), outputs `action`
(batch, 4) and `h_out` (batch, 16). Reset: `h_in` = the checkpoint's initial hidden state (zeros)
at the start of an episode, then each step's `h_out`.

The action output is the network's raw output, exactly as the package computes it: the checkpoint
holds no tanh or clipping layer, and on the package's own (random-input) example sequence the
outputs reach 3.3. The motor commands RAPTOR's README promises are in [-1, 1], so whoever drives a
quadrotor with it clips them (recorded as `action_clip` = 1.0 in the metadata and the TOML).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from xcompile.onnx.recurrent import StateSpec, contract_value

PACKAGE = "foundation-policy"
OBS_LAYOUT = [   # (name, width, meaning): the package README and the checkpoint's own meta
    ("position", 3, "position relative to the target (m), FLU world frame"),
    ("rotation_matrix", 9, "orientation as a rotation matrix (body to world), row-major: "
     "R(orientation).flatten()"),
    ("linear_velocity", 3, "linear velocity (m/s), FLU world frame"),
    ("angular_velocity", 3, "angular velocity (rad/s), body frame"),
    ("previous_action", 4, "the action of the previous step (motor order below)"),
]
MOTOR_ORDER = ["front_right", "back_right", "back_left", "front_left"]
CONTROL_PERIOD_S = 0.01
OBS, H_IN, ACTION, H_OUT = "obs", "h_in", "action", "h_out"
ACTIVATIONS = {"IDENTITY": None, "RELU": "Relu", "TANH": "Tanh", "SIGMOID": "Sigmoid"}
MAX_CHECKPOINT_BYTES = 16 << 20   # the shipped one is 142 KB


class ConvertError(Exception):
    """The checkpoint is not the RAPTOR architecture this script converts."""


def package_checkpoint() -> Path:
    """The checkpoint inside the installed foundation-policy package, found without importing
    the package."""
    spec = importlib.util.find_spec("foundation_policy")
    if spec is None or not spec.submodule_search_locations:
        raise ConvertError(f"the {PACKAGE} package is not installed: pip install {PACKAGE}")
    path = Path(list(spec.submodule_search_locations)[0]) / "blob" / "checkpoint.h5"
    if not path.is_file():
        raise ConvertError(f"{path}: not in the installed {PACKAGE} package")
    return path


def package_version() -> str | None:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def _matrix(group: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(group[name]["parameters"][()], dtype=np.float32)
    if a.shape not in (shape, (1, *shape)):     # biases are stored as (1, n) matrices
        raise ConvertError(f"{group.name}/{name}: shape {a.shape}, expected {shape}")
    a = a.reshape(shape)
    if not np.all(np.isfinite(a)):
        raise ConvertError(f"{group.name}/{name}: holds NaN or Inf")
    return a


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The actor's weights and facts, checked to be Dense -> GRU -> Dense as RAPTOR is."""
    import h5py  # a dependency of foundation-policy

    if not path.is_file() or path.stat().st_size > MAX_CHECKPOINT_BYTES:
        raise ConvertError(f"{path}: not a checkpoint file of at most {MAX_CHECKPOINT_BYTES} bytes")
    with h5py.File(path, "r") as f:
        actor = f["actor"]
        if actor.attrs.get("type") != "sequential" or len(actor["layers"]) != 3:
            raise ConvertError(f"{path}: actor is not a 3-layer sequential model")
        l0, l1, l2 = (actor["layers"][str(i)] for i in range(3))
        kinds = [str(g.attrs.get("type")) for g in (l0, l1, l2)]
        if kinds != ["dense", "gru", "dense"]:
            raise ConvertError(f"{path}: layers are {kinds}, expected dense, gru, dense")
        w0 = np.asarray(l0["weights"]["parameters"][()], dtype=np.float32)
        n_hidden, n_obs = w0.shape
        n_state = np.asarray(l1["weights_hidden"]["parameters"][()]).shape[1]
        n_act = np.asarray(l2["weights"]["parameters"][()]).shape[0]
        acts = [str(g.attrs.get("activation_function")) for g in (l0, l2)]
        for a in acts:
            if a not in ACTIVATIONS:
                raise ConvertError(f"{path}: activation {a} is not one this script converts")
        w = {
            "W0": _matrix(l0, "weights", (n_hidden, n_obs)),
            "b0": _matrix(l0, "biases", (n_hidden,)),
            "Wi": _matrix(l1, "weights_input", (3 * n_state, n_hidden)),
            "bi": _matrix(l1, "biases_input", (3 * n_state,)),
            "Wh": _matrix(l1, "weights_hidden", (3 * n_state, n_state)),
            "bh": _matrix(l1, "biases_hidden", (3 * n_state,)),
            "h0": _matrix(l1, "initial_hidden_state", (n_state,)),
            "W2": _matrix(l2, "weights", (n_act, n_state)),
            "b2": _matrix(l2, "biases", (n_act,)),
        }
        meta = json.loads(actor.attrs.get("meta", "{}"))
        name = actor.attrs.get("checkpoint_name")
    if (n_obs, n_act) != (sum(width for _, width, _ in OBS_LAYOUT), len(MOTOR_ORDER)):
        raise ConvertError(f"{path}: observation {n_obs} and action {n_act} wide, expected 22 and 4")
    return {"weights": w, "activations": acts, "n_obs": n_obs, "n_hidden": n_hidden,
            "n_state": n_state, "n_act": n_act, "meta": meta,
            "checkpoint_name": None if name is None else str(name),
            "params": int(sum(a.size for a in w.values()))}


def build_model(ck: dict[str, Any], props: dict[str, str]) -> Any:
    """The ONNX graph obs, h_in -> action, h_out (dynamic batch), metadata `props`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w, s = ck["weights"], ck["n_state"]
    inits = [numpy_helper.from_array(a, f"raptor.{k}") for k, a in (
        ("dense0.weight_t", w["W0"].T.copy()), ("dense0.bias", w["b0"]),
        ("gru.weight_input_t", w["Wi"].T.copy()), ("gru.bias_input", w["bi"]),
        ("gru.weight_hidden_t", w["Wh"].T.copy()), ("gru.bias_hidden", w["bh"]),
        ("dense2.weight_t", w["W2"].T.copy()), ("dense2.bias", w["b2"]))]
    inits += [numpy_helper.from_array(np.array([2 * s, s], np.int64), "split_rz_n"),
              numpy_helper.from_array(np.array([s, s], np.int64), "split_r_z"),
              numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    node = helper.make_node
    nodes = [node("MatMul", [OBS, "raptor.dense0.weight_t"], ["d0_mm"], name="dense0_matmul"),
             node("Add", ["d0_mm", "raptor.dense0.bias"], ["d0_pre"], name="dense0_bias")]
    x = "d0_pre"
    act0, act2 = (ACTIVATIONS[a] for a in ck["activations"])
    if act0:
        nodes.append(node(act0, [x], ["d0"], name="dense0_act"))
        x = "d0"
    nodes += [
        node("MatMul", [x, "raptor.gru.weight_input_t"], ["gi_mm"], name="gru_input_matmul"),
        node("Add", ["gi_mm", "raptor.gru.bias_input"], ["gi"], name="gru_input_bias"),
        node("MatMul", [H_IN, "raptor.gru.weight_hidden_t"], ["gh_mm"], name="gru_hidden_matmul"),
        node("Add", ["gh_mm", "raptor.gru.bias_hidden"], ["gh"], name="gru_hidden_bias"),
        node("Split", ["gi", "split_rz_n"], ["gi_rz", "gi_n"], axis=1, name="gru_input_split"),
        node("Split", ["gh", "split_rz_n"], ["gh_rz", "gh_n"], axis=1, name="gru_hidden_split"),
        node("Add", ["gi_rz", "gh_rz"], ["rz_pre"], name="gru_rz_pre"),
        node("Sigmoid", ["rz_pre"], ["rz"], name="gru_rz"),
        node("Split", ["rz", "split_r_z"], ["r", "z"], axis=1, name="gru_r_z"),
        node("Mul", ["r", "gh_n"], ["r_gh_n"], name="gru_reset"),
        node("Add", ["gi_n", "r_gh_n"], ["n_pre"], name="gru_n_pre"),
        node("Tanh", ["n_pre"], ["n"], name="gru_n"),
        node("Mul", ["z", H_IN], ["z_h"], name="gru_keep"),
        node("Sub", ["one", "z"], ["one_minus_z"], name="gru_one_minus_z"),
        node("Mul", ["one_minus_z", "n"], ["new_n"], name="gru_update"),
        node("Add", ["z_h", "new_n"], ["h_new"], name="gru_state"),
        # The new state leaves through an Identity rather than being read inside the graph as
        # the output h_out itself: onnxconverter-common's fp16 conversion (keep_io_types) casts
        # a graph output back to float32 and then feeds that float32 copy to its fp16 readers.
        node("Identity", ["h_new"], [H_OUT], name="gru_state_out"),
        node("MatMul", ["h_new", "raptor.dense2.weight_t"], ["d2_mm"], name="dense2_matmul"),
        node("Add", ["d2_mm", "raptor.dense2.bias"], ["d2_pre" if act2 else ACTION],
             name="dense2_bias"),
    ]
    if act2:
        nodes.append(node(act2, ["d2_pre"], [ACTION], name="dense2_act"))
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "raptor",
        [helper.make_tensor_value_info(OBS, f, ["batch", ck["n_obs"]]),
         helper.make_tensor_value_info(H_IN, f, ["batch", s])],
        [helper.make_tensor_value_info(ACTION, f, ["batch", ck["n_act"]]),
         helper.make_tensor_value_info(H_OUT, f, ["batch", s])],
        initializer=inits)
    # onnx 1.23 writes IR 14 by default, which onnxruntime 1.31+ refuses.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10,
                              producer_name="xcompile examples/raptor/convert.py")
    for key in sorted(props):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, props[key]
    onnx.checker.check_model(model, full_check=True)
    return model


def _reset(ck: dict[str, Any]) -> str | list[float]:
    h0 = ck["weights"]["h0"]
    return "zeros" if not np.any(h0) else [float(v) for v in h0]


def metadata_props(ck: dict[str, Any], sha256: str, version: str | None) -> dict[str, str]:
    """The facts a runtime needs, as strings (JSON where structured), in the deployment
    contract's key names where one means the same (`xcompile.onnx.contract.KEYS`)."""
    reset = _reset(ck)
    state = StateSpec(H_IN, H_OUT, (ck["n_state"],), "float32",
                      reset if isinstance(reset, str) else tuple(reset))
    return {
        "family": "quadrotor",
        "family_note": "xcompile's quadrotor world (xcompile/sim/quadrotor.py) speaks these "
                       "conventions: xcompile eval raptor.onnx --interface raptor.toml "
                       "--target crazyflie",
        "obs_layout": json.dumps([[n, w] for n, w, _ in OBS_LAYOUT]),
        "obs_meaning": json.dumps({n: m for n, _, m in OBS_LAYOUT}),
        "frame": "FLU (x forward, y left, z up); angular velocity in the body frame",
        "action_order": json.dumps(MOTOR_ORDER),
        "action_meaning": "normalised motor commands, one per motor, in action_order",
        "action_range": json.dumps([-1.0, 1.0]),
        "action_clip": "1.0",
        "action_note": "the output is the network's raw output (no tanh in the checkpoint); "
                       "clip it to action_range before commanding motors",
        "control_period_s": repr(CONTROL_PERIOD_S),
        "recurrent_state": contract_value([state]),   # as xcompile's runtime loader reads it
        "source": f"{PACKAGE} {version or '(version unknown)'} (PyPI, MIT): RAPTOR, "
                  "https://github.com/rl-tools/raptor",
        "source_package": PACKAGE,
        "source_package_version": version or "unknown",
        "source_checkpoint": "foundation_policy/blob/checkpoint.h5",
        "source_checkpoint_sha256": sha256,
        "source_checkpoint_name": ck["checkpoint_name"] or "",
        "source_observation_spec": json.dumps(ck["meta"].get("environment", {})),
        "source_params": str(ck["params"]),
        "interface": "raptor.toml (xcompile-interface/1 with a [recurrent] table)",
    }


def _toml_str(v: Any) -> str:
    return json.dumps(v)   # a JSON string or list of numbers/strings is valid TOML


def interface_toml(ck: dict[str, Any], props: dict[str, str]) -> str:
    reset = _reset(ck)
    lines = [
        "# RAPTOR, the quadrotor foundation policy, converted by examples/raptor/convert.py into",
        "# raptor.onnx: obs (batch, 22), h_in (batch, 16) -> action (batch, 4), h_out (batch, 16).",
        f"# Source: {props['source']}",
        f"#   {props['source_checkpoint']}, sha256 {props['source_checkpoint_sha256']}",
        "# The same facts are in raptor.onnx's metadata_props.",
        "#",
        "# The xcompile-interface/1 format (README, 'Foreign fat policies'): no [bodies.*] tables",
        "# (RAPTOR has no embodiment input: it infers the airframe from its own observation",
        "# history, which is what its GRU state is for), a [recurrent] table, and the conventions",
        "# it expects of the world (control period, frame, observation slices, motor order and",
        "# range), which xcompile checks against the target before driving it:",
        "#   xcompile eval raptor.onnx --interface raptor.toml --target crazyflie",
        'format = "xcompile-interface/1"',
        f'observation = "{OBS}"          # graph input: the flat observation (batch first)',
        f'action = "{ACTION}"            # graph output: 4 motor commands (raw; see [action_spec])',
        'family = "quadrotor"         # xcompile/sim/quadrotor.py; airframes crazyflie, racer250, x500',
        f"control_period_s = {CONTROL_PERIOD_S}      # one policy step = 10 ms (100 Hz)",
        '# Axis conventions: FLU (x forward, y left, z up); angular velocity in the body frame.',
        'frame = "FLU"',
        "",
        "# The observation, in order (22 values): name, width, meaning.",
        "obs_layout = [",
    ]
    for name, width, meaning in OBS_LAYOUT:
        lines.append(f'  {{ name = "{name}", size = {width} }},   # {meaning}')
    lines += [
        "]",
        "",
        "[action_spec]",
        f"order = {_toml_str(MOTOR_ORDER)}",
        "range = [-1.0, 1.0]    # normalised motor commands (the airframe maps them to thrust)",
        "clip = 1.0             # the graph's output is NOT clipped: the checkpoint has no tanh,",
        "                       # and its raw output can leave [-1, 1]; clip before use",
        "",
        "# Recurrent state: one GRU. Reset at the start of every episode (h_in = reset), then feed",
        "# each step's h_out back as the next step's h_in. The batch dimension is the first.",
        "[recurrent]",
        "[[recurrent.state]]",
        f'input = "{H_IN}"',
        f'output = "{H_OUT}"',
        f"shape = [{ck['n_state']}]           # per batch row: (batch, {ck['n_state']})",
        'dtype = "float32"',
        ('reset = "zeros"        # the checkpoint\'s initial_hidden_state is all zeros'
         if reset == "zeros" else f"reset = {_toml_str(reset)}   # the checkpoint's "
                                  "initial_hidden_state"),
        "",
        "[source]",
        f'package = "{PACKAGE}"',
        f'version = "{props["source_package_version"]}"',
        'license = "MIT"',
        f'checkpoint = "{props["source_checkpoint"]}"',
        f'sha256 = "{props["source_checkpoint_sha256"]}"',
        f"params = {ck['params']}         # stored in the checkpoint, the initial state included",
        "",
    ]
    return "\n".join(lines)


def convert(out_dir: Path, checkpoint: Path | None = None) -> tuple[Path, Path]:
    """Write out_dir/raptor.onnx and out_dir/raptor.toml; return their paths."""
    from xcompile.onnx.model import save_onnx
    from xcompile.outdir import atomic_write

    try:
        shipped: Path | None = package_checkpoint()
    except ConvertError:
        if checkpoint is None:
            raise
        shipped = None
    path = checkpoint or shipped
    assert path is not None
    ck = read_checkpoint(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    # The package's version names the weights only when they are the package's own file.
    ours = shipped is not None and path.resolve() == shipped.resolve()
    props = metadata_props(ck, sha, package_version() if ours else None)
    model = build_model(ck, props)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path, toml_path = out_dir / "raptor.onnx", out_dir / "raptor.toml"
    save_onnx(model, onnx_path)
    atomic_write(toml_path, interface_toml(ck, props).encode())
    return onnx_path, toml_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path, help="folder for raptor.onnx and raptor.toml")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="a RAPTOR checkpoint.h5 (default: the installed package's own)")
    args = ap.parse_args(argv)
    try:
        onnx_path, toml_path = convert(args.out_dir, args.checkpoint)
    except (ConvertError, OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes) and {toml_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
