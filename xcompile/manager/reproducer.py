"""Reproducers: a failing pass leaves its input artifact and the rest of the plan, to re-run.

`write_reproducer` fills a folder (`OUT.repro` beside the output folder; another name when that
one holds something xcompile did not write) with the failing pass's input artifact, the remaining
plan as a build file, and a README with the command that re-runs it. `load_reproducer` reads one
back: a reproducer is untrusted, so it may refer only to its own files, checked by hash.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xcompile.artifact import FORMATS, Artifact, file_sha256
from xcompile.errors import PlanError
from xcompile.manager.plan import INPUT_FORMAT
from xcompile.manager.settings import PlanStep
from xcompile.outdir import (
    REPRO_MARKERS,
    REPRO_NAMES,
    OutputError,
    check_replaceable,
    replace_marked_folder,
)
from xcompile.targets import HardwareTarget, RobotTarget
from xcompile.targets.loader import HARDWARE_DIR, ROBOTS_DIR


def reproducer_dir(out_dir: Path) -> Path:
    """`OUT.repro` beside the output folder; `OUT.repro-2`, … when that name holds something
    that is not an earlier reproducer (xcompile replaces only its own folders)."""
    out_dir = Path(os.path.abspath(out_dir))
    for n in range(1, 100):
        repro = out_dir.parent / (f"{out_dir.name}.repro" + (f"-{n}" if n > 1 else ""))
        try:
            check_replaceable(repro, markers=REPRO_MARKERS, allowed=REPRO_NAMES,
                              flag="reproducer folder")
            return repro
        except OutputError:
            continue
    raise OutputError(f"no free reproducer folder name beside {out_dir}")


def write_reproducer(repro: Path, error: BaseException, step: PlanStep,
                     remaining: Sequence[PlanStep], inp: Artifact, robot: RobotTarget,
                     hw: HardwareTarget, seed: int, profile: str) -> Path:
    """Folder with the failing pass's input artifact and the rest of the plan, and how to re-run."""
    replace_marked_folder(repro, REPRO_MARKERS, REPRO_NAMES)
    (repro / "input").mkdir(parents=True)
    # A cache entry's artifact may have sidecar files (ONNX beside a .plan): copy its folder.
    src_dir = inp.path.parent
    if inp.format != INPUT_FORMAT and (src_dir / "artifact.json").is_file():
        for f in src_dir.iterdir():
            if f.is_file() and f.name not in ("artifact.json", "measurements.json"):
                shutil.copy2(f, repro / "input" / f.name)
    else:
        shutil.copy2(inp.path, repro / "input" / inp.path.name)
    art_doc = inp.to_json()
    art_doc["path"] = f"input/{inp.path.name}"
    (repro / "artifact.json").write_text(json.dumps(art_doc, indent=2, default=str))
    builtin = robot.source and Path(robot.source).parent == ROBOTS_DIR
    target = robot.name if builtin or not robot.source else robot.source
    hw_arg = hw.name if Path(hw.source or "").parent == HARDWARE_DIR else (hw.source or hw.name)
    repro = repro.resolve()
    plan_doc = {"failed_pass": step.name, "error": f"{type(error).__name__}: {error}",
                "robot": robot.name, "robot_toml": target, "hardware": hw.name,
                "hardware_toml": hw.source, "seed": seed, "profile": profile,
                "input": art_doc, "plan": [s.to_json() for s in remaining]}
    (repro / "plan.json").write_text(json.dumps(plan_doc, indent=2, default=str))
    lines = [f'passes = {json.dumps([s.name for s in remaining])}', f"seed = {seed}",
             f'profile = "{profile}"']
    for s in remaining:
        opts = s.config.model_dump(mode="json")
        if opts:
            lines.append(f"\n[pass.{s.name}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in opts.items() if v is not None]
    (repro / "build.toml").write_text("\n".join(lines) + "\n")
    cmd = (f"xcompile build {repro} --target {target} --hardware {hw_arg} "
           f"--config {repro / 'build.toml'}")
    (repro / "README.md").write_text(
        f"# Reproducer: pass `{step.name}` failed\n\n"
        f"{type(error).__name__}: {error}\n\n"
        f"Re-run the failing pass and the rest of the plan on its input artifact:\n\n"
        f"    {cmd}\n")
    return repro


def load_reproducer(repro: str | Path) -> tuple[Artifact, dict[str, Any]]:
    """The input artifact and plan document of a reproducer folder.

    A reproducer is untrusted: its artifact must be a file inside the folder, and must hash to
    the sha256 its artifact.json records before anything reads it.
    """
    repro = Path(repro)
    try:
        art_doc = json.loads((repro / "artifact.json").read_text())
        plan_doc = json.loads((repro / "plan.json").read_text())
    except (OSError, ValueError) as e:
        raise PlanError(f"{repro} is not a reproducer folder (artifact.json, plan.json): {e}") \
            from None
    try:
        rel, fmt, robot = Path(art_doc["path"]), art_doc["format"], art_doc["robot"]
        sha, meta = art_doc["sha256"], art_doc.get("meta") or {}
        lineage = tuple(art_doc.get("lineage") or ())
        if not (isinstance(fmt, str) and isinstance(robot, str) and isinstance(sha, str)
                and isinstance(meta, dict) and isinstance(plan_doc, dict)
                and all(isinstance(x, str) for x in lineage)):
            raise TypeError("a field has the wrong type")
    except (KeyError, TypeError) as e:
        raise PlanError(f"{repro / 'artifact.json'} is not a reproducer's artifact record ({e})") \
            from None
    if fmt not in FORMATS:
        raise PlanError(f"{repro / 'artifact.json'}: unknown format {fmt!r}")
    root = repro.resolve()
    path = (root / rel).resolve()
    if rel.is_absolute() or not path.is_relative_to(root) or not path.is_file():
        raise PlanError(f"{repro / 'artifact.json'} names {str(rel)!r}, which is not a file inside "
                        "the reproducer folder; a reproducer may only refer to its own files")
    if file_sha256(path) != sha:
        raise PlanError(f"{path} does not match the sha256 its artifact.json records; the "
                        "reproducer was changed since it was written")
    return Artifact(fmt, path, robot, dict(meta), lineage, sha), plan_doc
