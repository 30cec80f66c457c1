"""Model files on disk: reading a `.pt` from a stranger without running its code, writing atomically.

Both `.pt` formats (a fat checkpoint, a one-robot torch policy) are a `torch.save` of a dict of
tensors and plain data, and are read the one way here: the zip archive's shape is checked first
(torch.save never compresses, so a compressed member is a zip bomb; the pickle, all but the weights,
is bounded by MAX_PICKLE_BYTES), then the pickle's globals are listed statically and any that are
not plain data refused, then it is loaded with `weights_only=True` passed explicitly (which
`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` cannot override). No code in a model file ever runs.

Writes go to a temporary file beside the target that is renamed into place, so a reader never sees
half a file; a `.pt` whose pickle the reader would refuse is not written at all.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from xcompile.errors import CheckpointError
from xcompile.models.fat import MAX_PICKLE_BYTES
from xcompile.models.untrusted import first_line, show
from xcompile.outdir import atomic_write_via


def check_input(path: Path, what: str) -> int:
    """The size of `path`, a regular file that is not empty; `what` names it in messages."""
    try:
        is_file = path.is_file()
        n_bytes = path.stat().st_size if is_file else 0
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {show(str(path))}: "
                              f"{os_reason(e)}; check the path") from e
    if not is_file:
        raise CheckpointError(f"{what} {str(path)!r} does not exist (or is not a file); "
                              "check the path")
    if n_bytes == 0:
        raise CheckpointError(f"{what} {str(path)!r} is empty (0 bytes); the save was "
                              "interrupted or the copy failed: copy or save it again")
    return n_bytes


def read_torch_file(path: Path, what: str, saver: str) -> Any:
    """What a `.pt` file holds, read safely; `what` names the file ("checkpoint") and `saver` the
    function that writes a good one ("xcompile.models.checkpoint.save_checkpoint")."""
    short = saver.rsplit(".", 1)[-1]
    _check_torch_archive(path, what, short)
    # Static scan first: it names exactly what the file would import, for a useful message, and
    # refuses before the unpickler starts. A scan that cannot read the file is not a verdict; the
    # weights-only load below then reports what is wrong with it.
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - any failure here means "could not scan", not "unsafe"
        unsafe = []
    if unsafe:
        raise CheckpointError(
            f"{what} {str(path)!r} refers to Python code ({', '.join(sorted(unsafe))}): the "
            f"file carries code and will not be loaded. An xcompile {what} holds only tensors "
            f"and plain data; if you trust its source, re-save the weights with {saver}.")
    try:
        # weights_only=True is passed explicitly, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn
        # it off; mmap avoids a second copy of the weights in memory, and makes a tensor that
        # claims more bytes than the file holds fail here (the storage cannot grow) rather than
        # allocate.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{what} {str(path)!r} holds objects other than tensors and plain data and will "
            f"not be loaded ({first_line(e)}); re-save it with {short}") from e
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError) as e:
        raise CheckpointError(
            f"cannot read {what} {str(path)!r}: it is truncated or corrupt "
            f"({first_line(e)}); copy or save it again") from e


def _check_torch_archive(path: Path, what: str, saver: str) -> None:
    """Refuse a .pt whose zip could cost more to read than its size: torch.save stores every
    member uncompressed, so a compressed member (a zip bomb) or an oversized pickle is crafted."""
    not_torch = CheckpointError(
        f"{str(path)!r} is not a PyTorch {what} (not a torch.save zip archive); it may be "
        f"truncated, of another format, or not a {what} at all")
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
                f"{what} {str(path)!r}: archive member {show(m.filename)} is compressed "
                f"({m.compress_size:,} bytes that unpack to {m.file_size:,}); torch.save never "
                f"compresses, so the file was repacked or crafted: save it again with {saver}")
        if m.filename.endswith("data.pkl") and m.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(
                f"{what} {str(path)!r}: its pickled structure is {m.file_size:,} bytes, more "
                f"than the limit of {MAX_PICKLE_BYTES:,} (MAX_PICKLE_BYTES); a {what}'s "
                "weights are stored apart from it, so this one holds something else: save it "
                f"again with {saver}")


def torch_save_bounded(payload: dict[str, Any], tmp: str, path: Path, parts: str) -> None:
    """`torch.save(payload)` into `tmp`, refused if `read_torch_file` would refuse what it wrote:
    its pickle (`parts`, all but the weights) is bounded there. Saved through a buffer, so the
    archive's inner folder is named "archive", not after the temporary file: the same payload
    gives the same bytes."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    with zipfile.ZipFile(buf) as zf:
        n = sum(m.file_size for m in zf.infolist() if m.filename.endswith("data.pkl"))
    if n > MAX_PICKLE_BYTES:
        raise CheckpointError(
            f"cannot save {str(path)!r}: its {parts} pickle to {n:,} bytes, more than a model "
            f"file may hold ({MAX_PICKLE_BYTES:,}, MAX_PICKLE_BYTES); keep large data out of "
            "them")
    with open(tmp, "wb") as f:
        f.write(buf.getbuffer())


def write_atomically(path: Path, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """`xcompile.outdir.atomic_write_via`, with file-system errors as CheckpointErrors."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_via(path, write, suffix=suffix)
    except OSError as e:
        raise CheckpointError(f"cannot write {str(path)!r}: {os_reason(e)}; check that its "
                              "folder can be created and written to") from e


def is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def os_reason(e: OSError) -> str:
    return e.strerror or first_line(e)
