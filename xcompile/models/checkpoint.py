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
what is wrong and what to do. Writes go to a temporary file beside the target and are renamed into
place, so a reader never sees a half-written checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from xcompile.artifact import file_sha256
from xcompile.errors import CheckpointError
from xcompile.models.fat import FatConfig, FatPolicy, count_params, param_usage

FORMAT = "xcompile.fat-policy"
VERSION = 2  # 2: per-family joint-state skip in the action head
REGISTRY_KEYS = ("name", "family", "joints", "descriptors", "urdf")
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
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"extra must be JSON-serialisable for .safetensors: {e}") from e

        def write(tmp: str) -> None:
            save_file(state, tmp, metadata={_SAFETENSORS_META_KEY: header})
    elif path.suffix in _TORCH_SUFFIXES:
        payload = {"format": FORMAT, "version": VERSION, "config": config.model_dump(),
                   "state_dict": state, "registry": registry, "extra": extra}

        def write(tmp: str) -> None:
            torch.save(payload, tmp)
    else:
        raise CheckpointError(
            f"cannot save a checkpoint as {path.name!r}: use a .pt or .safetensors file name")

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes it private; a checkpoint is not
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# --------------------------------------------------------------------------------------------
# loading


def load_checkpoint(path: str | os.PathLike[str]) -> FatCheckpoint:
    """Load and validate a fat checkpoint; the model comes back in eval mode on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (or is not a file); "
                              "check the path")
    n_bytes = path.stat().st_size
    if n_bytes == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes); the save was "
                              "interrupted or the copy failed: copy or save it again")

    if path.suffix == ".safetensors":
        payload = _read_safetensors(path)
    else:
        payload = _read_torch(path)

    config, model, registry, extra = _validate(payload, path)
    return FatCheckpoint(config=config, model=model.eval(), registry=registry, extra=extra,
                         path=path, sha256=file_sha256(path), n_bytes=n_bytes,
                         version=int(payload["version"]))


def _read_torch(path: Path) -> dict[str, Any]:
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
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{str(path)!r} is not a PyTorch checkpoint (not a torch.save zip archive); it may be "
            "truncated, of another format, or not a checkpoint at all")
    try:
        # weights_only=True is passed explicitly, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn
        # it off; mmap avoids a second copy of the weights in memory.
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

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not iterable
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"cannot read {str(path)!r} as safetensors: it is truncated, corrupt or of another "
            f"format ({_first_line(e)})") from e
    if _SAFETENSORS_META_KEY not in meta:
        raise CheckpointError(_foreign(path, "its header has no 'xcompile' metadata"))
    try:
        header = json.loads(meta[_SAFETENSORS_META_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"the 'xcompile' header of {str(path)!r} is not valid JSON "
                              f"({e}); the file is corrupt") from e
    if not isinstance(header, dict):
        raise CheckpointError(_foreign(path, "its 'xcompile' header is not a JSON object"))
    return {**header, "state_dict": state}


def _validate(payload: dict[str, Any], path: Path
              ) -> tuple[FatConfig, FatPolicy, list[dict[str, Any]], dict[str, Any]]:
    where = repr(str(path))
    if payload.get("format") != FORMAT:
        raise CheckpointError(_foreign(path, f"it has no format tag {FORMAT!r}"))
    version = payload.get("version")
    if version != VERSION:
        raise CheckpointError(
            f"checkpoint {where} has format version {version!r}; this xcompile reads version "
            f"{VERSION}. Use the xcompile release that wrote it, or re-save it with this one.")
    missing = [k for k in ("config", "state_dict", "registry") if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {where} lacks {missing}; it is incomplete: "
                              "save it again with save_checkpoint")
    try:
        config = FatConfig.model_validate(payload["config"])
    except ValidationError as e:
        raise CheckpointError(f"checkpoint {where} has an invalid architecture config:\n{e}") from e

    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {where}: 'state_dict' must map names to tensors")
    _check_finite(state, where)
    state = {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v
             for k, v in state.items()}
    # Built on the meta device and given the loaded tensors themselves (assign=True): the weights
    # stay the memory-mapped ones from the file instead of being copied into fresh parameters,
    # so a 200 MB checkpoint costs one copy of its weights in memory, not two.
    with torch.device("meta"):
        model = FatPolicy(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint {where}: the weights do not fit its own config ({_first_line(e)}); "
            "the file is corrupt or was edited by hand") from e

    registry = _check_registry(payload["registry"], config, where)
    extra = payload.get("extra") or {}
    if not isinstance(extra, dict):
        raise CheckpointError(f"checkpoint {where}: 'extra' must be a dict")
    return config, model, registry, extra


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
    out, names = [], set()
    for i, entry in enumerate(registry):
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: registry entry {i} is not a dict")
        missing = [k for k in REGISTRY_KEYS if k not in entry]
        if missing:
            raise CheckpointError(f"{where}: registry entry {i} lacks {missing}")
        name, family = str(entry["name"]), str(entry["family"])
        if name in names:
            raise CheckpointError(f"{where}: body {name!r} appears twice in the registry")
        names.add(name)
        if family not in config.global_dims:
            raise CheckpointError(f"{where}: body {name!r} has family {family!r}, not one of "
                                  f"the config's families {config.families}")
        joints = [str(j) for j in entry["joints"]]
        try:
            desc = [[float(x) for x in row] for row in _tolist(entry["descriptors"])]
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: descriptors of body {name!r} are not numbers") from e
        if len(desc) != len(joints) or any(len(r) != config.desc_dim for r in desc):
            raise CheckpointError(
                f"{where}: descriptors of body {name!r} must be {len(joints)} x "
                f"{config.desc_dim} (one row per joint)")
        if not all(math.isfinite(x) for r in desc for x in r):
            raise CheckpointError(f"{where}: descriptors of body {name!r} hold NaN or Inf")
        out.append({**entry, "name": name, "family": family, "joints": joints,
                    "descriptors": desc, "urdf": str(entry["urdf"])})
    return out


def _tolist(x: Any) -> Any:
    return x.tolist() if hasattr(x, "tolist") else x


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
    loaded back and must act exactly like the source before this returns.
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix not in (".safetensors", *_TORCH_SUFFIXES):
        raise CheckpointError(f"cannot convert to {dst.name!r}: name the output .safetensors "
                              "(recommended) or .pt")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{str(dst)!r} already exists; remove it or pass --overwrite")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise CheckpointError("the output is the input file; give another output path")
    ckpt = load_checkpoint(src)
    extra = ckpt.extra
    if dst.suffix == ".safetensors":
        try:
            json.dumps(extra)
        except (TypeError, ValueError):
            extra = json.loads(json.dumps(extra, default=str))   # tensors etc. become strings
    save_checkpoint(dst, ckpt.model, ckpt.registry, extra=extra)
    out = load_checkpoint(dst)
    same = all(torch.equal(a, b) for a, b in zip(ckpt.model.state_dict().values(),
                                                 out.model.state_dict().values()))
    if not same or out.registry != ckpt.registry or out.config != ckpt.config:
        dst.unlink(missing_ok=True)
        raise CheckpointError(f"converting {str(src)!r} did not round-trip; nothing written")
    return out


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
    bodies = []
    for entry in ckpt.registry:
        usage = param_usage(ckpt.model, entry["family"])
        bodies.append({"name": entry["name"], "family": entry["family"],
                       "n_joints": len(entry["joints"]), "params_used": usage["used"],
                       "fraction_used": usage["fraction"]})
    return {"format": ckpt.format, "version": ckpt.version, "path": str(ckpt.path),
            "bytes": ckpt.n_bytes, "sha256": ckpt.sha256, "params_total": count_params(ckpt.model),
            "config": ckpt.config.model_dump(), "bodies": bodies}
