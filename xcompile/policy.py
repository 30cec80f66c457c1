"""Load any policy xcompile knows (fat checkpoint, torch policy, compiled ONNX) as a batch policy.

A fat checkpoint drives a body by its joint descriptors: those stored in its registry for a body it
was trained on, or descriptors computed from the URDF for a body it never saw (zero-shot). A
compiled ONNX policy carries its deployment contract in its metadata and refuses a robot it was not
compiled for, the way a loader refuses a binary for another architecture. A one-robot torch policy
(`.pt`, format "xcompile.torch-policy") is told from a fat checkpoint by its content, not its suffix,
and refuses another robot the same way when its spec names the robot.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xcompile.errors import CheckpointError, ContractError
from xcompile.targets import RobotTarget

BatchPolicy = Callable[[np.ndarray], np.ndarray]
FAT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


@dataclass
class LoadedPolicy:
    act: BatchPolicy
    kind: str                       # "fat", "onnx", "torch"
    path: Path
    info: dict[str, Any] = field(default_factory=dict)


def body_descriptors(ckpt, robot: RobotTarget) -> tuple[np.ndarray, bool]:
    """Descriptors for `robot`: (array, known) — from the registry when the body was trained."""
    from xcompile.models.descriptors import joint_descriptors

    for entry in ckpt.registry:
        if entry["name"] == robot.name and list(entry["joints"]) == list(robot.joints.names):
            return np.asarray(entry["descriptors"], dtype=np.float32), True
    return joint_descriptors(robot), False


def fat_act(model, desc: np.ndarray, family: str) -> BatchPolicy:
    import torch

    d = torch.as_tensor(desc, dtype=torch.float32)

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.act(torch.as_tensor(obs, dtype=torch.float32), d, family).numpy()

    return act


def check_contract(meta: dict[str, str], robot: RobotTarget, path: Path) -> None:
    compiled_for = meta.get("robot")
    if compiled_for is None:
        raise ContractError(f"{path}: no 'robot' in the model metadata; not an xcompile policy")
    if compiled_for != robot.name:
        raise ContractError(
            f"{path} was compiled for robot '{compiled_for}', not '{robot.name}'. "
            f"Compile it for {robot.name}: xcompile build FAT_CKPT --target {robot.name}"
        )
    joints = json.loads(meta.get("joint_order", "[]"))
    if joints != list(robot.joints.names):
        raise ContractError(
            f"{path}: joint order in the policy {joints} differs from the target's "
            f"{list(robot.joints.names)}; recompile for this robot description"
        )


def ort_session(src: str | Path | bytes, threads: int = 1) -> Any:
    """A CPU onnxruntime session, sequential, on `threads` intra-op threads.

    A weight-only int8 model (quantize's metadata `int8_activations` = "false") is opened with
    `session.disable_quant_qdq`: onnxruntime then folds each int8 weight's DequantizeLinear into
    a float constant at load, so the file keeps int8 weights and the calls run at fp32 speed
    (without it the weights are dequantized on every call: 10.4 instead of 7.4 µs for the xarm6
    student). Outputs are the same to float rounding.
    """
    import onnx
    import onnxruntime as ort

    data = src if isinstance(src, bytes) else Path(src).read_bytes()   # weights are inside
    meta = {p.key: p.value for p in onnx.ModelProto.FromString(data).metadata_props}
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if meta.get("int8_activations") == "false":
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def onnx_act(path: Path, threads: int = 1) -> tuple[BatchPolicy, dict[str, str]]:
    sess = ort_session(path, threads)
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    in_name = sess.get_inputs()[0].name
    batch_dim = sess.get_inputs()[0].shape[0]

    def act(obs: np.ndarray) -> np.ndarray:
        x = np.asarray(obs, dtype=np.float32)
        if isinstance(batch_dim, int) and x.shape[0] != batch_dim:  # static batch-1 graph
            return np.concatenate([sess.run(None, {in_name: x[i:i + 1]})[0]
                                   for i in range(x.shape[0])])
        return sess.run(None, {in_name: x})[0]

    return act, meta


def torch_act(module) -> BatchPolicy:
    import torch

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.as_tensor(obs, dtype=torch.float32)).numpy()

    return act


def _torch_file_format(path: Path) -> str | None:
    """The format tag of a `.pt` file (fat checkpoint or torch policy): dispatch on content."""
    from xcompile.models.checkpoint import _read_torch

    tag = _read_torch(path).get("format")
    return tag if isinstance(tag, str) else None


def _load_torch_policy(path: Path, robot: RobotTarget) -> LoadedPolicy:
    from xcompile.models.slim import build_from_spec, read_torch_policy

    payload = read_torch_policy(path)
    spec = payload["spec"]
    if "robot" in spec:
        check_contract({"robot": str(spec["robot"]),
                        "joint_order": json.dumps(list(spec.get("joint_order", [])))}, robot, path)
    module = build_from_spec(spec)
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
        from xcompile.models.slim import FORMAT as TORCH_POLICY_FORMAT

        if _torch_file_format(path) == TORCH_POLICY_FORMAT:
            return _load_torch_policy(path, robot)
    if path.suffix in FAT_SUFFIXES:
        from xcompile.models.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        if robot.family not in ckpt.config.global_dims:
            raise CheckpointError(
                f"{path}: this fat policy serves task families {sorted(ckpt.config.global_dims)}, "
                f"not '{robot.family}' (robot {robot.name})"
            )
        desc, known = body_descriptors(ckpt, robot)
        return LoadedPolicy(fat_act(ckpt.model, desc, robot.family), "fat", path,
                            {"known_body": known, "sha256": ckpt.sha256})
    if path.suffix == ".onnx":
        try:
            act, meta = onnx_act(path)
        except Exception as e:  # onnxruntime raises its own types for malformed models
            if isinstance(e, ContractError):
                raise
            raise CheckpointError(f"{path}: onnxruntime cannot load it ({e})") from e
        check_contract(meta, robot, path)
        return LoadedPolicy(act, "onnx", path, {"metadata": meta})
    raise CheckpointError(
        f"{path}: unknown policy file type '{path.suffix}'. Expected a fat checkpoint "
        f"({', '.join(FAT_SUFFIXES)}), a torch policy (.pt) or a compiled policy (.onnx)"
    )
