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
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from xcompile.errors import CheckpointError, ContractError, XCompileError
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


# Contract fields whose values are JSON (the others are plain strings or Python float reprs).
JSON_CONTRACT_FIELDS = ("joint_order", "default_pose", "kp", "kd", "torque_limit", "obs_layout",
                        "pass_history")


def _json_field(meta: dict[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(meta[key])
    except (TypeError, ValueError) as e:
        raise ContractError(
            f"{path}: the model metadata field '{key}' is not valid JSON ({e}): "
            f"{meta[key]!r:.80}. The policy's deployment contract is damaged; recompile it "
            f"(xcompile build FAT_CKPT --target ROBOT)"
        ) from e


def check_contract(meta: dict[str, str], robot: RobotTarget, path: Path) -> None:
    compiled_for = meta.get("robot")
    if compiled_for is None:
        raise ContractError(f"{path}: no 'robot' in the model metadata; not an xcompile policy")
    if compiled_for != robot.name:
        raise ContractError(
            f"{path} was compiled for robot '{compiled_for}', not '{robot.name}'. "
            f"Compile it for {robot.name}: xcompile build FAT_CKPT --target {robot.name}"
        )
    parsed = {key: _json_field(meta, key, path) for key in JSON_CONTRACT_FIELDS if key in meta}
    joints = parsed.get("joint_order", [])
    if not isinstance(joints, list) or not all(isinstance(j, str) for j in joints):
        raise ContractError(f"{path}: the model metadata field 'joint_order' is not a list of "
                            f"joint names: {meta['joint_order']!r:.80}; recompile the policy")
    if joints != list(robot.joints.names):
        raise ContractError(
            f"{path}: joint order in the policy {joints} differs from the target's "
            f"{list(robot.joints.names)}; recompile for this robot description"
        )


def check_io_widths(n_obs: int | None, n_actions: int | None, robot: RobotTarget,
                    path: Path) -> None:
    """Refuse a policy whose observation or action width is not the robot's (None: not known)."""
    from xcompile.sim.env import obs_dim

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


# --------------------------------------------------------------------------------------------
# ONNX: a model file is untrusted input. It is read once, bounded in size, parsed without its
# external data, and every tensor that keeps its data in another file must name a regular file
# inside the model's own folder (symlinks resolved) before onnxruntime sees it.

MAX_ONNX_BYTES = 2 * 1024**3   # protobuf's own limit for one message; larger weights go external


class ExternalDataError(CheckpointError, ContractError):
    """An ONNX tensor's external data is not a file beside the model (outside its folder, absolute,
    missing, not a regular file, or the model came as bytes with no folder at all)."""


def _read_onnx_file(path: Path) -> bytes:
    """The bytes of a model file: a regular file of at most MAX_ONNX_BYTES, read once."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))   # a FIFO must not block
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder; give the path of the .onnx model file "
                              f"inside it") from None
    except OSError as e:
        if os.path.isdir(path):   # Windows refuses to open a folder with PermissionError
            raise CheckpointError(f"{path} is a folder; give the path of the .onnx model file "
                                  f"inside it") from None
        raise CheckpointError(f"{path}: cannot read the model file ({e.strerror or e})") from e
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise CheckpointError(f"{path} is a folder; give the path of the .onnx model file "
                                  f"inside it")
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file; an ONNX model must be a file")
        if st.st_size > MAX_ONNX_BYTES:
            raise CheckpointError(
                f"{path}: {st.st_size / 1024**3:.1f} GB is more than an ONNX model file can be "
                f"({MAX_ONNX_BYTES // 1024**3} GB); large weights belong in external data beside "
                f"the model (onnx.save_model(..., save_as_external_data=True))")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            data = f.read(MAX_ONNX_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the model file ({e.strerror or e})") from e
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > MAX_ONNX_BYTES:   # it grew while we read it
        raise CheckpointError(f"{path}: more than {MAX_ONNX_BYTES // 1024**3} GB; not a model "
                              f"file xcompile loads")
    return data


def _parse_onnx(data: bytes, where: str) -> Any:
    """The ModelProto of `data`, external data not loaded; any parse failure a CheckpointError."""
    import onnx

    if not data:
        raise CheckpointError(f"{where}: the file is empty; not an ONNX model")
    try:
        model = onnx.ModelProto.FromString(data)
    except Exception as e:   # protobuf's DecodeError, or a RuntimeError from its C++ parser
        raise CheckpointError(f"{where}: not an ONNX model, or a truncated or corrupt one "
                              f"(protobuf cannot parse it: {e}); export or copy it again") from e
    if not model.HasField("graph") or model.ir_version <= 0:
        raise CheckpointError(f"{where}: not an ONNX model (no graph or IR version in it); "
                              f"export or copy it again")
    return model


def _tensors(model: Any) -> Iterator[tuple[str, Any]]:
    """Every TensorProto of `model` that can keep its data outside the file, with where it is:
    graph and sparse initializers, tensor attributes (Constant and others) and, through graph
    attributes (If/Loop/Scan), subgraphs at any depth; also functions and training graphs."""
    stack: list[tuple[str, Any, str]] = [("graph", model.graph, "")]
    for f in model.functions:
        stack.append(("function", f, f"function '{f.name}' "))
    for i, ti in enumerate(model.training_info):
        stack.append(("graph", ti.initialization, f"training_info[{i}].initialization "))
        stack.append(("graph", ti.algorithm, f"training_info[{i}].algorithm "))
    while stack:   # iterative: a hostile model can nest subgraphs deeply
        kind, g, scope = stack.pop()
        if kind == "graph":
            for t in g.initializer:
                yield f"{scope}initializer", t
            for s in g.sparse_initializer:
                yield f"{scope}sparse initializer, values", s.values
                yield f"{scope}sparse initializer, indices", s.indices
        for node in g.node:
            for a in node.attribute:
                at = f"{scope}node '{node.name or node.op_type}' attribute '{a.name}'"
                if a.HasField("t"):
                    yield at, a.t
                for t in a.tensors:
                    yield at, t
                for s in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(
                        a.sparse_tensors):
                    yield f"{at}, values", s.values
                    yield f"{at}, indices", s.indices
                if a.HasField("g"):
                    stack.append(("graph", a.g, f"{at} > "))
                for sub in a.graphs:
                    stack.append(("graph", sub, f"{at} > "))


def check_external_data(model: Any, folder: Path | None, where: str) -> bool:
    """Refuse any external-data tensor of `model` whose file is not a regular file inside `folder`
    (the model file's folder; None: the model came as bytes). Returns whether any tensor is
    external. Locations must be relative, without '..', and resolve (symlinks followed) inside
    `folder`."""
    from onnx import TensorProto

    real_folder = os.path.realpath(folder) if folder is not None else None
    external = False
    for desc, t in _tensors(model):
        if t.data_location != TensorProto.EXTERNAL and not len(t.external_data):
            continue
        external = True
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        what = f"{where}: tensor '{t.name}' ({desc}) keeps its data in {loc!r}"
        beside = "external data must lie beside the model, in its own folder"
        if real_folder is None:
            raise ExternalDataError(f"{what}, but the model was given as bytes with no folder to "
                                    f"find it in; load the model from its file")
        if not loc or "\x00" in loc:
            raise ExternalDataError(f"{what}: no usable file name; {beside}")
        parts = PurePosixPath(loc.replace("\\", "/")).parts
        if (os.path.isabs(loc) or PurePosixPath(loc).is_absolute()
                or PureWindowsPath(loc).is_absolute() or PureWindowsPath(loc).drive
                or ".." in parts):
            raise ExternalDataError(f"{what}: a path outside the model's folder; {beside}")
        target = os.path.realpath(os.path.join(real_folder, loc))
        try:
            inside = os.path.commonpath([real_folder, target]) == real_folder
        except ValueError:   # different drives
            inside = False
        if not inside or target == real_folder:
            raise ExternalDataError(f"{what}, which resolves to {target} outside the model's "
                                    f"folder {real_folder} (a symlink?); {beside}")
        try:
            st = os.stat(target)
        except OSError:
            raise ExternalDataError(f"{what}: no such file in {real_folder}; {beside} "
                                    f"(copy the data file along with the model)") from None
        if not stat.S_ISREG(st.st_mode):
            raise ExternalDataError(f"{what}: not a regular file; {beside}")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            raise ExternalDataError(f"{what} with a non-integer offset or length "
                                    f"({info.get('offset')!r}, {info.get('length')!r})") from None
        if offset < 0 or offset + max(length, 0) > st.st_size:
            raise ExternalDataError(f"{what} at offset {offset}, length {length}, but the file "
                                    f"holds {st.st_size} bytes; the data file is truncated or "
                                    f"belongs to another model")
    return external


def ort_session(src: str | Path | bytes, threads: int = 1) -> Any:
    """A CPU onnxruntime session, sequential, on `threads` intra-op threads.

    `src` is a model file's path or its bytes. The model is checked first (`check_external_data`):
    tensors kept in external data must name regular files inside the model's own folder (bytes
    may not use external data at all). A model without external data is handed to onnxruntime as
    the bytes that were checked; one with external data by its path, so onnxruntime resolves the
    data files against the model's folder, never the working directory. Every way the model can
    fail to load is an XCompileError.

    A weight-only int8 model (quantize's metadata `int8_activations` = "false") is opened with
    `session.disable_quant_qdq`: onnxruntime then folds each int8 weight's DequantizeLinear into
    a float constant at load, so the file keeps int8 weights and the calls run at fp32 speed
    (without it the weights are dequantized on every call: 10.4 instead of 7.4 µs for the xarm6
    student). Outputs are the same to float rounding.
    """
    import onnxruntime as ort

    if isinstance(src, (bytes, bytearray, memoryview)):
        data, path, folder, where = bytes(src), None, None, "ONNX model (in memory)"
        if len(data) > MAX_ONNX_BYTES:
            raise CheckpointError(f"{where}: more than {MAX_ONNX_BYTES // 1024**3} GB")
    else:
        path = Path(src)
        data, folder, where = _read_onnx_file(path), path.parent, str(path)
    model = _parse_onnx(data, where)
    external = check_external_data(model, folder, where)
    meta = {p.key: p.value for p in model.metadata_props}
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if meta.get("int8_activations") == "false":
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    try:
        return ort.InferenceSession(str(path) if external else data, so,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:   # onnxruntime raises its own types (Fail, InvalidGraph, ...)
        msg = " ".join(str(e).split())
        raise CheckpointError(f"{where}: onnxruntime cannot load this model ({msg[:400]}); it is "
                              f"corrupt, truncated, or uses operators or an IR version this "
                              f"onnxruntime does not support") from e


def _static_width(shape: Any) -> int | None:
    """The last dimension of a (batch, width) shape when it is a fixed int, else None."""
    if isinstance(shape, (list, tuple)) and len(shape) == 2 and isinstance(shape[1], int):
        return shape[1]
    return None


def onnx_act(path: Path, threads: int = 1,
             robot: RobotTarget | None = None) -> tuple[BatchPolicy, dict[str, str]]:
    """A batch policy from a compiled ONNX file and its metadata. With `robot`, the deployment
    contract is checked here, at load: the metadata (`check_contract`) and the observation and
    action widths of the graph (`check_io_widths`)."""
    sess = ort_session(path, threads)
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1 or not outputs:
        raise ContractError(
            f"{path}: the model has {len(inputs)} inputs and {len(outputs)} outputs; a policy "
            f"takes one observation input and returns the actions as its first output")
    if inputs[0].type != "tensor(float)":
        raise ContractError(f"{path}: the model's input '{inputs[0].name}' is {inputs[0].type}; "
                            f"a policy takes float32 observations (tensor(float))")
    if robot is not None:
        check_contract(meta, robot, path)
        check_io_widths(_static_width(inputs[0].shape), _static_width(outputs[0].shape), robot,
                        path)
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
            act, meta = onnx_act(path, robot=robot)   # checks the contract at load
        except XCompileError:
            raise
        except Exception as e:  # onnxruntime raises its own types for malformed models
            raise CheckpointError(f"{path}: onnxruntime cannot load it ({e})") from e
        return LoadedPolicy(act, "onnx", path, {"metadata": meta})
    raise CheckpointError(
        f"{path}: unknown policy file type '{path.suffix}'. Expected a fat checkpoint "
        f"({', '.join(FAT_SUFFIXES)}), a torch policy (.pt) or a compiled policy (.onnx)"
    )
