"""Build manifests: what a build used and made, by hash, and how to rebuild it exactly.

`build_manifest` records the inputs (checkpoint, robot TOML, URDF, hardware TOML) with their
sha256, the outputs' sha256, library versions, the resolved plan, seed, profile and episodes.
`rebuild_from_manifest` reads one back for `xcompile build --from`: a manifest is untrusted, so it
may name only files inside its own folder, xcompile's built-in targets, or files given on the
command line, each checked by hash before it is read.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xcompile import __version__
from xcompile.artifact import Artifact, file_sha256
from xcompile.errors import PlanError
from xcompile.manager.plan import validate_plan
from xcompile.manager.settings import (
    MAX_EPISODES,
    MAX_SEED,
    BuildSettings,
    PlanStep,
    make_config,
)
from xcompile.passes.base import all_passes
from xcompile.targets import HardwareTarget, RobotTarget, load_hardware, load_robot
from xcompile.targets.loader import HARDWARE_DIR, ROBOTS_DIR

VERSIONED = ("torch", "onnx", "onnxruntime", "pybullet", "numpy", "pydantic")


def lib_version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def build_manifest(out: Path, inp: Artifact, robot: RobotTarget, hardware: HardwareTarget,
                   plan: Sequence[PlanStep], *, seed: int, profile: str,
                   episodes: int) -> dict[str, Any]:
    urdf = robot.urdf_path()
    inputs = {"checkpoint": {"path": str(inp.path.resolve()), "sha256": inp.sha256, "format": inp.format}}
    if robot.source and Path(robot.source).is_file():
        inputs["robot_toml"] = {"path": robot.source, "sha256": file_sha256(robot.source)}
    if urdf is not None and urdf.is_file():
        inputs["urdf"] = {"path": str(urdf), "sha256": file_sha256(urdf)}
    if hardware.source and Path(hardware.source).is_file():
        inputs["hardware_toml"] = {"path": hardware.source,
                                   "sha256": file_sha256(hardware.source)}
    outputs = {p.name: file_sha256(p) for p in sorted(out.iterdir())
               if p.is_file() and p.name != "manifest.json"}
    return {
        "xcompile_version": __version__,
        "robot": robot.name,
        "hardware": hardware.name,
        "inputs": inputs,
        "outputs": outputs,
        "versions": {"xcompile": __version__, "python": sys.version.split()[0],
                     **{d: lib_version(d) for d in VERSIONED}},
        "platform": platform.platform(),
        "plan": [s.to_json() for s in plan],
        "seed": seed,
        "profile": profile,
        "episodes": episodes,
    }


@dataclass(frozen=True)
class Rebuild:
    """What `xcompile build --from manifest.json` runs, checked against the manifest's hashes."""

    checkpoint: Path
    robot: RobotTarget
    hardware: HardwareTarget
    settings: BuildSettings
    expected_outputs: dict[str, str]        # file name -> sha256 recorded by the original build
    notes: list[str]


_SHA256 = r"^[0-9a-f]{64}$"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _ManifestFile(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    path: str = Field(max_length=4096)
    sha256: str = Field(pattern=_SHA256)


class _ManifestStep(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(max_length=64)
    version: int
    config: dict[str, Any] = Field(default_factory=dict)


class _Manifest(BaseModel):
    """The part of manifest.json a rebuild reads; anything else in it is ignored."""

    model_config = ConfigDict(extra="allow", strict=True)
    robot: str = Field(pattern=_NAME)
    hardware: str = Field(pattern=_NAME)
    inputs: dict[str, _ManifestFile]
    outputs: dict[str, Annotated[str, Field(pattern=_SHA256)]]
    plan: list[_ManifestStep] = Field(min_length=1, max_length=64)
    seed: int = Field(ge=0, le=MAX_SEED)
    profile: Literal["fast", "default", "thorough"]
    episodes: int = Field(ge=1, le=MAX_EPISODES)
    versions: dict[str, str | None] = Field(default_factory=dict)
    xcompile_version: str = "?"


def read_manifest(path: str | Path) -> _Manifest:
    """Parse and validate a manifest.json; every defect is one PlanError naming the field."""
    path = Path(path)
    try:
        if path.is_dir():
            raise PlanError(f"{path} is a folder; give the manifest.json inside it")
        if path.stat().st_size > 10_000_000:
            raise PlanError(f"{path} is over 10 MB: not an xcompile build manifest")
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"manifest {str(path)!r} does not exist; give the manifest.json of a "
                        "finished build (in its --out folder)") from None
    except (OSError, ValueError) as e:
        raise PlanError(f"{path} is not a readable JSON manifest ({e})") from None
    if not isinstance(doc, dict):
        raise PlanError(f"{path} is not an xcompile build manifest (not a JSON object)")
    try:
        return _Manifest.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "(top level)"
        raise PlanError(f"{path} is not a valid xcompile build manifest: {loc}: {first['msg']}"
                        f" ({e.error_count()} problem(s))") from None


def rebuild_from_manifest(manifest_path: str | Path, checkpoint: str | Path | None = None,
                          robot_toml: str | Path | None = None,
                          hardware_toml: str | Path | None = None) -> Rebuild:
    """Read a build's manifest and check that its inputs are still the same files.

    A manifest is untrusted: it may name only files inside its own folder, xcompile's built-in
    targets (found by name), or files given here (the checkpoint, `robot_toml`, `hardware_toml`:
    the command line). Each is checked by hash before it is read. Every pass must be at the
    recorded version; anything else is refused, since the rebuild would silently be another
    build. Differing library versions are allowed and noted.
    """
    path = Path(manifest_path)
    doc = read_manifest(path)
    home = path.resolve().parent
    inputs = doc.inputs

    def same_file(kind: str, given: Path, recorded: _ManifestFile) -> None:
        if not given.is_file():
            raise PlanError(f"the {kind} of that build, {str(given)!r}, does not exist here; "
                            + ("give the checkpoint's new path as CHECKPOINT" if kind ==
                               "checkpoint" else "restore it to rebuild"))
        if file_sha256(given) != recorded.sha256:
            raise PlanError(f"the {kind} {str(given)!r} has changed since the build (the "
                            f"manifest records sha256 {recorded.sha256[:12]}); a rebuild from it "
                            "would be another build. Restore the original file, or run a new "
                            "build instead of --from.")

    def recorded_inside(kind: str, rec: _ManifestFile, flag: str) -> Path:
        p = Path(rec.path)
        p = (p if p.is_absolute() else home / p).resolve()
        if not p.is_relative_to(home):
            raise PlanError(f"the manifest's {kind} lies outside its folder ({rec.path}); "
                            f"xcompile reads only files a manifest's folder holds or that you "
                            f"name: give it with {flag}")
        return p

    if "checkpoint" not in inputs:
        raise PlanError(f"{path} records no checkpoint; it cannot be rebuilt")
    ckpt = (Path(checkpoint) if checkpoint is not None else
            recorded_inside("checkpoint", inputs["checkpoint"], "CHECKPOINT (e.g. xcompile "
                            f"build {inputs['checkpoint'].path} --from {path})"))
    same_file("checkpoint", ckpt, inputs["checkpoint"])

    def locate(kind: str, key: str, builtin_dir: Path, name: str, given: str | Path | None,
               flag: str) -> Path:
        rec = inputs.get(key)
        if rec is None:
            raise PlanError(f"{path} records no {kind} file; it cannot be rebuilt")
        if given is not None:
            p = Path(given)
        elif (builtin_dir / f"{name}.toml").is_file() and \
                file_sha256(builtin_dir / f"{name}.toml") == rec.sha256:
            p = builtin_dir / f"{name}.toml"    # a built-in target, found by name
        else:
            p = recorded_inside(kind, rec, f"{flag} PATH")
        same_file(kind, p, rec)
        return p

    robot = load_robot(locate("robot TOML", "robot_toml", ROBOTS_DIR, doc.robot, robot_toml,
                              "--target"))
    if robot.name != doc.robot:
        raise PlanError(f"the robot TOML describes '{robot.name}', the manifest '{doc.robot}'")
    if "urdf" in inputs:
        same_file("URDF", robot.urdf_path(), inputs["urdf"])
    hw = load_hardware(locate("hardware TOML", "hardware_toml", HARDWARE_DIR, doc.hardware,
                              hardware_toml, "--hardware"))

    plan = []
    known = all_passes()
    for step in doc.plan:
        if step.name not in known:
            raise PlanError(f"the manifest's plan names pass '{step.name}', which this xcompile "
                            f"does not have (known: {', '.join(known)})")
        cls = known[step.name]
        if cls.version != step.version:
            raise PlanError(f"pass '{step.name}' is version {cls.version} in this xcompile; "
                            f"the manifest was built with version {step.version}. Use "
                            f"xcompile {doc.xcompile_version} to rebuild it.")
        plan.append(PlanStep(step.name, make_config(step.name, step.config)))
    validate_plan(plan)
    settings = BuildSettings(plan=plan, seed=doc.seed, profile=doc.profile,
                             episodes=doc.episodes, sources={"passes": "manifest"})
    notes = []
    here = {"xcompile": __version__, **{d: lib_version(d) for d in VERSIONED}}
    for lib, v in here.items():
        was = doc.versions.get(lib)
        if was is not None and v is not None and was != v:
            notes.append(f"{lib} is {v} here, {was} in the original build: outputs may differ")
    return Rebuild(ckpt, robot, hw, settings, dict(doc.outputs), notes)


def compare_outputs(out_dir: Path, expected: Mapping[str, str],
                    names: Sequence[str] = ("policy.onnx", "policy.plan")) -> dict[str, bool]:
    """{file: identical?} for the compiled policy files the original build recorded."""
    return {n: file_sha256(out_dir / n) == expected[n] for n in names
            if n in expected and (out_dir / n).is_file()}
