"""Load any policy xcompile knows (fat checkpoint, torch policy, compiled ONNX) as a batch policy.

A fat checkpoint drives a body by its joint descriptors: those stored in its registry for a body it
was trained on, or descriptors computed from the URDF for a body it never saw (zero-shot), and only
for a robot of a task family it serves (`load_fat_checkpoint`). A compiled ONNX policy carries its
deployment contract (`xcompile.onnx.contract`) in its metadata and refuses a robot it was not
compiled for, the way a loader refuses a binary for another architecture. A one-robot torch policy
(`.pt`, format "xcompile.torch-policy") is told from a fat checkpoint by its content, not its suffix,
and refuses another robot the same way when its spec names the robot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xcompile.errors import CheckpointError, ContractError, TargetError, XCompileError
from xcompile.evaluate import BatchPolicy
from xcompile.models.checkpoint import FatCheckpoint, _read_torch, load_checkpoint
from xcompile.models.descriptors import joint_descriptors
from xcompile.models.recurrent import is_recurrent
from xcompile.models.slim import FORMAT as TORCH_POLICY_FORMAT
from xcompile.models.slim import build_from_spec, read_torch_policy
from xcompile.onnx.contract import check_contract, check_io_widths
from xcompile.onnx.recurrent import CONTRACT_KEY, StatefulPolicy, session_policy
from xcompile.onnx.session import ort_session
from xcompile.targets import RobotTarget

FAT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


@dataclass
class LoadedPolicy:
    act: BatchPolicy
    kind: str                       # "fat", "onnx", "torch", "c"
    path: Path
    info: dict[str, Any] = field(default_factory=dict)


def load_fat_checkpoint(path: str | Path, robot: RobotTarget) -> FatCheckpoint:
    """The fat checkpoint at `path`, refused when it does not serve `robot`'s task family."""
    ckpt = load_checkpoint(path)
    if robot.family not in ckpt.config.global_dims:
        raise TargetError(
            f"robot {robot.name!r} does {robot.family!r}, a task family the fat policy "
            f"{Path(path).name} does not serve (it serves {ckpt.config.families}); pick a target "
            "of one of those families or a fat policy trained for it")
    from xcompile.sim.env import GLOBAL_DIMS

    have, want = ckpt.config.global_dims[robot.family], GLOBAL_DIMS.get(robot.family)
    if want is not None and have != want:
        raise TargetError(
            f"the fat policy {Path(path).name} reads a {robot.family} observation whose task part "
            f"has {have} values; this xcompile's {robot.family} world gives {want} (the "
            f"observation layout changed: `xcompile targets` and the README's contract say what "
            "it is now). Retrain the policy on the current worlds, e.g. "
            "examples/train_fat_policy.py")
    return ckpt


def body_descriptors(ckpt: FatCheckpoint, robot: RobotTarget) -> tuple[np.ndarray, bool]:
    """Descriptors for `robot`: (array, known) — from the registry when the body was trained."""
    for entry in ckpt.registry:
        if entry["name"] == robot.name and list(entry["joints"]) == robot.actuators:
            return np.asarray(entry["descriptors"], dtype=np.float32), True
    return joint_descriptors(robot), False


def fat_act(model: Any, desc: np.ndarray, family: str) -> BatchPolicy:
    d = torch.as_tensor(desc, dtype=torch.float32)

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.act(torch.as_tensor(obs, dtype=torch.float32), d, family).numpy()

    return act


def _static_width(shape: Any) -> int | None:
    """The last dimension of a (batch, width) shape when it is a fixed int, else None."""
    if isinstance(shape, (list, tuple)) and len(shape) == 2 and isinstance(shape[1], int):
        return shape[1]
    return None


def onnx_act(path: Path, threads: int = 1,
             robot: RobotTarget | None = None) -> tuple[BatchPolicy, dict[str, str]]:
    """A batch policy from a compiled ONNX file and its metadata. With `robot`, the deployment
    contract is checked here, at load: the metadata (`check_contract`) and the observation and
    action widths of the graph (`check_io_widths`). A recurrent policy (its contract records
    `recurrent_state`) comes as a `StatefulPolicy`: reset at the start of every episode, each
    step's next state fed back (`xcompile.evaluate`'s protocol says whose state a row is)."""
    sess = ort_session(path, threads)
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    if robot is not None and CONTRACT_KEY in meta:     # not for this robot: say that first
        check_contract(meta, robot, path)
    stateful = session_policy(sess, path)
    states = {s.input for s in stateful.states} if stateful else set()
    inputs = [i for i in sess.get_inputs() if i.name not in states]
    outputs = sess.get_outputs()
    if len(inputs) != 1 or not outputs:
        raise ContractError(
            f"{path}: the model has {len(inputs)} inputs and {len(outputs)} outputs; a policy "
            f"takes one observation input (and, if recurrent, the state inputs its contract's "
            f"recurrent_state names) and returns the actions as its first output")
    if inputs[0].type != "tensor(float)":
        raise ContractError(f"{path}: the model's input '{inputs[0].name}' is {inputs[0].type}; "
                            f"a policy takes float32 observations (tensor(float))")
    if robot is not None:
        check_contract(meta, robot, path)
        check_io_widths(_static_width(inputs[0].shape), _static_width(outputs[0].shape), robot,
                        path)
    if stateful is not None:
        return stateful, meta
    in_name = inputs[0].name
    shape = inputs[0].shape
    batch_dim = shape[0] if isinstance(shape, (list, tuple)) and shape else None

    def act(obs: np.ndarray) -> np.ndarray:
        x = np.asarray(obs, dtype=np.float32)
        if isinstance(batch_dim, int) and x.shape[0] != batch_dim:  # static batch-1 graph
            return np.concatenate([sess.run(None, {in_name: x[i:i + 1]})[0]
                                   for i in range(x.shape[0])])
        return sess.run(None, {in_name: x})[0]

    return act, meta


def torch_act(module: Any) -> BatchPolicy:
    """A batch policy of a torch module; a recurrent one (`models.recurrent`: it names its
    `states()`) as a `StatefulPolicy` that carries each episode's state, as its ONNX export will
    be run."""
    if is_recurrent(module):
        specs = module.states()

        def run(names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            with torch.inference_mode():
                out = module(torch.as_tensor(feeds["obs"]),
                             *(torch.as_tensor(feeds[s.input]) for s in specs))
            return [o.numpy() for o in out]

        return StatefulPolicy(run, "obs", "action", specs)

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.as_tensor(obs, dtype=torch.float32)).numpy()

    return act


def _torch_file_format(path: Path) -> str | None:
    """The format tag of a `.pt` file (fat checkpoint or torch policy): dispatch on content."""
    tag = _read_torch(path).get("format")
    return tag if isinstance(tag, str) else None


def _load_torch_policy(path: Path, robot: RobotTarget) -> LoadedPolicy:
    payload = read_torch_policy(path)
    spec = payload["spec"]
    if "robot" in spec:
        check_contract({"robot": str(spec["robot"]),
                        "joint_order": json.dumps(list(spec.get("joint_order", [])))}, robot, path)
    module = build_from_spec(spec)
    n_obs, n_act = spec.get("obs_dim"), spec.get("n_actions", spec.get("n_joints"))
    check_io_widths(n_obs if isinstance(n_obs, int) else None,
                    n_act if isinstance(n_act, int) else None, robot, path)
    if spec.get("family") not in (None, robot.family):
        raise ContractError(f"{path}: the policy is for the '{spec['family']}' task family, not "
                            f"'{robot.family}' (robot {robot.name})")
    try:
        module.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the spec ({e})") from e
    return LoadedPolicy(torch_act(module.eval()), "torch", path, {"spec": spec})


def load_policy(path: str | Path, robot: RobotTarget) -> LoadedPolicy:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix in FAT_SUFFIXES and path.suffix != ".safetensors":
        if _torch_file_format(path) == TORCH_POLICY_FORMAT:
            return _load_torch_policy(path, robot)
    if path.suffix in FAT_SUFFIXES:
        ckpt = load_fat_checkpoint(path, robot)
        desc, known = body_descriptors(ckpt, robot)
        return LoadedPolicy(fat_act(ckpt.model, desc, robot.family), "fat", path,
                            {"known_body": known, "sha256": ckpt.sha256})
    if path.suffix == ".pt2":
        raise CheckpointError(f"{path}: a torch.export program is a foreign fat policy; say how "
                              "to drive it with --interface FILE.toml")
    if path.suffix == ".onnx":
        try:
            act, meta = onnx_act(path, robot=robot)   # checks the contract at load
        except XCompileError:
            raise
        except Exception as e:  # onnxruntime raises its own types for malformed models
            raise CheckpointError(f"{path}: onnxruntime cannot load it ({e})") from e
        return LoadedPolicy(act, "onnx", path, {"metadata": meta})
    if path.suffix == ".c":
        from xcompile.cgen.load import load_c_policy  # compiles: only C it emitted itself

        policy, src, meta = load_c_policy(path)
        check_contract(meta, robot, path)
        check_io_widths(src.obs_dim, src.act_dim, robot, path)
        return LoadedPolicy(policy, "c", path, {"metadata": meta})
    raise CheckpointError(
        f"{path}: unknown policy file type '{path.suffix}'. Expected a fat checkpoint "
        f"({', '.join(FAT_SUFFIXES)}), a torch policy (.pt) or a compiled policy (.onnx, or "
        ".c as `xcompile build --emit c` writes it)"
    )
