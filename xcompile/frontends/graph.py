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
  optimizer) serves both formats. Its inputs keep the program's argument names; its single output
  (or, with several, the first) takes the interface's `action` name.

`FatGraph` is the result: the ONNX model, its inputs/outputs, and the body values of the target.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
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
)
from xcompile.onnx.session import read_onnx
from xcompile.sim.env import obs_dim
from xcompile.targets import RobotTarget

MAX_PT2_BYTES = 2 * 1024**3
MAX_PT2_MEMBERS = 10_000
_CONVERTED: OrderedDict[tuple[str, str], bytes] = OrderedDict()   # (sha256, action) -> ONNX


@dataclass
class FatGraph:
    model: Any                           # onnx.ModelProto (a fresh copy for each caller)
    interface: Interface
    inputs: list[GraphInput]
    outputs: list[GraphInput]
    values: dict[str, np.ndarray]        # the target's value of every embodiment input


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


def _pt2_to_onnx(path: Path, action: str) -> bytes:
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
        names = [action] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
        try:
            prog = torch.onnx.export(ep, dynamo=True, output_names=names, opset_version=18,
                                     external_data=False, verbose=False)
        except Exception as e:  # noqa: BLE001 (the exporter raises its own types)
            raise CheckpointError(f"{path}: the program cannot be converted to ONNX "
                                  f"({str(e).splitlines()[0][:200]})") from None
    assert prog is not None
    return prog.model_proto.SerializeToString()


def load_graph(path: str | Path, action: str = "action") -> Any:
    """The ONNX ModelProto of a foreign fat policy file (.onnx or .pt2), read as untrusted."""
    import onnx

    path = Path(path)
    if path.suffix == ".onnx":
        return read_onnx(path)
    if path.suffix != ".pt2":
        raise CheckpointError(f"{path}: a foreign fat policy is an ONNX model (.onnx) or a "
                              "torch.export program (.pt2)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    key = (file_sha256(path), action)
    if key not in _CONVERTED:
        _CONVERTED[key] = _pt2_to_onnx(path, action)
        while len(_CONVERTED) > 4:
            _CONVERTED.popitem(last=False)
    return onnx.load_from_string(_CONVERTED[key])


def fat_graph(path: str | Path, interface: Interface, robot: RobotTarget) -> FatGraph:
    """The foreign fat policy at `path`, checked against `interface` and `robot`."""
    model = load_graph(path, interface.action)
    ins, outs = graph_io(model)
    values = check_interface(interface, ins, outs, robot, obs_dim(robot), str(path))
    return FatGraph(model, interface, ins, outs, values)


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
                           meta={"interface": iface.model_dump(mode="json"),
                                 "source": path.suffix[1:]})


def artifact_graph(art: Artifact, robot: RobotTarget) -> FatGraph:
    """The checked FatGraph of a fat-graph artifact."""
    if art.format != FAT_GRAPH:
        raise XCompileError(f"not a foreign fat policy: {art.format}")
    iface = parse_interface(art.meta.get("interface", {}), f"{art.path} interface")
    return fat_graph(art.path, iface, robot)


def fat_act(fg: FatGraph, threads: int = 1) -> Any:
    """A batch policy (obs -> action) that runs the fat graph with the target's body values."""
    from xcompile.onnx.session import ort_session

    sess = ort_session(fg.model.SerializeToString(), threads)
    feeds = {k: v for k, v in fg.values.items()}
    obs_name, act_name = fg.interface.observation, fg.interface.action

    def act(obs: np.ndarray) -> np.ndarray:
        x = np.asarray(obs, dtype=np.float32)
        return sess.run([act_name], {obs_name: x, **feeds})[0]

    return act


__all__ = ["FatGraph", "InterfaceError", "artifact_graph", "fat_act", "fat_graph",
           "fat_graph_policy",
           "fat_graph_artifact", "graph_io", "load_graph"]


def fat_graph_policy(path: str | Path, interface: str | Path, robot: RobotTarget) -> Any:
    """`xcompile.policy.LoadedPolicy` of a foreign fat policy driven for `robot` (for eval)."""
    from xcompile.policy import LoadedPolicy

    fg = fat_graph(path, read_interface(interface), robot)
    return LoadedPolicy(fat_act(fg), "fat-graph", Path(path),
                        {"known_body": True, "interface": str(interface)})
