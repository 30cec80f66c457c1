"""emit_c: an ONNX policy -> the C sources (policy.c, policy.h) of a dependency-free C99 policy."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xcompile.cgen.emit import describe, policy_c
from xcompile.cgen.graph import fold
from xcompile.cgen.header import policy_h
from xcompile.errors import CheckpointError, XCompileError


@dataclass(frozen=True)
class CSources:
    c: str                        # text of policy.c
    h: str                        # text of policy.h
    obs_dim: int
    act_dim: int
    weight_bytes: int             # bytes of static const weight/scale/bias data
    max_width: int                # widest activation buffer (floats)
    layers: tuple[dict, ...]      # JSON-able description of each layer


def _load(model: Any) -> tuple[Any, bytes | None]:
    """(ModelProto with its weights, the bytes it was read from; None for a ModelProto)."""
    import onnx  # heavy: only when a model is compiled

    from xcompile.onnx.session import _parse_onnx, _read_onnx_file, check_external_data

    if isinstance(model, onnx.ModelProto):
        if check_external_data(model, None, "ONNX model (in memory)"):
            raise CheckpointError("unreachable")   # check_external_data raised already
        return model, None
    if isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
        proto = _parse_onnx(data, "ONNX model (in memory)")
        check_external_data(proto, None, "ONNX model (in memory)")
        return proto, data
    path = Path(model)
    data = _read_onnx_file(path)
    proto = _parse_onnx(data, str(path))
    if check_external_data(proto, path.parent, str(path)):
        raise CheckpointError(f"{path}: keeps weights in external data files; emit-c reads only "
                              f"self-contained models (a slim policy is small)")
    return proto, data


def emit_c(model: Any, *, contract: Mapping[str, str] | None = None,
           header_name: str = "policy.h", source_sha256: str = "") -> CSources:
    """The C sources of `model` (an onnx.ModelProto, its bytes, or the path of a .onnx file).

    `contract` defaults to the model's metadata_props; `source_sha256` (written as
    XC_SOURCE_SHA256) defaults to the sha256 of the file or bytes given (of the serialized proto
    for a ModelProto: pass the file's hash when there is a file). Raises UnsupportedModel for
    graphs that are not a dense feed-forward chain."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.h", header_name):
        raise XCompileError(f"header name {header_name!r}: give a plain file name ending in .h")
    proto, data = _load(model)
    if contract is None:
        contract = {p.key: p.value for p in proto.metadata_props}
    sha = source_sha256 or hashlib.sha256(
        proto.SerializeToString() if data is None else data).hexdigest()
    layers, obs_dim, act_dim = fold(proto)
    c, weight_bytes, max_width = policy_c(layers, obs_dim, act_dim, header_name, sha)
    n_bufs = len(set(re.findall(r"float (xc_buf\d)\[", c)))
    h = policy_h(obs_dim, act_dim, contract, sha, header_name, 4 * max_width * n_bufs)
    return CSources(c=c, h=h, obs_dim=obs_dim, act_dim=act_dim, weight_bytes=weight_bytes,
                    max_width=max_width, layers=tuple(describe(la) for la in layers))
