"""Opening an ONNX model in onnxruntime, treating the file as untrusted input.

A model file is read once, bounded in size (`MAX_ONNX_BYTES`), and parsed without its external
data; every tensor that keeps its data in another file must name a regular file inside the model's
own folder (symlinks resolved) before onnxruntime sees it (`check_external_data`). Every way a model
can fail to load is an XCompileError.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from xcompile.errors import CheckpointError, ContractError
from xcompile.onnx.contract import weight_only_int8
from xcompile.onnx.model import get_metadata

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
    import onnx  # heavy: only when a model is opened

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
    from onnx import TensorProto  # heavy: only when a model is opened

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


def read_onnx(path: str | Path) -> Any:
    """The ModelProto of a self-contained model file (weights inside it), read as untrusted input:
    what reads a graph's weights itself (the C emitter) uses this, not `onnx.load`."""
    path = Path(path)
    model = _parse_onnx(_read_onnx_file(path), str(path))
    if check_external_data(model, path.parent, str(path)):
        raise CheckpointError(f"{path}: keeps weights in external data files; xcompile reads "
                              f"only self-contained models here (a slim policy is small)")
    return model


@functools.cache
def int8_dot_products_exact() -> bool:
    """False on an x86 CPU with AVX2 but no VNNI: there onnxruntime's fused u8 x s8 kernels add
    pairs of products in 16 bits and saturate (an AVX2-only AMD EPYC: int8 actions 0.18 off on
    average, up to 42 quantization steps), so `ort_session` runs QDQ models as their Q/DQ
    semantics say (float products of dequantized values, as TensorRT and emit-c compute)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return True
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags) or "avx2" not in flags


def ort_session(src: str | Path | bytes, threads: int = 1) -> Any:
    """A CPU onnxruntime session, sequential, on `threads` intra-op threads.

    `src` is a model file's path or its bytes. The model is checked first (`check_external_data`):
    tensors kept in external data must name regular files inside the model's own folder (bytes
    may not use external data at all). A model without external data is handed to onnxruntime as
    the bytes that were checked; one with external data by its path, so onnxruntime resolves the
    data files against the model's folder, never the working directory. Every way the model can
    fail to load is an XCompileError.

    A model whose deployment contract says weight-only int8 (`int8_activations` = "false", see
    `xcompile.onnx.contract.KEYS`) is opened with `session.disable_quant_qdq`: onnxruntime then
    folds each int8 weight's DequantizeLinear into a float constant at load, so the file keeps
    int8 weights and the calls run at fp32 speed (without it the weights are dequantized on every
    call: 10.4 instead of 7.4 µs for the xarm6 student). Outputs are the same to float rounding.
    """
    import onnxruntime as ort  # heavy: only when a model is opened

    if isinstance(src, (bytes, bytearray, memoryview)):
        data, path, folder, where = bytes(src), None, None, "ONNX model (in memory)"
        if len(data) > MAX_ONNX_BYTES:
            raise CheckpointError(f"{where}: more than {MAX_ONNX_BYTES // 1024**3} GB")
    else:
        path = Path(src)
        data, folder, where = _read_onnx_file(path), path.parent, str(path)
    model = _parse_onnx(data, where)
    external = check_external_data(model, folder, where)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if weight_only_int8(get_metadata(model)) or not int8_dot_products_exact():
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    try:
        return ort.InferenceSession(str(path) if external else data, so,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:   # onnxruntime raises its own types (Fail, InvalidGraph, ...)
        msg = " ".join(str(e).split())
        raise CheckpointError(f"{where}: onnxruntime cannot load this model ({msg[:400]}); it is "
                              f"corrupt, truncated, or uses operators or an IR version this "
                              f"onnxruntime does not support") from e
