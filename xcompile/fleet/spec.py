"""What a fleet builds: its targets (`--target a,b,c` or a fleet TOML) and, resolved before any
work, one `FleetJob` per target: plain data a worker can run (paths, names, the plan as JSON).

A fleet TOML holds `targets = ["a1", "spot"]` and optional `[target.NAME]` tables of `hardware`,
`profile`, `episodes` and `seed`, which win over the command line's for that target. Robot TOML
paths in it are relative to its own folder. Errors are one line naming the file and the field.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xcompile.build import prepare
from xcompile.errors import PlanError, XCompileError
from xcompile.executors.pools import TaskError
from xcompile.manager.settings import MAX_EPISODES, PROFILES
from xcompile.report import Gates
from xcompile.seeds import MAX_SEED
from xcompile.targets.loader import tomllib

MAX_TARGETS = 1000
MAX_FLEET_BYTES = 1_000_000
TARGET_KEYS = ("hardware", "profile", "episodes", "seed")


@dataclass(frozen=True)
class FleetTarget:
    """One target as the user wrote it (`target`), where to load it from, and its own settings."""

    target: str
    load: str
    hardware: str | None = None
    profile: str | None = None
    episodes: int | None = None
    seed: int | None = None


def parse_targets(text: str) -> list[FleetTarget]:
    """`--target a1,spot` -> two targets (names, or robot TOML paths relative to this folder)."""
    names = [t.strip() for t in text.split(",")]
    if any(not n for n in names):
        raise XCompileError(f"--target {text!r}: an empty name between commas; give names "
                            "separated by commas, e.g. --target a1,spot,panda")
    return _unique([FleetTarget(n, n) for n in names], "--target")


def _unique(targets: list[FleetTarget], where: str) -> list[FleetTarget]:
    seen = [t.target for t in targets]
    dup = sorted({t for t in seen if seen.count(t) > 1})
    if dup:
        raise XCompileError(f"{where}: target {dup[0]!r} is listed more than once")
    if len(targets) > MAX_TARGETS:
        raise XCompileError(f"{where}: {len(targets)} targets; at most {MAX_TARGETS}")
    return targets


def read_fleet_file(path: str | os.PathLike[str]) -> list[FleetTarget]:
    """A fleet TOML: `targets = ["a1", "spot"]` and optional `[target.a1]` tables of hardware,
    profile, episodes, seed. Robot TOML paths in it are relative to its own folder."""
    path = Path(path)
    try:
        if not path.is_file():
            raise XCompileError(f"fleet file {path} does not exist (or is not a file)")
        if path.stat().st_size > MAX_FLEET_BYTES:
            raise XCompileError(f"fleet file {path} is over {MAX_FLEET_BYTES:,} bytes")
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise XCompileError(f"fleet file {path}: cannot read it ({e})") from None
    where = str(path)
    unknown = sorted(set(doc) - {"targets", "target"})
    if unknown:
        raise XCompileError(f"{where}: unknown key {unknown[0]!r}; a fleet file holds targets = "
                            "[...] and optional [target.NAME] tables")
    names = doc.get("targets")
    if not isinstance(names, list) or not names or not all(
            isinstance(n, str) and n.strip() and len(n) <= 4096 for n in names):
        raise XCompileError(f"{where}: targets: give a non-empty list of robot names or robot "
                            'TOML paths, e.g. targets = ["a1", "spot"]')
    tables = doc.get("target", {})
    if not isinstance(tables, dict):
        raise XCompileError(f"{where}: target: must be tables [target.NAME], one per target")
    for name in tables:
        if name not in names:
            raise XCompileError(f"{where}: target.{name}: {name!r} is not in targets")
    out = []
    for n in names:
        opts = tables.get(n, {})
        if not isinstance(opts, dict):
            raise XCompileError(f"{where}: target.{n}: must be a table of {', '.join(TARGET_KEYS)}")
        for k, v in opts.items():
            _check_target_key(where, n, k, v)
        is_path = n.endswith(".toml") or "/" in n
        load = str(path.parent / n) if is_path and not os.path.isabs(n) else n
        out.append(FleetTarget(n, load, **opts))
    return _unique(out, where)


def _check_target_key(where: str, name: str, key: str, v: Any) -> None:
    at = f"{where}: target.{name}.{key}"
    if key not in TARGET_KEYS:
        raise XCompileError(f"{where}: target.{name}: unknown key {key!r}; a target table may "
                            f"set {', '.join(TARGET_KEYS)}")
    if key == "hardware" and not (isinstance(v, str) and v):
        raise XCompileError(f"{at}: give a hardware name or TOML path, got {v!r}")
    if key == "profile" and v not in PROFILES:
        raise XCompileError(f"{at}: choose one of {', '.join(PROFILES)}, got {v!r}")
    limits = {"episodes": (1, MAX_EPISODES), "seed": (0, MAX_SEED)}
    if key in limits:
        lo, hi = limits[key]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise XCompileError(f"{at}: must be an integer from {lo} to {hi}, got {v!r}")


@dataclass(frozen=True)
class FleetJob:
    """One target's build as plain data: what a worker needs to run it (no modules, no closures)."""

    name: str                    # the robot's name: its folder in the fleet
    target: str                  # as the user wrote it
    checkpoint: str
    robot_toml: str
    hardware_toml: str
    plan: list[dict[str, Any]]
    seed: int
    profile: str
    episodes: int
    out_dir: str
    cache_dir: str
    use_cache: bool = True
    gates: dict[str, Any] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    rollout: bool = True
    command: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    host: str = field(default_factory=socket.gethostname)     # where the fleet was started

    def cache_on_this_host(self) -> str:
        """The pass cache to use here: the fleet's, or on another node of a cluster its own
        sub-folder `nodes/<host>` (the cache removes killed runs' temporary work by PID, which
        means something only on the host that wrote it)."""
        here = socket.gethostname()
        if here == self.host:
            return self.cache_dir
        return os.path.join(self.cache_dir, "nodes", "".join(
            c if c.isalnum() or c in "-_." else "_" for c in here)[:64] or "node")


def prepare_jobs(checkpoint: Path, targets: Sequence[FleetTarget], *, hardware: str | None,
                 config: Path | None, cli: Mapping[str, Any], cache_dir: Path,
                 use_cache: bool = True, gates: Gates | None = None,
                 required: Sequence[str] = (), rollout: bool = True,
                 ) -> tuple[list[FleetJob], list[dict[str, Any]]]:
    """Resolve every target (robot, hardware, settings) here, before any work: (jobs, rows of
    the targets that cannot be built). A plan or settings error, the same for every target, is
    raised instead."""
    if not checkpoint.is_file():
        raise XCompileError(f"checkpoint {str(checkpoint)!r} does not exist (or is not a file); "
                            "a fleet build starts from a fat checkpoint")
    jobs, failed = [], []
    for t in targets:
        layer = {**cli, **{k: getattr(t, k) for k in ("profile", "episodes", "seed")
                           if getattr(t, k) is not None}}
        try:
            req = prepare(checkpoint, t.load, t.hardware or hardware, config=config, cli=layer)
        except PlanError:
            raise
        except XCompileError as e:
            failed.append(failed_row(t.target, None, TaskError.of(e), 0.0))
            continue
        s = req.settings
        jobs.append(FleetJob(
            req.robot.name, t.target, os.path.abspath(checkpoint), req.robot.source,
            req.hardware.source, [st.to_json() for st in s.plan], s.seed, s.profile, s.episodes,
            req.robot.name, os.path.abspath(cache_dir), use_cache, asdict(gates or Gates()),
            tuple(required), rollout, list(sys.argv), list(req.notes)))
    if not jobs:                # nothing to build: say why once, write nothing
        raise XCompileError(f"no target can be built; {failed[0]['target']}: "
                            f"{failed[0]['error_detail']}")
    names = [j.name for j in jobs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise XCompileError(f"two targets are both robot {dup[0]!r}; a fleet builds each robot "
                            f"once (its folder is <out>/{dup[0]})")
    return jobs, failed


def failed_row(target: str, job: FleetJob | None, err: TaskError, wall_s: float,
               full: str | None = None) -> dict[str, Any]:
    return {"target": target, "robot": job.name if job else None, "hardware": None,
            "folder": None, "ok": False, "final": None, "policy": None, "score": None,
            "score_ci95": None, "scores": None, "bytes": None, "latency_p50_us": None,
            "build_s": round(wall_s, 2), "cached": [], "gates": [], "gates_passed": None,
            "error": str(err), "error_detail": full or err.message,
            "exit_code": err.exit_code, "notes": list(job.notes) if job else []}
