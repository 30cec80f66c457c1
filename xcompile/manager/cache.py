"""The pass cache and the measurement cache: content-addressed, signed, never invalidated.

A pass result is stored under `cache_dir/<key>/`, where key = sha256(input artifact id, pass name,
pass version, the code the pass runs, config, robot TOML + URDF hashes, hardware, seed, profile).
"The code the pass runs" is the sha256 of the pass's module and of every module of its package
(xcompile) that it imports, directly or not, read from the import statements: an edited pass or an
edited helper it uses (the simulator, the evaluator) never reuses an entry made by the old code.
A pass runs in a temporary folder in `cache_dir/tmp/` that is renamed into place when it is done;
the entry's `result.json` (artifact, summary, shipped files, checks) is signed
(`xcompile.integrity`), so an edited or foreign entry is discarded and the pass runs again.

Measurements (size, latency, score) are cached per artifact id and measurement protocol
(`xcompile.measure.MEASURE_VERSION`: its episodes and fields) in `cache_dir/measure/`, signed and
bound to the artifact they describe. Temporary work of killed runs is removed by the next run.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import platform
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from xcompile import integrity
from xcompile.artifact import Artifact, file_sha256
from xcompile.manager.settings import PlanStep
from xcompile.measure import MEASURE_VERSION
from xcompile.outdir import (
    OutputError,
    atomic_write,
    clean_orphans,
    is_storage_error,
    remove_tree,
    temp_dir,
)
from xcompile.passes.base import PassResult
from xcompile.targets import HardwareTarget, RobotTarget

CACHE_LAYOUT = 3            # bump when the entry layout changes (3: one signed result.json)
RESULT_FILE = "result.json"

Measure = Callable[..., dict[str, Any]]


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def target_fingerprint(robot: RobotTarget, hardware: HardwareTarget) -> dict[str, str]:
    fp = {"robot": robot.name, "hardware": hardware.name,
          "robot_toml": _model_hash(robot), "hardware_toml": _model_hash(hardware)}
    urdf = robot.urdf_path()
    if urdf is not None:           # an airframe has no URDF: its TOML says all
        fp["urdf"] = file_sha256(urdf) if urdf.is_file() else robot.urdf
    return fp


def _model_hash(model: Any) -> str:
    """sha256 of what a robot or hardware target says, not of the file it came from: a target
    changed in code after loading (a test's shorter episodes, a bench's variant) keeps its
    `source` but is another target. The path itself is left out, so keys do not depend on where
    the TOML lies."""
    return _sha(model.model_dump(exclude={"source"}))


# --------------------------------------------------------------------------------------------
# the code a pass runs


def _imported(module: str, origin: Path, is_package: bool) -> set[str]:
    """Names of the modules (and, for `from m import x`, of m.x) that `origin` imports."""
    tree = ast.parse(origin.read_text(), filename=str(origin))
    base = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            parent = node.module or ""
            if node.level:                 # relative: from .x import y
                anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                parent = f"{anchor}.{parent}" if parent else anchor
            found.add(parent)
            found.update(f"{parent}.{a.name}" for a in node.names)
    return found


@functools.cache
def module_closure(module: str) -> tuple[tuple[str, str], ...]:
    """(name, path) of `module` and every module of its own top-level package it imports,
    directly or through others, sorted by name."""
    top = module.split(".")[0]
    seen: dict[str, str] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError, AttributeError):
            spec = None                   # `from m import f`: m.f is a function, not a module
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        seen[name] = spec.origin
        for n in _imported(name, Path(spec.origin), spec.submodule_search_locations is not None):
            if n.split(".")[0] == top and n not in seen:
                todo.append(n)
    return tuple(sorted(seen.items()))


def code_sha256(cls: type) -> str:
    """sha256 of the source of the pass class's module and of what it imports from its package."""
    module = cls.__module__
    if module not in sys.modules:
        return _sha(module)
    return _sha([(name, file_sha256(path)) for name, path in module_closure(module)])


def cache_key(inp: Artifact, step: PlanStep, fingerprint: Mapping[str, str], seed: int,
              profile: str) -> str:
    cls = step.pass_cls
    return _sha({"layout": CACHE_LAYOUT, "input": inp.id, "pass": step.name,
                 "version": cls.version, "code": code_sha256(cls),
                 "config": step.config.model_dump(mode="json"),
                 # A field the user set to its class default differs from one left unset: the
                 # build profile fills only unset fields (`with_profile_defaults`).
                 "set": sorted(step.config.model_fields_set),
                 "target": dict(fingerprint), "seed": seed, "profile": profile})


# --------------------------------------------------------------------------------------------
# entries


def prepare_cache(cache_dir: Path) -> None:
    """Make the cache's folders (or say why not) and remove what killed runs left in tmp/."""
    try:
        (cache_dir / "tmp").mkdir(parents=True, exist_ok=True)
        (cache_dir / "measure").mkdir(exist_ok=True)
        probe = temp_dir(cache_dir / "tmp", "probe")
        os.rmdir(probe)
    except OSError as e:
        raise OutputError(f"the cache folder {cache_dir} cannot be written ({e.strerror}); give "
                          "a writable --cache-dir") from None
    clean_orphans(cache_dir / "tmp", "")
    clean_orphans(cache_dir / "measure", "")


def _inside(entry: Path, rel: str) -> Path:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise ValueError(f"{rel!r} leaves the entry")
    return entry / p


def load_entry(entry: Path, notes: list[str] | None = None
               ) -> tuple[PassResult, dict[str, Any]] | None:
    """A committed entry's result and checks, or None when there is none or it does not verify
    (the pass then runs again)."""
    if not entry.is_dir():
        return None
    try:
        doc = integrity.verify(json.loads((entry / RESULT_FILE).read_text()))
        if doc is None:
            raise ValueError("its signature does not verify")
        art_doc = dict(doc["artifact"])
        art_doc["path"] = str(_inside(entry, art_doc["path"]))
        art = Artifact.from_json(art_doc)
        if (not art.path.is_file() or art.path.is_symlink()
                or file_sha256(art.path) != art.sha256):
            raise ValueError("its artifact file changed")
        files = tuple(doc["files"])
        if not all(_inside(entry, f).is_file() for f in files):
            raise ValueError("a file it ships is missing")
        return PassResult(art, dict(doc["summary"]), files), dict(doc["checks"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        if notes is not None:
            notes.append(f"cache entry {entry.name[:12]} was discarded and its pass run again "
                         f"({e})")
        return None


def commit_entry(workdir: Path, entry: Path, result: PassResult, checks: dict[str, Any]
                 ) -> PassResult:
    """Write the entry's signed result.json and rename the workdir into place; return the result
    as it lies there."""
    rel = result.artifact.path.resolve().relative_to(workdir.resolve())
    art_doc = {**result.artifact.to_json(), "path": str(rel)}
    doc = {"artifact": art_doc, "summary": dict(result.summary), "files": list(result.files),
           "checks": checks}
    (workdir / RESULT_FILE).write_text(json.dumps(integrity.sign(doc), indent=2, default=str))
    existing = load_entry(entry) if entry.exists() else None
    if existing is not None:
        # A valid entry for the same key (the same input, pass, code and settings), committed
        # by an earlier run or by another build running now, which may be reading it: keep it.
        remove_tree(workdir)
        return existing[0]
    if entry.exists():                  # an entry that does not verify: replace it
        old = temp_dir(entry.parent / "tmp", f"old-{entry.name[:12]}")
        os.rmdir(old)
        os.rename(entry, old)
        remove_tree(old)
    try:
        os.rename(workdir, entry)
    except OSError:                     # another build committed the same key first: use theirs
        remove_tree(workdir)
        loaded = load_entry(entry)
        if loaded is None:
            raise
        return loaded[0]
    return dataclasses.replace(result, artifact=dataclasses.replace(result.artifact,
                                                                    path=entry / rel))


def measure_cached(measure: Measure, art: Artifact, robot: RobotTarget, hardware: HardwareTarget,
                   episodes: int, seed: int, latency_n: int, cache_dir: Path,
                   use_cache: bool, notes: list[str] | None = None) -> dict[str, Any]:
    # Keyed by artifact id: artifacts are immutable, so there is nothing to invalidate. The host
    # is in the key because latency belongs to the machine it was measured on. The record names
    # the artifact it describes: an edited number, or a record moved to another key, is
    # discarded and measured again.
    key = _sha({"artifact": art.id, "robot": robot.name, "hardware": hardware.name,
                "episodes": episodes, "seed": seed, "latency_n": latency_n,
                "host": platform.node(), "protocol": MEASURE_VERSION})
    path = cache_dir / "measure" / f"{key}.json"
    if use_cache and path.is_file():
        try:
            rec = integrity.verify(json.loads(path.read_text()))
            if rec is None or rec.get("key") != key or rec.get("artifact") != art.id \
                    or not isinstance(rec.get("measurements"), dict):
                raise ValueError("its signature or its artifact does not match")
            return dict(rec["measurements"])
        except (OSError, ValueError) as e:
            if notes is not None:
                notes.append(f"cached measurement {key[:12]} of stage artifact {art.id} was "
                             f"discarded and measured again ({e})")
    m = dict(measure(art, robot, episodes=episodes, seed=seed, latency_n=latency_n))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(integrity.sign(
            {"key": key, "artifact": art.id, "measurements": m}), default=str))
    except OSError as e:
        if not is_storage_error(e):
            raise
        if notes is not None:
            notes.append(f"could not cache a measurement in {path.parent} ({e.strerror})")
    return m
