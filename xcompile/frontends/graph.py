"""Reading a foreign fat policy into one ONNX graph, as untrusted input, and checking its interface.

- `.onnx`: read by `xcompile.onnx.session.read_onnx` (bounded, parsed without running anything,
  self-contained: weights in external data files are refused here).
- `.pt2` (`torch.export.save`): `torch.export.load` unpickles parts of the archive, some with
  `weights_only=False` (pickled weights and constants, torchbind and opaque objects, a fallback for
  the sample inputs), and can load AOTInductor shared libraries. So the archive is checked first as
  a zip (`_check_pt2`): only the members `torch.export.save` writes for a plain program, no pickled
  weight or constant, no custom or opaque object, no compiled code, and sample inputs that load with
  `weights_only=True` (so its fallback never runs). Then the program is loaded and converted to ONNX
  with `torch.onnx.export(program, dynamo=True)`: its graph is data (a JSON schema of ATen ops),
  converting it runs only torch's own decompositions, and from there one pinning path (onnxscript's
  optimizer) serves both formats. Its inputs keep the program's argument names; its first output
  takes the interface's `action` name and the next ones, in order, the interface's recurrent state
  outputs (a recurrent program returns `(action, *next states)`).

`FatGraph` is the result: the ONNX model, its inputs/outputs, the body values of the target and
the recurrent states (`xcompile.onnx.recurrent`); `fat_act` drives it, state carried per episode.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xcompile.artifact import Artifact, file_sha256
from xcompile.errors import CheckpointError, XCompileError
from xcompile.frontends import FAT_GRAPH, FOREIGN_SUFFIXES
from xcompile.frontends.interface import (
    GraphInput,
    Interface,
    InterfaceError,
    check_interface,
    parse_interface,
    read_interface,
    state_specs,
)
from xcompile.onnx.model import get_metadata
from xcompile.onnx.recurrent import CONTRACT_KEY, StatefulPolicy, StateSpec
from xcompile.onnx.session import read_onnx
from xcompile.sim.env import obs_dim
from xcompile.targets import RobotTarget

MAX_PT2_BYTES = 2 * 1024**3
MAX_PT2_MEMBERS = 10_000
_CONVERTED: OrderedDict[tuple[str, tuple[str, ...]], bytes] = OrderedDict()  # (sha256, outputs)


@dataclass
class FatGraph:
    model: Any                           # onnx.ModelProto (a fresh copy for each caller)
    interface: Interface
    inputs: list[GraphInput]
    outputs: list[GraphInput]
    values: dict[str, np.ndarray]        # the target's value of every embodiment input
    states: list[StateSpec] = field(default_factory=list)   # recurrent states ([]: none)


def _np_dtype(elem_type: int) -> Any:
    from onnx import helper

    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).type
    except Exception:  # noqa: BLE001 (an element type numpy has no name for)
        return np.void


def graph_io(model: Any) -> tuple[list[GraphInput], list[GraphInput]]:
    """The inputs (initializers excluded) and outputs of an ONNX model."""
    inits = {t.name for t in model.graph.initializer}

    def desc(vi: Any) -> GraphInput:
        tt = vi.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                      for d in tt.shape.dim)
        return GraphInput(vi.name, _np_dtype(tt.elem_type), shape)

    return ([desc(i) for i in model.graph.input if i.name not in inits],
            [desc(o) for o in model.graph.output])


def graph_params(model: Any) -> int:
    """Stored weight elements of an ONNX model, counted like
    `xcompile.measure.onnx_param_count` (initializers and Constant tensors, int64 left out)."""
    import onnx

    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors += [a.t for a in node.attribute if a.name == "value"]
    return sum(int(np.prod(t.dims)) if t.dims else 1 for t in tensors
               if t.data_type != onnx.TensorProto.INT64)


def _check_pt2(path: Path) -> None:
    """Refuse a .pt2 archive that would make torch.export.load run code (see the docstring)."""
    import torch

    bad = f"{path}: not a torch.export program xcompile loads"
    try:
        if path.stat().st_size > MAX_PT2_BYTES:
            raise CheckpointError(f"{bad}: more than {MAX_PT2_BYTES // 1024**3} GB")
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{bad}: not a .pt2 archive (a zip file): {e}") from None
    with zf:
        names = zf.namelist()
        if len(names) > MAX_PT2_MEMBERS:
            raise CheckpointError(f"{bad}: {len(names)} members, more than {MAX_PT2_MEMBERS}")
        rel = {n.split("/", 1)[1] if "/" in n else n: n for n in names}
        if "models/model.json" not in rel:
            raise CheckpointError(f"{bad}: no models/model.json (save it with "
                                  "torch.export.save(program, path))")
        allowed = ("models/", "data/weights/", "data/constants/", "data/sample_inputs/",
                   "archive_format", "archive_version", ".data/", "byteorder", "extra/")
        for r in rel:
            if not r.startswith(allowed) or r.endswith((".so", ".dll", ".dylib", ".cpp")):
                raise CheckpointError(f"{bad}: holds {r!r}, which is not part of a plain "
                                      "exported program (compiled code, or another payload)")
            if r in ("data/weights/model.pt", "data/constants/model.pt"):
                raise CheckpointError(f"{bad}: legacy pickled {r}; save it again with this "
                                      "torch's torch.export.save")
        for cfg in ("data/weights/model_weights_config.json",
                    "data/constants/model_constants_config.json"):
            if cfg not in rel:
                continue
            try:
                entries = json.loads(zf.read(rel[cfg]))["config"]
                items = list(entries.items())
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{bad}: {cfg} is not valid ({e})") from None
            for fqn, meta in items:
                pickled = not isinstance(meta, dict) or meta.get("use_pickle", True)
                pname = str(meta.get("path_name", "")) if isinstance(meta, dict) else ""
                if pickled or not pname.startswith(("weight_", "tensor_")):
                    raise CheckpointError(f"{bad}: {str(fqn)[:80]!r} is a pickled or custom "
                                          "object, which loading would unpickle; xcompile takes "
                                          "programs whose weights are plain tensors")
        for r, n in rel.items():
            if r.startswith("data/sample_inputs/"):
                try:
                    torch.load(io.BytesIO(zf.read(n)), weights_only=True)
                except Exception as e:  # noqa: BLE001 (the unpickler refuses in many ways)
                    raise CheckpointError(f"{bad}: its sample inputs are not plain tensors "
                                          f"({str(e).splitlines()[0][:120]})") from None


def _pt2_to_onnx(path: Path, outputs: tuple[str, ...]) -> bytes:
    import torch

    from xcompile.onnx.model import quiet_exporter

    _check_pt2(path)
    with quiet_exporter("torch._export", "torch.export"):
        try:
            ep = torch.export.load(str(path))
        except Exception as e:  # noqa: BLE001 (a damaged archive fails in many ways)
            raise CheckpointError(f"{path}: torch.export.load cannot read it "
                                  f"({str(e).splitlines()[0][:200]})") from None
        n_out = len(ep.graph_signature.user_outputs)
        names = [*outputs[:n_out], *(f"output_{i}" for i in range(len(outputs), n_out))]
        try:
            prog = torch.onnx.export(ep, dynamo=True, output_names=names, opset_version=18,
                                     external_data=False, verbose=False)
        except Exception as e:  # noqa: BLE001 (the exporter raises its own types)
            raise CheckpointError(f"{path}: the program cannot be converted to ONNX "
                                  f"({str(e).splitlines()[0][:200]})") from None
    assert prog is not None
    return prog.model_proto.SerializeToString()


def load_graph(path: str | Path, action: str = "action", states: tuple[str, ...] = ()) -> Any:
    """The ONNX ModelProto of a foreign fat policy file (.onnx or .pt2), read as untrusted; a
    .pt2's outputs are named `action`, then `states` (the recurrent state outputs)."""
    import onnx

    path = Path(path)
    if path.suffix == ".onnx":
        return read_onnx(path)
    if path.suffix != ".pt2":
        raise CheckpointError(f"{path}: a foreign fat policy is an ONNX model (.onnx) or a "
                              "torch.export program (.pt2)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    key = (file_sha256(path), (action, *states))
    if key not in _CONVERTED:
        _CONVERTED[key] = _pt2_to_onnx(path, key[1])
        while len(_CONVERTED) > 4:
            _CONVERTED.popitem(last=False)
    return onnx.load_from_string(_CONVERTED[key])


def fat_graph(path: str | Path, interface: Interface, robot: RobotTarget) -> FatGraph:
    """The foreign fat policy at `path`, checked against `interface` and `robot`."""
    model = load_graph(path, interface.action, state_outputs(interface))
    ins, outs = graph_io(model)
    values = check_interface(interface, ins, outs, robot, obs_dim(robot), str(path))
    return FatGraph(model, interface, ins, outs, values, state_specs(interface, str(path)))


def state_outputs(interface: Interface) -> tuple[str, ...]:
    """The names of the interface's recurrent state outputs, in order."""
    return tuple(st.output for st in interface.recurrent.state) if interface.recurrent else ()


def fat_graph_artifact(path: str | Path, interface: str | Path, robot: RobotTarget) -> Artifact:
    """The input artifact of a build from a foreign fat policy: format fat-graph, the validated
    interface in its metadata (so the artifact id, and every cache key, covers it)."""
    path = Path(path)
    if path.suffix not in FOREIGN_SUFFIXES:
        raise CheckpointError(f"{path}: --interface describes a foreign fat policy, an ONNX "
                              "model (.onnx) or a torch.export program (.pt2)")
    iface = read_interface(interface)
    fat_graph(path, iface, robot)
    return Artifact.create(FAT_GRAPH, path, robot.name,
                           meta={"interface": iface.model_dump(mode="json", exclude_none=True),
                                 "source": path.suffix[1:]})


RECURRENT_KINDS = ("history_mlp", "gru")     # torch students that keep state (models.recurrent)


def is_recurrent(art: Artifact) -> bool:
    """Whether an artifact is a recurrent policy: a foreign fat policy whose interface has
    states, an ONNX policy whose contract records them, or a recurrent torch student."""
    if art.format == FAT_GRAPH:
        iface = art.meta.get("interface")
        return isinstance(iface, dict) and bool(iface.get("recurrent"))
    if art.format == "onnx":
        return CONTRACT_KEY in get_metadata(read_onnx(art.path))
    return art.format == "torch" and art.meta.get("kind") in RECURRENT_KINDS


def artifact_graph(art: Artifact, robot: RobotTarget) -> FatGraph:
    """The checked FatGraph of a fat-graph artifact."""
    if art.format != FAT_GRAPH:
        raise XCompileError(f"not a foreign fat policy: {art.format}")
    iface = parse_interface(art.meta.get("interface", {}), f"{art.path} interface")
    return fat_graph(art.path, iface, robot)


def fat_act(fg: FatGraph, threads: int = 1) -> Any:
    """A batch policy (obs -> action) that runs the fat graph with the target's body values; for a
    recurrent graph a `StatefulPolicy` (one state per episode, `xcompile.evaluate`'s protocol)."""
    from xcompile.onnx.session import ort_session

    sess = ort_session(fg.model.SerializeToString(), threads)
    feeds = {k: v for k, v in fg.values.items()}
    obs_name, act_name = fg.interface.observation, fg.interface.action
    if fg.states:
        return StatefulPolicy.of_session(sess, obs_name, act_name, fg.states, feeds)

    def act(obs: np.ndarray) -> np.ndarray:
        x = np.asarray(obs, dtype=np.float32)
        return sess.run([act_name], {obs_name: x, **feeds})[0]

    return act


__all__ = ["FatGraph", "InterfaceError", "artifact_graph", "fat_act", "fat_graph",
           "fat_graph_policy", "graph_params", "is_recurrent",
           "fat_graph_artifact", "graph_io", "load_graph"]


def fat_graph_policy(path: str | Path, interface: str | Path, robot: RobotTarget) -> Any:
    """`xcompile.policy.LoadedPolicy` of a foreign fat policy driven for `robot` (for eval)."""
    from xcompile.policy import LoadedPolicy

    fg = fat_graph(path, read_interface(interface), robot)
    return LoadedPolicy(fat_act(fg), "fat-graph", Path(path),
                        {"known_body": True, "interface": str(interface),
                         "recurrent": [s.as_json() for s in fg.states]})
