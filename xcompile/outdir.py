"""Output folders: xcompile replaces only what it wrote, and never leaves half a folder behind.

A build's output folder is assembled in a temporary folder beside it and swapped in when complete.
Before anything is replaced, `check_replaceable` decides whether the folder is xcompile's to
replace:

- it does not exist, or is an empty folder: write it;
- it holds an xcompile manifest (`manifest.json` with xcompile's keys) and nothing but the files
  that manifest lists: a previous build, replaced;
- it holds a previous build plus files the manifest does not list: refused, naming them, unless
  the user passes `--force` (then the folder, extra files included, is replaced);
- anything else (a file, a symbolic link, a folder xcompile did not write, the current folder or
  one of its parents): refused, `--force` or not.

The same rule guards reproducer folders (their marker is `plan.json` + `artifact.json`). Temporary
folders carry the writer's pid in their name (`.NAME.new-PID-XXXX`), so that a later run can
remove the ones a killed run left behind, and only those.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from xcompile.errors import XCompileError

MANIFEST = "manifest.json"
REPRO_MARKERS = ("plan.json", "artifact.json")       # a reproducer folder holds these...
REPRO_NAMES = (*REPRO_MARKERS, "build.toml", "README.md", "input")   # ...and only these
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                   errno.EFBIG}


class OutputError(XCompileError):
    """An output path cannot be written, or is not xcompile's to replace."""


def storage_error(e: OSError, what: str) -> OutputError:
    """An OSError from the file system (full disk, read-only, no permission) as a user error."""
    why = e.strerror or str(e)
    hint = {errno.ENOSPC: "free some space or write elsewhere",
            errno.EDQUOT: "free some space or write elsewhere",
            errno.EROFS: "the file system is read-only: write elsewhere"}.get(
        e.errno or 0, "check its permissions or write elsewhere")
    return OutputError(f"could not write {what}: {why}; {hint}")


def is_storage_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while cleaning up, so a second Ctrl-C cannot cut a cleanup short.

    A signal that arrives meanwhile is re-delivered to its previous handler when the block ends.
    (Python-level handlers, not a thread signal mask: the library thread pools of torch and
    onnxruntime would receive a masked signal in the main thread's place.)
    """
    pending: list[int] = []

    def defer(signum: int, frame: object) -> None:
        pending.append(signum)

    try:
        old = {s: signal.signal(s, defer) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:              # not the main thread: signals go to the main thread anyway
        yield
        return
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):
            handler = old[s]
            if callable(handler):
                handler(s, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(s)


def remove_tree(path: Path) -> None:
    """rmtree that a second Ctrl-C cannot interrupt half-way."""
    with signals_held():
        shutil.rmtree(path, ignore_errors=True)


def _xcompile_manifest(folder: Path) -> dict | None:
    """The folder's manifest when it is one xcompile wrote, else None."""
    path = folder / MANIFEST
    try:
        if not path.is_file() or path.stat().st_size > 10_000_000:
            return None
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (isinstance(doc, dict) and isinstance(doc.get("xcompile_version"), str)
            and isinstance(doc.get("outputs"), dict)):
        return doc
    return None


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def folder_entries(out: Path, flag: str, example: str) -> list[Path]:
    """What the would-be output folder `out` holds ([] when it is missing or empty), refusing a
    symbolic link, the current folder or one of its parents, and a file."""
    out = Path(os.path.abspath(out))
    if out.is_symlink():
        raise OutputError(f"{flag} {out} is a symbolic link; give the folder it points to, or "
                          "another path")
    if _inside(Path(os.getcwd()).resolve(), out.resolve()):
        raise OutputError(f"{flag} {out} is the current folder or one of its parents; xcompile "
                          "replaces its output folder as a whole, so give a new sub-folder, "
                          f"e.g. {example}")
    if not out.exists():
        return []
    if not out.is_dir():
        raise OutputError(f"{flag} {out} exists and is not a folder; give another path")
    try:
        return list(out.iterdir())
    except OSError as e:
        raise storage_error(e, f"{out}") from None


def check_replaceable(out: Path, *, force: bool = False, markers: tuple[str, ...] = (),
                      allowed: tuple[str, ...] = (), flag: str = "--out") -> None:
    """Raise OutputError unless `out` may be (re)written by xcompile; see the module docstring.

    `markers`: for folders other than build outputs (reproducers), the names whose presence
    marks the folder as xcompile's; such a folder may hold only the names in `allowed`.
    """
    out = Path(os.path.abspath(out))
    entries = folder_entries(out, flag, "build/<robot>")
    if not entries:
        return
    names = {p.name for p in entries}
    if markers:
        if all(m in names for m in markers) and names <= set(allowed) and \
                not any(p.is_symlink() for p in entries):
            return
        raise OutputError(f"{out} exists and was not written by xcompile (it is not a "
                          "reproducer folder); move it away or remove it yourself")
    manifest = _xcompile_manifest(out)
    if manifest is None:
        raise OutputError(
            f"{flag} {out} exists and does not hold an xcompile build (no xcompile "
            f"{MANIFEST}); xcompile will not replace a folder it did not write. Give another "
            f"{flag}, or empty that folder yourself")
    listed = set(manifest["outputs"]) | {MANIFEST}
    refuse_unlisted(out, [p for p in entries if p.name not in listed or not p.is_file()
                          or p.is_symlink()], "a previous build", force, flag)


def refuse_unlisted(out: Path, extra: list[Path], what: str, force: bool, flag: str) -> None:
    """Refuse to replace `out` (holding `what`) when it also holds `extra`, unless `force`."""
    if not extra or force:
        return
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in extra)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise OutputError(
        f"{flag} {out} holds {what} and also files it did not write ({shown}); replacing the "
        f"folder would delete them. Move them away, give another {flag}, or pass --force to "
        "replace the folder with everything in it")


def check_writable_parent(out: Path, flag: str = "--out") -> None:
    """The nearest existing ancestor of `out` must be a writable folder (checked before work)."""
    p = Path(os.path.abspath(out)).parent
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise OutputError(f"{flag} {out}: {p} is not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {out}: cannot create it, {p} is not writable; give another "
                          f"{flag}")


def check_file_target(path: Path, flag: str) -> None:
    """A single output file (a GIF): its folder must exist and be writable; not a folder."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise OutputError(f"{flag} {path}: the folder {path.parent} does not exist; create it "
                          "first or give another path")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: the folder {path.parent} is not writable")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def temp_dir(parent: Path, prefix: str) -> Path:
    """A temporary folder `PREFIX-PID-XXXX` in `parent`; `clean_orphans` knows its owner by PID."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=parent))


def clean_orphans(parent: Path, prefix: str) -> list[Path]:
    """Remove the temporary folders and files in `parent` that start with `prefix` and that a
    process no longer running made (`temp_dir` and `atomic_write` names: `...-PID-XXXXXXXX`)."""
    pattern = re.compile(re.escape(prefix) + r".*?-(\d+)-[a-z0-9_]{8}$")
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if m is None or _pid_alive(int(m.group(1))) or p.is_symlink():
            continue
        if p.is_dir():
            remove_tree(p)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


def write_folder(out: Path, write: Callable[[Path], None], *, force: bool = False,
                 check: Callable[[Path], None] | None = None, what: str = "the output folder"
                 ) -> None:
    """Build the folder `out` in a temporary folder beside it, then swap it in.

    The old folder is replaced only when `check(out)` allows it (default: `check_replaceable`;
    checked before and again here, since the build took a while); it is renamed aside before the
    new one moves in, then removed.
    """
    out = Path(os.path.abspath(out))
    if check is None:
        def check(folder: Path) -> None:
            check_replaceable(folder, force=force)
    check(out)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_orphans(parent, f".{out.name}.new")
        clean_orphans(parent, f".{out.name}.old")
        tmp = temp_dir(parent, f".{out.name}.new")
    except OSError as e:
        raise storage_error(e, f"{what} {out}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)       # mkdtemp makes it private; an output folder is not
    try:
        write(tmp)
    except OSError as e:
        remove_tree(tmp)
        if is_storage_error(e):
            raise storage_error(e, f"{what} {out} (the previous one, if any, is "
                                   "intact)") from None
        raise
    except BaseException:
        remove_tree(tmp)
        raise
    with signals_held():
        try:
            check(out)
        except OutputError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if out.exists():
            old = temp_dir(parent, f".{out.name}.old")
            os.rmdir(old)
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def replace_marked_folder(folder: Path, markers: tuple[str, ...], allowed: tuple[str, ...]
                          ) -> None:
    """Remove `folder` if it is an earlier xcompile folder of this kind (see `markers`)."""
    check_replaceable(folder, markers=markers, allowed=allowed, flag="folder")
    if folder.exists():
        remove_tree(folder)


def atomic_write(path: Path, data: bytes | str, mode: int | None = None) -> None:
    """Write a file via a temporary file in the same folder and a rename."""
    raw = data.encode() if isinstance(data, str) else data

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(raw)

    atomic_write_via(Path(path), write, mode=mode)


def atomic_write_via(path: Path, write: Callable[[str], None], suffix: str = "",
                     mode: int | None = None) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place; on any
    failure (Ctrl-C included) `path` stays as it was and the temporary file is removed. The file
    gets `mode`, or the usual permissions for a new file (mkstemp alone makes it private)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
