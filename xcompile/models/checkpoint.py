"""The fat checkpoint format: save, load, convert and inspect a fat policy with its trained bodies.

Two containers hold the same content (format tag, version, architecture config, state dict, body
registry, free-form 'extra'):

- `.pt`: a `torch.save` of a dict of tensors and plain Python data only, read by `files.py` without
  running any code in it (static scan of the pickle's globals, then `weights_only=True`).
- `.safetensors`: the state dict as tensors, everything else as JSON in the header metadata under
  the key "xcompile".

Every way a file can be wrong (missing, empty, truncated, foreign, unknown version, missing keys,
non-finite weights, a registry that does not fit the config) becomes a `CheckpointError` that says
what is wrong and what to do. A file's own numbers are input too: they are checked from metadata,
in milliseconds, before anything is built, allocated or walked (`untrusted.py` for the config,
tensors and free-form data; `registry.py` for the bodies). Writes go to a temporary file beside the
target and are renamed into place, so a reader never sees a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xcompile.artifact import file_sha256
from xcompile.errors import CheckpointError
from xcompile.models.fat import MAX_STATE_TENSORS, FatConfig, FatPolicy, count_params, param_usage
from xcompile.models.files import (
    check_input,
    is_dir,
    os_reason,
    read_torch_file,
    torch_save_bounded,
    write_atomically,
)
from xcompile.models.registry import REGISTRY_KEYS, check_registry
from xcompile.models.untrusted import (
    Budget,
    check_config,
    check_finite,
    check_fits_file,
    check_plain,
    check_state,
    first_line,
    show,
    too_many_tensors,
)

__all__ = ["FORMAT", "REGISTRY_KEYS", "VERSION", "FatCheckpoint", "body_entry",
           "convert_checkpoint", "inspect_checkpoint", "load_checkpoint", "save_checkpoint"]

FORMAT = "xcompile.fat-policy"
VERSION = 2  # 2: per-family joint-state skip in the action head
SAVER = "xcompile.models.checkpoint.save_checkpoint"
_SAFETENSORS_META_KEY = "xcompile"
_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")


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
    if is_dir(path):
        raise CheckpointError(f"cannot save a checkpoint as {str(path)!r}: it is a directory; "
                              "name a file (.pt or .safetensors) instead")
    config = model.config
    registry = check_registry(registry, config)
    extra = dict(extra or {})
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    check_finite(state)

    if path.suffix == ".safetensors":
        from safetensors.torch import save_file  # only when asked for: most runs never write one

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
            torch_save_bounded(payload, tmp, path, "registry and extra")
    else:
        raise CheckpointError(
            f"cannot save a checkpoint as {path.name!r}: use a .pt or .safetensors file name")
    write_atomically(path, write)
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
    n_bytes = check_input(path, "checkpoint")
    if path.suffix == ".safetensors":
        payload = _read_safetensors(path)
    else:
        payload = _read_torch(path)

    config, model, registry, extra = _validate(payload, path, n_bytes)
    try:
        sha256 = file_sha256(path)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {os_reason(e)}") from e
    return FatCheckpoint(config=config, model=model.eval(), registry=registry, extra=extra,
                         path=path, sha256=sha256, n_bytes=n_bytes,
                         version=int(payload["version"]))


def _read_torch(path: Path) -> dict[str, Any]:
    """The payload of a `.pt` model file (either format: `xcompile.policy` dispatches on it)."""
    obj = read_torch_file(path, "checkpoint", SAVER)
    if not isinstance(obj, dict):
        raise CheckpointError(_foreign(path, f"it holds a {type(obj).__name__}, not a dict"))
    return obj


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open  # only for .safetensors files

    # safetensors itself checks that every tensor's shape and dtype fit its bytes, that tensors do
    # not overlap and that the header is bounded; it has no strides, so every tensor is dense.
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            header = _safetensors_header(meta, path)
            keys = list(f.keys())
            if len(keys) > MAX_STATE_TENSORS:
                raise CheckpointError(too_many_tensors(len(keys), f"checkpoint {str(path)!r}",
                                                       "fat-policy checkpoint"))
            state = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"cannot read {str(path)!r} as safetensors: it is truncated, corrupt or of another "
            f"format ({first_line(e)})") from e
    return {**header, "state_dict": state}


def _safetensors_header(meta: dict[str, str], path: Path) -> dict[str, Any]:
    if _SAFETENSORS_META_KEY not in meta:
        raise CheckpointError(_foreign(path, "its header has no 'xcompile' metadata"))
    try:
        header = json.loads(meta[_SAFETENSORS_META_KEY])
    except (ValueError, RecursionError) as e:   # JSONDecodeError, a 5000-digit int, deep nesting
        raise CheckpointError(f"the 'xcompile' header of {str(path)!r} is not valid JSON "
                              f"({first_line(e)[:200]}); the file is corrupt") from e
    if not isinstance(header, dict):
        raise CheckpointError(_foreign(path, "its 'xcompile' header is not a JSON object"))
    return header


def _validate(payload: dict[str, Any], path: Path, n_bytes: int
              ) -> tuple[FatConfig, FatPolicy, list[dict[str, Any]], dict[str, Any]]:
    where = f"checkpoint {str(path)!r}"
    fmt = payload.get("format")
    if not isinstance(fmt, str) or fmt != FORMAT:
        raise CheckpointError(_foreign(path, f"it has no format tag {FORMAT!r}"))
    version = payload.get("version")
    if type(version) is not int or version != VERSION:
        raise CheckpointError(
            f"{where} has format version {show(version)}; this xcompile reads version "
            f"{VERSION}. Use the xcompile release that wrote it, or re-save it with this one.")
    missing = [k for k in ("config", "state_dict", "registry") if k not in payload]
    if missing:
        raise CheckpointError(f"{where} lacks {missing}; it is incomplete: "
                              "save it again with save_checkpoint")
    config = check_config(payload["config"], f"{where} has an invalid architecture config")
    registry = check_registry(payload["registry"], config, where)
    extra = payload.get("extra")
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise CheckpointError(f"{where}: 'extra' must be a dict")
    check_plain(extra, "'extra'", where, Budget(), json_only=False)
    state = payload["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: 'state_dict' must map names to tensors")
    if len(state) > MAX_STATE_TENSORS:
        raise CheckpointError(too_many_tensors(len(state), where, "fat-policy checkpoint"))
    check_fits_file(config.param_count(), n_bytes, where, "config")

    # Built on the meta device, which allocates nothing: it gives the shapes every stored tensor
    # must have, and then adopts the loaded tensors themselves (assign=True), so the weights stay
    # the memory-mapped ones from the file instead of being copied into fresh parameters: a
    # 200 MB checkpoint costs one copy of its weights in memory, not two.
    with torch.device("meta"):
        model = FatPolicy(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = check_state(state, expected, where, "config", "save_checkpoint")
    check_finite(state, where)
    state = {k: v.float() if v.dtype != torch.float32 else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{where}: the weights do not fit its own config ({first_line(e)}); "
            "the file is corrupt or was edited by hand") from e
    return config, model, registry, extra


def _foreign(path: Path, why: str) -> str:
    return (f"{str(path)!r} is not an xcompile fat-policy checkpoint ({why}); pass a file "
            "written by xcompile.models.checkpoint.save_checkpoint")


# --------------------------------------------------------------------------------------------
# converting


def _jsonable(x: Any) -> Any:
    """`x` (plain data, already bounded by `check_plain`) as JSON-friendly data: other values
    (tensors, bytes, sets' order aside) become their str."""
    if isinstance(x, dict):
        return {k if k is None or isinstance(k, (str, int, float, bool)) else str(k): _jsonable(v)
                for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def convert_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                       overwrite: bool = False) -> FatCheckpoint:
    """Re-save a fat checkpoint in the container its suffix names (.pt <-> .safetensors).

    The source goes through the same safe, validating loader as every other command; the result is
    written beside `dst`, loaded back and must act exactly like the source before it is renamed
    into place, so a failure leaves `dst` as it was (absent, or the old file).
    """
    src, dst = Path(src), Path(dst)
    if is_dir(dst):
        raise CheckpointError(f"{str(dst)!r} is a directory; give the output file's path, e.g. "
                              f"{str(dst / (src.stem + '.safetensors'))!r}")
    if dst.suffix not in (".safetensors", *_TORCH_SUFFIXES):
        raise CheckpointError(f"cannot convert to {dst.name!r}: name the output .safetensors "
                              "(recommended) or .pt")
    parent = dst.parent
    if not is_dir(parent):
        raise CheckpointError(f"cannot write {str(dst)!r}: the folder {str(parent)!r} does not "
                              "exist (or is not a folder); create it first")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{str(dst)!r} already exists; remove it or pass --overwrite")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise CheckpointError("the output is the input file; give another output path")
    ckpt = load_checkpoint(src)
    extra = _jsonable(ckpt.extra) if dst.suffix == ".safetensors" else ckpt.extra
    written: list[FatCheckpoint] = []

    def write(tmp: str) -> None:
        save_checkpoint(tmp, ckpt.model, ckpt.registry, extra=extra)
        out = load_checkpoint(tmp)
        same = all(torch.equal(a, b) for a, b in zip(ckpt.model.state_dict().values(),
                                                     out.model.state_dict().values()))
        if not same or out.registry != ckpt.registry or out.config != ckpt.config:
            raise CheckpointError(f"converting {str(src)!r} did not round-trip; nothing written")
        written.append(out)

    write_atomically(dst, write, suffix=f".tmp{dst.suffix}")
    return dataclasses.replace(written[0], path=dst)


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
