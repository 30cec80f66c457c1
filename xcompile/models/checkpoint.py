"""The fat checkpoint format: weights, architecture config and the registry of trained bodies.

Two containers hold the same content:

- `.pt`: a `torch.save` of a dict of tensors and plain Python data only, so it loads with
  `torch.load(weights_only=True)`. A checkpoint is input from strangers: the loader first lists the
  pickle's globals statically and refuses any that are not plain data, then loads with
  `weights_only=True` passed explicitly (which `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` cannot override).
  No code in a checkpoint ever runs.
- `.safetensors`: the state dict as tensors, everything else as JSON in the header metadata under
  the key "xcompile".

Every way a file can be wrong (missing, empty, truncated, foreign, unknown version, missing keys,
non-finite weights, a registry that does not fit the config) becomes a `CheckpointError` that says
what is wrong and what to do. A file's own numbers are input too: a config past the limits in
`fat.py` (n_layers = 10**6), a tensor whose shape, strides or storage do not fit (a 10^6 x 10^6
stride-0 view of one float is 4 bytes on disk), a compressed or oversized pickle, or free-form data
that is huge, self-referential or deeply nested is refused from its metadata, in milliseconds, before
anything is built, allocated or walked. Writes go to a temporary file beside the target and are
renamed into place, so a reader never sees a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from xcompile.artifact import file_sha256
from xcompile.errors import CheckpointError
from xcompile.models.fat import (
    JOINT_STATE_DIM,
    MAX_BODIES,
    MAX_DESCRIPTOR_VALUES,
    MAX_EXTRA_DEPTH,
    MAX_EXTRA_ITEMS,
    MAX_EXTRA_TEXT,
    MAX_FAMILIES,
    MAX_JOINTS,
    MAX_NAME_LEN,
    MAX_PATH_LEN,
    MAX_PICKLE_BYTES,
    MAX_STATE_TENSORS,
    FatConfig,
    FatPolicy,
    count_params,
    param_usage,
)

FORMAT = "xcompile.fat-policy"
VERSION = 2  # 2: per-family joint-state skip in the action head
REGISTRY_KEYS = ("name", "family", "joints", "descriptors", "urdf")
_SAFETENSORS_META_KEY = "xcompile"
_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")
# Weights are stored in one of these and held as float32 once loaded.
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_INT_BITS = 1024  # an int in 'extra' wider than this is not data (and json cannot print it)


@dataclass(frozen=True)
class FatCheckpoint:
    """A loaded, validated fat checkpoint."""

    config: FatConfig
    model: FatPolicy
    registry: list[dict[str, Any]]
    extra: dict[str, Any]
    path: Path
    sha256: str
    n_bytes: int
    version: int = VERSION
    format: str = field(default=FORMAT)


# --------------------------------------------------------------------------------------------
# saving


def save_checkpoint(path: str | os.PathLike[str], model: FatPolicy,
                    registry: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> Path:
    """Write `model` and its body `registry` to `path` (.pt or .safetensors) atomically."""
    path = Path(path)
    if _is_dir(path):
        raise CheckpointError(f"cannot save a checkpoint as {str(path)!r}: it is a directory; "
                              "name a file (.pt or .safetensors) instead")
    config = model.config
    registry = _check_registry(registry, config)
    extra = dict(extra or {})
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    _check_finite(state)

    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "version": VERSION, "config": config.model_dump(),
                "registry": registry, "extra": extra}
        try:
            header = json.dumps(meta)
        except (TypeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"extra must be JSON-serialisable for .safetensors: {e}") from e

        def write(tmp: str) -> None:
            save_file(state, tmp, metadata={_SAFETENSORS_META_KEY: header})
    elif path.suffix in _TORCH_SUFFIXES:
        payload = {"format": FORMAT, "version": VERSION, "config": config.model_dump(),
                   "state_dict": state, "registry": registry, "extra": extra}

        def write(tmp: str) -> None:
            torch.save(payload, tmp)
            # What this writes, load_checkpoint must read: its pickle (all but the weights) is
            # bounded there, so refuse here rather than leave an unloadable file.
            with zipfile.ZipFile(tmp) as zf:
                n = sum(m.file_size for m in zf.infolist() if m.filename.endswith("data.pkl"))
            if n > MAX_PICKLE_BYTES:
                raise CheckpointError(
                    f"cannot save {str(path)!r}: its registry and extra pickle to {n:,} bytes, more "
                    f"than a checkpoint may hold ({MAX_PICKLE_BYTES:,}, MAX_PICKLE_BYTES); keep "
                    "large data out of 'extra'")
    else:
        raise CheckpointError(
            f"cannot save a checkpoint as {path.name!r}: use a .pt or .safetensors file name")

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"cannot write {str(path)!r}: {_os_reason(e)}; check that its "
                              "folder can be created and written to") from e
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes it private; a checkpoint is not
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(f"cannot write {str(path)!r}: {_os_reason(e)}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# --------------------------------------------------------------------------------------------
# loading
#
# Everything a file says is checked before it costs anything: the archive's shape before the
# unpickler reads it, the config against the limits in fat.py before a network is built (and that
# one is built on the meta device, allocating nothing), every tensor's type, shape, strides and
# storage before any elementwise work, and the free-form parts with a budget before they are
# walked. Only then are the weights checked for NaN/Inf and adopted by the model.


def load_checkpoint(path: str | os.PathLike[str]) -> FatCheckpoint:
    """Load and validate a fat checkpoint; the model comes back in eval mode on the CPU."""
    path = Path(path)
    try:
        is_file = path.is_file()
        n_bytes = path.stat().st_size if is_file else 0
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {_show(str(path))}: "
                              f"{_os_reason(e)}; check the path") from e
    if not is_file:
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (or is not a file); "
                              "check the path")
    if n_bytes == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes); the save was "
                              "interrupted or the copy failed: copy or save it again")

    if path.suffix == ".safetensors":
        payload = _read_safetensors(path)
    else:
        payload = _read_torch(path)

    config, model, registry, extra = _validate(payload, path, n_bytes)
    try:
        sha256 = file_sha256(path)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {_os_reason(e)}") from e
    return FatCheckpoint(config=config, model=model.eval(), registry=registry, extra=extra,
                         path=path, sha256=sha256, n_bytes=n_bytes,
                         version=int(payload["version"]))


def _check_torch_archive(path: Path) -> None:
    """Refuse a .pt whose zip could cost more to read than its size: torch.save stores every
    member uncompressed, so a compressed member (a zip bomb) or an oversized pickle is crafted."""
    not_torch = CheckpointError(
        f"{str(path)!r} is not a PyTorch checkpoint (not a torch.save zip archive); it may be "
        "truncated, of another format, or not a checkpoint at all")
    if not zipfile.is_zipfile(path):
        raise not_torch
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except Exception as e:  # noqa: BLE001 - any failure to read the directory: not a torch zip
        raise not_torch from e
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED or m.file_size != m.compress_size:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: archive member {_show(m.filename)} is compressed "
                f"({m.compress_size:,} bytes that unpack to {m.file_size:,}); torch.save never "
                "compresses, so the file was repacked or crafted: save it again with "
                "save_checkpoint")
        if m.filename.endswith("data.pkl") and m.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: its pickled structure is {m.file_size:,} bytes, more "
                f"than the limit of {MAX_PICKLE_BYTES:,} (MAX_PICKLE_BYTES); a checkpoint's "
                "weights are stored apart from it, so this one holds something else: save it "
                "again with save_checkpoint")


def _read_torch(path: Path) -> dict[str, Any]:
    _check_torch_archive(path)
    # Static scan first: it names exactly what the file would import, for a useful message, and
    # refuses before the unpickler starts. A scan that cannot read the file is not a verdict; the
    # weights-only load below then reports what is wrong with it.
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - any failure here means "could not scan", not "unsafe"
        unsafe = []
    if unsafe:
        raise CheckpointError(
            f"checkpoint {str(path)!r} refers to Python code ({', '.join(sorted(unsafe))}): the "
            "file carries code and will not be loaded. An xcompile checkpoint holds only tensors "
            "and plain data; if you trust its source, re-save the weights with "
            "xcompile.models.checkpoint.save_checkpoint.")
    try:
        # weights_only=True is passed explicitly, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn
        # it off; mmap avoids a second copy of the weights in memory, and makes a tensor that
        # claims more bytes than the file holds fail here (the storage cannot grow) rather than
        # allocate.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds objects other than tensors and plain data and will "
            f"not be loaded ({_first_line(e)}); re-save it with save_checkpoint") from e
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError) as e:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: it is truncated or corrupt "
            f"({_first_line(e)}); copy or save it again") from e
    if not isinstance(obj, dict):
        raise CheckpointError(_foreign(path, f"it holds a {type(obj).__name__}, not a dict"))
    return obj


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    # safetensors itself checks that every tensor's shape and dtype fit its bytes, that tensors do
    # not overlap and that the header is bounded; it has no strides, so every tensor is dense.
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            header = _safetensors_header(meta, path)
            keys = list(f.keys())
            if len(keys) > MAX_STATE_TENSORS:
                raise CheckpointError(_too_many_tensors(len(keys), repr(str(path))))
            state = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"cannot read {str(path)!r} as safetensors: it is truncated, corrupt or of another "
            f"format ({_first_line(e)})") from e
    return {**header, "state_dict": state}


def _safetensors_header(meta: dict[str, str], path: Path) -> dict[str, Any]:
    if _SAFETENSORS_META_KEY not in meta:
        raise CheckpointError(_foreign(path, "its header has no 'xcompile' metadata"))
    try:
        header = json.loads(meta[_SAFETENSORS_META_KEY])
    except (ValueError, RecursionError) as e:   # JSONDecodeError, a 5000-digit int, deep nesting
        raise CheckpointError(f"the 'xcompile' header of {str(path)!r} is not valid JSON "
                              f"({_first_line(e)[:200]}); the file is corrupt") from e
    if not isinstance(header, dict):
        raise CheckpointError(_foreign(path, "its 'xcompile' header is not a JSON object"))
    return header


def _validate(payload: dict[str, Any], path: Path, n_bytes: int
              ) -> tuple[FatConfig, FatPolicy, list[dict[str, Any]], dict[str, Any]]:
    where = repr(str(path))
    fmt = payload.get("format")
    if not isinstance(fmt, str) or fmt != FORMAT:
        raise CheckpointError(_foreign(path, f"it has no format tag {FORMAT!r}"))
    version = payload.get("version")
    if type(version) is not int or version != VERSION:
        raise CheckpointError(
            f"checkpoint {where} has format version {_show(version)}; this xcompile reads version "
            f"{VERSION}. Use the xcompile release that wrote it, or re-save it with this one.")
    missing = [k for k in ("config", "state_dict", "registry") if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {where} lacks {missing}; it is incomplete: "
                              "save it again with save_checkpoint")
    config = _check_config(payload["config"], where)
    registry = _check_registry(payload["registry"], config, f"checkpoint {where}")
    extra = payload.get("extra")
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise CheckpointError(f"checkpoint {where}: 'extra' must be a dict")
    _check_plain(extra, "'extra'", f"checkpoint {where}", _Budget(), json_only=False)
    state = payload["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {where}: 'state_dict' must map names to tensors")
    if len(state) > MAX_STATE_TENSORS:
        raise CheckpointError(_too_many_tensors(len(state), where))
    n_params = config.param_count()
    if n_params * min(d.itemsize for d in _WEIGHT_DTYPES) > n_bytes:
        raise CheckpointError(
            f"checkpoint {where}: its config describes {n_params:,} parameters, more than its "
            f"{n_bytes:,} bytes can hold; the config or the file was edited by hand, or the file "
            "is truncated")

    # Built on the meta device, which allocates nothing: it gives the shapes every stored tensor
    # must have, and then adopts the loaded tensors themselves (assign=True), so the weights stay
    # the memory-mapped ones from the file instead of being copied into fresh parameters: a
    # 200 MB checkpoint costs one copy of its weights in memory, not two.
    with torch.device("meta"):
        model = FatPolicy(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = _check_state(state, expected, where)
    _check_finite(state, where)
    state = {k: v.float() if v.dtype != torch.float32 else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint {where}: the weights do not fit its own config ({_first_line(e)}); "
            "the file is corrupt or was edited by hand") from e
    return config, model, registry, extra


def _check_config(raw: Any, where: str) -> FatConfig:
    """The architecture config, checked against the limits in fat.py before anything is built.

    Strict: a string, float, bool or tensor where an int belongs is refused, not coerced.
    """
    bad = f"checkpoint {where} has an invalid architecture config"
    if not isinstance(raw, dict):
        raise CheckpointError(f"{bad}: it is a {type(raw).__name__}, not a dict; the file is "
                              "corrupt or was edited by hand")
    unknown = [k for k in raw if k not in FatConfig.model_fields]
    if unknown:
        raise CheckpointError(f"{bad}: unknown fields {_names(unknown)}; a FatConfig has "
                              f"{', '.join(FatConfig.model_fields)}")
    dims = raw.get("global_dims")
    if isinstance(dims, dict) and len(dims) > MAX_FAMILIES:
        raise CheckpointError(f"{bad}: global_dims lists {len(dims):,} task families, more than "
                              f"the limit of {MAX_FAMILIES} (MAX_FAMILIES)")
    try:
        config = FatConfig.model_validate(raw, strict=True)
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False)[:5]:
            loc = ".".join(p if isinstance(p, str) and len(p) <= 80 else _show(p)
                           for p in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{loc} = {_show(err.get('input'))}: {msg}" if loc else msg)
        more = f" (and {e.error_count() - 5} more)" if e.error_count() > 5 else ""
        raise CheckpointError(f"{bad}: {'; '.join(problems)}{more}. The file is corrupt or was "
                              "edited by hand; use the checkpoint as xcompile saved it") from e
    if config.joint_state_dim != JOINT_STATE_DIM:
        raise CheckpointError(
            f"{bad}: joint_state_dim = {config.joint_state_dim}, but this xcompile's observations "
            f"carry {JOINT_STATE_DIM} state features per joint (q, qdot, last action)")
    return config


def _check_state(state: dict[Any, Any], expected: dict[str, tuple[int, ...]], where: str
                 ) -> dict[str, torch.Tensor]:
    """Each stored tensor is a plain dense CPU float tensor of the shape the config expects.

    Checked on metadata only (type, layout, shape, strides, storage size): a 10^6 x 10^6 view of
    one stored float is refused here, before the NaN check would walk its 10^12 elements.
    """
    if not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"checkpoint {where}: 'state_dict' must map names (strings) to "
                              "tensors")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = "; ".join(f"{label} {_names(keys)}" for label, keys in
                         (("missing", missing), ("unexpected", unexpected)) if keys)
        raise CheckpointError(
            f"checkpoint {where}: the weights do not fit its own config ({what}); the file is "
            "corrupt or was edited by hand")
    for key, shape in expected.items():
        t = state[key]
        problem = _tensor_problem(t, dtypes=_WEIGHT_DTYPES)
        if problem is None and tuple(t.shape) != shape:
            problem = (f"has shape {_shape(t.shape)}, but its config needs {_shape(shape)}: "
                       "the weights do not fit its own config")
        problem = problem or _layout_problem(t)
        if problem:
            raise CheckpointError(f"checkpoint {where}: tensor {_show(key)} {problem}; the file "
                                  "is corrupt or was crafted: save it again with save_checkpoint")
    return {k: state[k] for k in expected}


def _tensor_problem(t: Any, dtypes: tuple[torch.dtype, ...] | None = None) -> str | None:
    """What makes `t` not a plain CPU tensor of data (of one of `dtypes`); None if it is one."""
    if not isinstance(t, torch.Tensor):
        return f"is a {type(t).__name__}, not a tensor"
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return f"is a tensor subclass ({type(t).__name__})"
    if t.layout != torch.strided:
        return f"is a {str(t.layout).removeprefix('torch.')} tensor, not a dense one"
    if t.device.type != "cpu":
        return f"is on the {t.device.type!r} device and holds no data"
    if t.is_quantized or (dtypes is not None and t.dtype not in dtypes):
        want = [str(d).removeprefix("torch.") for d in dtypes or ()]
        return f"has dtype {str(t.dtype).removeprefix('torch.')}" + (
            f"; weights must be {', '.join(want[:-1])} or {want[-1]}" if want else "")
    return None


def _layout_problem(t: torch.Tensor) -> str | None:
    """Whether `t` is dense and row-major in a storage that holds all of it (None if so).

    torch.save of a view stores only the view's storage: `torch.zeros(1).expand(10**6, 10**6)`
    is 4 bytes on disk with strides (0, 0) and 10^12 elements. Such a tensor, a transposed or
    sliced view, or strides that do not fit the storage, is never what save_checkpoint writes.
    """
    dense, step = [], 1
    for n in reversed(t.shape):
        dense.append(step)
        step *= n
    dense.reverse()
    strides = t.stride()
    if any(n > 1 and s != d for n, s, d in zip(t.shape, strides, dense)):
        return (f"has strides {strides} for shape {_shape(t.shape)}: it is a view (expanded, "
                "transposed or sliced), not a dense tensor")
    need = (t.storage_offset() + t.numel()) * t.element_size()
    have = t.untyped_storage().nbytes()
    if t.storage_offset() < 0 or have < need:
        return f"needs {need:,} bytes at offset {t.storage_offset():,} but its storage holds {have:,}"
    return None


def _check_finite(state: dict[str, torch.Tensor], where: str = "the model") -> None:
    def finite(v: torch.Tensor) -> bool:
        # In chunks: isfinite's temporaries on a whole 64 MB tensor would cost more memory than
        # the memory-mapped weights themselves.
        return all(bool(torch.isfinite(c).all()) for c in v.reshape(-1).split(1 << 20))

    bad = [k for k, v in state.items() if v.is_floating_point() and not finite(v)]
    if bad:
        raise CheckpointError(
            f"{where} has NaN or Inf weights in {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
            "training diverged or the file is corrupt: use an earlier checkpoint")


def _check_registry(registry: Any, config: FatConfig, where: str = "the registry"
                    ) -> list[dict[str, Any]]:
    """Check each body entry against the config; return clean plain-Python copies."""
    if not isinstance(registry, list):
        raise CheckpointError(f"{where}: the body registry must be a list of entries")
    if len(registry) > MAX_BODIES:
        raise CheckpointError(f"{where}: the registry lists {len(registry):,} bodies, more than "
                              f"the limit of {MAX_BODIES:,} (MAX_BODIES)")
    out, names, n_values, budget = [], set(), 0, _Budget()
    for i, entry in enumerate(registry):
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: registry entry {i} is not a dict")
        missing = [k for k in REGISTRY_KEYS if k not in entry]
        if missing:
            raise CheckpointError(f"{where}: registry entry {i} lacks {missing}")
        name = _text(entry["name"], f"registry entry {i}: 'name'", where)
        family = _text(entry["family"], f"body {name!r}: 'family'", where)
        if name in names:
            raise CheckpointError(f"{where}: body {name!r} appears twice in the registry")
        names.add(name)
        if family not in config.global_dims:
            raise CheckpointError(f"{where}: body {name!r} has family {family!r}, not one of "
                                  f"the config's families {config.families}")
        joints = entry["joints"]
        if not isinstance(joints, (list, tuple)) or not 1 <= len(joints) <= MAX_JOINTS:
            n = f"{len(joints):,} joints" if isinstance(joints, (list, tuple)) else _show(joints)
            raise CheckpointError(f"{where}: 'joints' of body {name!r} must list 1 to "
                                  f"{MAX_JOINTS} joint names (MAX_JOINTS), not {n}")
        joints = [_text(j, f"body {name!r}: joint {k}", where) for k, j in enumerate(joints)]
        if len(set(joints)) != len(joints):
            raise CheckpointError(f"{where}: body {name!r} names a joint twice")
        n_values += len(joints) * config.desc_dim
        if n_values > MAX_DESCRIPTOR_VALUES:
            raise CheckpointError(
                f"{where}: the registry's descriptors hold more than {MAX_DESCRIPTOR_VALUES:,} "
                "numbers (MAX_DESCRIPTOR_VALUES)")
        desc = _descriptor_rows(entry["descriptors"], len(joints), config.desc_dim, name, where)
        urdf = entry["urdf"]
        if isinstance(urdf, os.PathLike):
            urdf = str(urdf)
        urdf = _text(urdf, f"body {name!r}: 'urdf'", where, MAX_PATH_LEN, allow_empty=True)
        clean = {"name": name, "family": family, "joints": joints, "descriptors": desc,
                 "urdf": urdf}
        for k, v in entry.items():
            if k not in clean:
                if not isinstance(k, str):
                    raise CheckpointError(f"{where}: body {name!r} has a field named "
                                          f"{_show(k)}; field names are strings")
                _check_plain(v, f"field {_show(k)} of body {name!r}", where, budget,
                             json_only=True)
        out.append({k: clean.get(k, v) for k, v in entry.items()})
    return out


def _descriptor_rows(x: Any, n: int, width: int, name: str, where: str) -> list[list[float]]:
    """Descriptors as an n x width list of finite floats (from lists, an array or a tensor)."""
    wrong = CheckpointError(f"{where}: descriptors of body {name!r} must be {n} x {width} "
                            "(one row per joint)")
    if isinstance(x, torch.Tensor):
        if x.device.type not in ("cpu", "meta"):   # a caller's GPU tensor (a file's are on the CPU)
            x = x.detach().cpu()
        problem = _tensor_problem(x)
        if problem is None and tuple(x.shape) != (n, width):
            raise wrong
        if problem or x.is_complex():
            raise CheckpointError(f"{where}: descriptors of body {name!r} {problem or 'are complex'}")
        x = x.tolist()          # at most MAX_JOINTS x MAX_FEATURE_DIM values, whatever the strides
    elif isinstance(x, np.ndarray):
        if x.shape != (n, width):
            raise wrong
        x = x.tolist()
    if not isinstance(x, (list, tuple)) or len(x) != n:
        raise wrong
    rows = []
    for row in x:
        if not isinstance(row, (list, tuple)) or len(row) != width:
            raise wrong
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in row):
            raise CheckpointError(f"{where}: descriptors of body {name!r} are not numbers")
        try:
            values = [float(v) for v in row]
        except (OverflowError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: descriptors of body {name!r} hold numbers too large "
                                  "for a float") from e
        if not all(math.isfinite(v) for v in values):
            raise CheckpointError(f"{where}: descriptors of body {name!r} hold NaN or Inf")
        rows.append(values)
    return rows


def _text(x: Any, what: str, where: str, limit: int = MAX_NAME_LEN,
          allow_empty: bool = False) -> str:
    """`x` as a str of at most `limit` characters: a name or path, never coerced from another type."""
    if not isinstance(x, str):
        raise CheckpointError(f"{where}: {what} must be a string, not {_show(x)}")
    if len(x) > limit or (not x and not allow_empty):
        size = f"{len(x):,} characters long" if x else "empty"
        raise CheckpointError(f"{where}: {what} is {size}; it must be 1 to {limit:,} characters "
                              f"{'(MAX_PATH_LEN)' if limit == MAX_PATH_LEN else '(MAX_NAME_LEN)'}")
    return str(x)


class _Budget:
    """How much free-form data a checkpoint may still hold (shared by its parts)."""

    def __init__(self) -> None:
        self.items = MAX_EXTRA_ITEMS
        self.text = MAX_EXTRA_TEXT


def _check_plain(obj: Any, what: str, where: str, budget: _Budget, json_only: bool) -> None:
    """Refuse free-form data that is not plain, is nested too deep (or refers to itself), or is
    too large to walk: a pickle can share one list many times over, so what is walked, not what
    is stored, is counted. With `json_only`, only what a JSON header holds is allowed."""
    def fail(why: str) -> CheckpointError:
        return CheckpointError(f"{where}: {what} {why}; it is not plain data as save_checkpoint "
                               "writes it: the file is corrupt or was crafted")

    stack = [(obj, 0)]
    while stack:
        x, depth = stack.pop()
        budget.items -= 1
        if budget.items < 0:
            raise fail(f"holds more than {MAX_EXTRA_ITEMS:,} values (MAX_EXTRA_ITEMS)")
        if depth > MAX_EXTRA_DEPTH:
            raise fail(f"is nested more than {MAX_EXTRA_DEPTH} deep (MAX_EXTRA_DEPTH) or "
                       "contains itself")
        if x is None or isinstance(x, (bool, float)):
            continue
        if isinstance(x, int):
            if x.bit_length() > _MAX_INT_BITS:
                raise fail(f"holds an integer of {x.bit_length():,} bits")
        elif isinstance(x, str) or (isinstance(x, bytes) and not json_only):
            budget.text -= len(x)
            if budget.text < 0:
                raise fail(f"holds more than {MAX_EXTRA_TEXT:,} characters of text "
                           "(MAX_EXTRA_TEXT)")
        elif isinstance(x, (list, tuple, dict)) or (
                isinstance(x, (set, frozenset)) and not json_only):
            if len(x) > budget.items:
                raise fail(f"holds more than {MAX_EXTRA_ITEMS:,} values (MAX_EXTRA_ITEMS)")
            if isinstance(x, dict):
                if json_only and not all(isinstance(k, str) for k in x):
                    raise fail("has a dict whose keys are not all strings")
                stack.extend((v, depth + 1) for kv in x.items() for v in kv)
            else:
                stack.extend((v, depth + 1) for v in x)
        elif json_only:
            raise fail(f"holds a {type(x).__name__}; only numbers, strings, lists and dicts "
                       "are allowed here")
        elif isinstance(x, torch.Tensor):
            problem = _tensor_problem(x) or _layout_problem(x)
            if problem:
                raise fail(f"holds a tensor that {problem}")
        elif not isinstance(x, (complex, torch.dtype, torch.device)):
            raise fail(f"holds a {type(x).__name__}")


def _jsonable(x: Any) -> Any:
    """`x` (plain data, already bounded by `_check_plain`) as JSON-friendly data: other values
    (tensors, bytes, sets' order aside) become their str."""
    if isinstance(x, dict):
        return {k if k is None or isinstance(k, (str, int, float, bool)) else str(k): _jsonable(v)
                for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def _show(x: Any, limit: int = 80) -> str:
    """A short, safe description of a value from a file, for a message (never a 10 MB repr, or a
    repr of a 5000-digit int, which Python refuses)."""
    if isinstance(x, bool) or x is None or isinstance(x, float):
        return repr(x)
    if isinstance(x, int):
        return repr(x) if x.bit_length() <= 64 else f"an integer of {x.bit_length():,} bits"
    if isinstance(x, str):
        return repr(x) if len(x) <= limit else f"{x[:limit]!r}... ({len(x):,} characters)"
    if isinstance(x, torch.Tensor):
        return f"a {type(x).__name__} of shape {_shape(x.shape)}"
    if isinstance(x, (list, tuple, dict, set, frozenset, bytes)):
        return f"a {type(x).__name__} of {len(x):,} items"
    return f"a {type(x).__name__}"


def _shape(shape: Any) -> str:
    return "(" + ", ".join(str(int(n)) for n in shape) + ("," if len(shape) == 1 else "") + ")"


def _names(keys: list[Any]) -> str:
    shown = ", ".join(_show(k) for k in keys[:5])
    return f"[{shown}{', ...' if len(keys) > 5 else ''}]" + (
        f" ({len(keys):,} in all)" if len(keys) > 5 else "")


def _too_many_tensors(n: int, where: str) -> str:
    return (f"checkpoint {where} holds {n:,} tensors, more than the limit of "
            f"{MAX_STATE_TENSORS:,} (MAX_STATE_TENSORS); it is not a fat-policy checkpoint")


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _os_reason(e: OSError) -> str:
    return e.strerror or _first_line(e)


def _foreign(path: Path, why: str) -> str:
    return (f"{str(path)!r} is not an xcompile fat-policy checkpoint ({why}); pass a file "
            "written by xcompile.models.checkpoint.save_checkpoint")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def convert_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                       overwrite: bool = False) -> FatCheckpoint:
    """Re-save a fat checkpoint in the container its suffix names (.pt <-> .safetensors).

    The source goes through the same safe, validating loader as every other command; the result is
    written beside `dst`, loaded back and must act exactly like the source before it is renamed
    into place, so a failure leaves `dst` as it was (absent, or the old file).
    """
    src, dst = Path(src), Path(dst)
    if _is_dir(dst):
        raise CheckpointError(f"{str(dst)!r} is a directory; give the output file's path, e.g. "
                              f"{str(dst / (src.stem + '.safetensors'))!r}")
    if dst.suffix not in (".safetensors", *_TORCH_SUFFIXES):
        raise CheckpointError(f"cannot convert to {dst.name!r}: name the output .safetensors "
                              "(recommended) or .pt")
    parent = dst.parent
    if not _is_dir(parent):
        raise CheckpointError(f"cannot write {str(dst)!r}: the folder {str(parent)!r} does not "
                              "exist (or is not a folder); create it first")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{str(dst)!r} already exists; remove it or pass --overwrite")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise CheckpointError("the output is the input file; give another output path")
    ckpt = load_checkpoint(src)
    extra = _jsonable(ckpt.extra) if dst.suffix == ".safetensors" else ckpt.extra
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=f".tmp{dst.suffix}",
                                   dir=parent)
    except OSError as e:
        raise CheckpointError(f"cannot write {str(dst)!r}: {_os_reason(e)}") from e
    os.close(fd)
    try:
        save_checkpoint(tmp, ckpt.model, ckpt.registry, extra=extra)
        out = load_checkpoint(tmp)
        same = all(torch.equal(a, b) for a, b in zip(ckpt.model.state_dict().values(),
                                                     out.model.state_dict().values()))
        if not same or out.registry != ckpt.registry or out.config != ckpt.config:
            raise CheckpointError(f"converting {str(src)!r} did not round-trip; nothing written")
        os.replace(tmp, dst)
    except OSError as e:
        raise CheckpointError(f"cannot write {str(dst)!r}: {_os_reason(e)}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dataclasses.replace(out, path=dst)


# --------------------------------------------------------------------------------------------
# queries


def body_entry(ckpt: FatCheckpoint, name: str) -> dict[str, Any]:
    """The registry entry of body `name`; the error lists the bodies the checkpoint knows."""
    for entry in ckpt.registry:
        if entry["name"] == name:
            return entry
    known = ", ".join(e["name"] for e in ckpt.registry) or "(none)"
    raise CheckpointError(f"body {name!r} is not in checkpoint {str(ckpt.path)!r}; it knows: "
                          f"{known}. For another body, give its robot TOML instead.")


def inspect_checkpoint(ckpt: FatCheckpoint) -> dict[str, Any]:
    """What `xcompile inspect` prints: container facts, config and per-body usage."""
    bodies, usages = [], {}   # usage depends on the family only: once per family, not body
    for entry in ckpt.registry:
        if entry["family"] not in usages:
            usages[entry["family"]] = param_usage(ckpt.model, entry["family"])
        usage = usages[entry["family"]]
        bodies.append({"name": entry["name"], "family": entry["family"],
                       "n_joints": len(entry["joints"]), "params_used": usage["used"],
                       "fraction_used": usage["fraction"]})
    return {"format": ckpt.format, "version": ckpt.version, "path": str(ckpt.path),
            "bytes": ckpt.n_bytes, "sha256": ckpt.sha256, "params_total": count_params(ckpt.model),
            "config": ckpt.config.model_dump(), "bodies": bodies}
