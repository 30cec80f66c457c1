"""A build from start to finish: what to build, running it, and writing its output folder.

Three kinds of build start here, and `prepare` decides which the command line asked for:

- a new build: a fat checkpoint, a robot, a hardware target and resolved settings;
- a rebuild of a recorded build (`--from manifest.json`): everything from the manifest, its inputs
  checked by hash, and the rebuilt policy compared with the recorded one (`compare_outputs`);
- a reproducer (a `*.repro` folder): the failing pass's input artifact and the rest of the plan.

`run_build` checks that the output folder is xcompile's to write (`xcompile.outdir`), runs the
plan (`xcompile.manager`), makes the report and writes every output into a temporary folder that
is swapped into place only when complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xcompile.artifact import Artifact, file_sha256
from xcompile.errors import CheckpointError, GateError, XCompileError
from xcompile.evaluate import rollout_gif
from xcompile.frontends import FOREIGN_SUFFIXES
from xcompile.frontends.graph import fat_graph_artifact, is_recurrent
from xcompile.manager.cache import Measure
from xcompile.manager.manifest import Rebuild, build_manifest, rebuild_from_manifest
from xcompile.manager.plan import INPUT_FORMAT
from xcompile.manager.reproducer import load_reproducer, reproducer_dir
from xcompile.manager.run import BuildHooks, StageRecord, run_plan
from xcompile.manager.settings import (
    DEFAULTS,
    BuildSettings,
    PlanStep,
    read_build_file,
    resolve_settings,
)
from xcompile.measure import ort_floor_us
from xcompile.outdir import MANIFEST, check_replaceable, check_writable_parent, write_folder
from xcompile.policy import load_policy
from xcompile.render import plot_stages, render_markdown
from xcompile.report import Gates, build_report, policy_file_name
from xcompile.robustness import build_policies, fault_table
from xcompile.sim.env import obs_dim
from xcompile.targets import HardwareTarget, RobotTarget, load_hardware, load_robot


@dataclass
class BuildResult:
    out_dir: Path
    report: dict[str, Any]
    stages: list[StageRecord]
    final: Artifact

    @property
    def missed_gates(self) -> list[dict[str, Any]]:
        return [g for g in self.report.get("gates", []) if not g["passed"]]

    def raise_for_gates(self) -> None:
        missed = self.missed_gates
        if missed:
            raise GateError("missed deployment gate(s): " + "; ".join(g["message"] for g in missed)
                            + f" (report in {self.out_dir})")


# --------------------------------------------------------------------------------------------
# what to build


@dataclass
class BuildRequest:
    """A build the command line asked for, resolved and checked, before anything runs."""

    inp: Artifact
    robot: RobotTarget
    hardware: HardwareTarget
    settings: BuildSettings
    rebuild: Rebuild | None = None
    notes: list[str] = field(default_factory=list)


def input_artifact(ckpt_path: str | Path, robot: RobotTarget,
                   interface: str | Path | None = None) -> Artifact:
    """The build's input: a fat checkpoint, or with `interface` a foreign fat policy (.onnx or
    .pt2, `xcompile.frontends`), checked against its interface and the robot before any work."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (or is not a file); "
                              "check the path")
    if interface is not None or path.suffix in FOREIGN_SUFFIXES:
        if interface is None:
            raise CheckpointError(f"{path} is a foreign fat policy ({path.suffix}); say how to "
                                  "drive it with --interface FILE.toml (see the README, "
                                  "'Foreign fat policies')")
        return fat_graph_artifact(path, interface, robot)
    return Artifact.create(INPUT_FORMAT, path, robot.name)


def as_targets(robot: str | Path | RobotTarget, hardware: str | Path | HardwareTarget | None
               ) -> tuple[RobotTarget, HardwareTarget]:
    r = robot if isinstance(robot, RobotTarget) else load_robot(robot)
    h = hardware if isinstance(hardware, HardwareTarget) else load_hardware(hardware or r.hardware)
    return r, h


def prepare(checkpoint: Path | None, target: str | None, hardware: str | None, *,
            from_manifest: Path | None = None, config: Path | None = None,
            cli: Mapping[str, Any] | None = None,
            interface: Path | None = None) -> BuildRequest:
    """Resolve what to build: a new build, a rebuild from a manifest, or a reproducer.

    `cli`: the command line's settings layer (passes, seed, profile, episodes, precision).
    """
    cli = dict(cli or {})
    if from_manifest is not None and interface is not None:
        raise XCompileError("--from rebuilds a recorded build of a fat checkpoint; a build from "
                            "a foreign fat policy (--interface) cannot be rebuilt with --from yet")
    if from_manifest is not None:
        fixed = [flag for flag, v in (
            ("--passes", cli.get("passes")), ("--config", config), ("--seed", cli.get("seed")),
            ("--profile", cli.get("profile")), ("--episodes", cli.get("episodes")),
            ("--" + str(cli.get("precision")), cli.get("precision")),
            ("--robust", cli.get("robust") or None)) if v is not None] + [
            f"{flag} {v} (with --from, {flag} gives the path of a TOML file the build "
            "used, checked by hash, not a name)"
            for flag, v in (("--target", target), ("--hardware", hardware))
            if v is not None and not Path(v).is_file()]
        if fixed:
            raise XCompileError(f"--from rebuilds what the manifest records, so "
                                f"{', '.join(fixed)} cannot be given with it; drop "
                                f"{'them' if len(fixed) > 1 else 'it'}, or run a new build "
                                "without --from")
        rb = rebuild_from_manifest(from_manifest, checkpoint, target, hardware)
        return BuildRequest(input_artifact(rb.checkpoint, rb.robot), rb.robot, rb.hardware,
                            rb.settings, rb, list(rb.notes))
    if checkpoint is None or target is None:
        raise XCompileError(
            "give a fat checkpoint and a robot, e.g. xcompile build examples/fat_policy.pt "
            "--target spot (or CKPT --from build/spot/manifest.json to rebuild a recorded build)"
            if checkpoint is None else
            "give the robot to compile for with --target NAME (see `xcompile targets`) or "
            "--target path/to/robot.toml")
    robot, hw = as_targets(target, hardware)
    if checkpoint.is_dir() and (checkpoint / "plan.json").is_file():     # a reproducer
        inp, _ = load_reproducer(checkpoint)
    else:
        inp = input_artifact(checkpoint, robot, interface)
    settings = resolve_settings(DEFAULTS, read_build_file(config) if config else {}, cli,
                                input_format=inp.format, recurrent=is_recurrent(inp))
    return BuildRequest(inp, robot, hw, settings, None, list(settings.notes))


def compare_outputs(out_dir: Path, expected: Mapping[str, str],
                    names: Sequence[str] = ("policy.onnx", "policy.plan", "policy.c", "policy.h")
                    ) -> dict[str, bool]:
    """{file: identical?} for the compiled policy files the original build recorded."""
    return {n: file_sha256(out_dir / n) == expected[n] for n in names
            if n in expected and (out_dir / n).is_file()}


# --------------------------------------------------------------------------------------------
# running it


def run_build(ckpt_path: str | Path | Artifact, robot: str | Path | RobotTarget,
              hardware: str | Path | HardwareTarget | None, plan: Sequence[PlanStep],
              out_dir: str | Path, cache_dir: str | Path = ".xcompile/cache",
              use_cache: bool = True, seed: int = 0, profile: str = "default",
              hooks: Sequence[BuildHooks] = (), required: Collection[str] = (),
              episodes: int = 10, gates: Gates | None = None, measure: Measure | None = None,
              runtime_floor: Callable[[], float] | None = None, rollout: bool = True,
              extra_manifest: Mapping[str, Any] | None = None, force: bool = False,
              interface: str | Path | None = None, robustness: bool = False
              ) -> BuildResult:
    """Run `plan` on a fat checkpoint (or any artifact) for one robot; write `out_dir`.

    `out_dir` is replaced only when it is xcompile's to replace (`xcompile.outdir`; `force` also
    replaces an earlier build that holds files it did not write); that, and whether its parent
    is writable, are checked before any work. Gates are evaluated into the report; call
    `result.raise_for_gates()` to turn a miss into GateError. `measure` and `runtime_floor`
    default to the real measurements (`xcompile.measure`). `robustness`: the report also scores
    the fat, tuned and final policy under the fault suite (`xcompile.robustness`).
    """
    robot_t, hw = as_targets(robot, hardware)
    out_dir = Path(out_dir)
    inp = (ckpt_path if isinstance(ckpt_path, Artifact)
           else input_artifact(ckpt_path, robot_t, interface))
    check_replaceable(out_dir, force=force)
    check_writable_parent(out_dir)
    run = run_plan(inp, robot_t, hw, plan, cache_dir=Path(cache_dir), use_cache=use_cache,
                   seed=seed, profile=profile, episodes=episodes, hooks=hooks,
                   required=required, measure=measure, reproducer=reproducer_dir(out_dir))
    floor = runtime_floor() if runtime_floor else float(ort_floor_us(obs_dim(robot_t)))
    doc = build_report(robot_t, hw, plan, run.stages, seed=seed, profile=profile,
                       episodes=episodes, gates=gates or Gates(), runtime_floor_us=floor)
    doc["notes"] = list(doc["notes"]) + run.notes
    if robustness:      # shown as one more stage of the progress display
        for h in hooks:
            h.before_pass("robustness", len(run.stages), len(run.stages) + 1)
        doc["robustness"] = fault_table(
            build_policies(run.stages, robot_t), robot_t, episodes, seed,
            progress=lambda i, n: [h.progress("robustness", f"fault {i}/{n}", i / n)
                                   for h in hooks])
        for h in hooks:
            h.after_pass(StageRecord(name="robustness", format="report"))
    write_folder(out_dir, lambda tmp: write_outputs(
        tmp, doc, run.stages, inp, robot_t, hw, plan, seed=seed, profile=profile,
        episodes=episodes, rollout=rollout, extra_manifest=extra_manifest), force=force)
    return BuildResult(out_dir=out_dir, report=doc, stages=run.stages, final=run.final)


def write_outputs(out: Path, report: dict[str, Any], records: Sequence[StageRecord],
                  inp: Artifact, robot: RobotTarget, hardware: HardwareTarget,
                  plan: Sequence[PlanStep], *, seed: int, profile: str, episodes: int,
                  rollout: bool = True, extra_manifest: Mapping[str, Any] | None = None) -> None:
    """Write every output of a build into the folder `out` (which the caller swaps into place):
    the final policy (and its ONNX beside a TensorRT engine), the files passes ship, report.json,
    report.md, stages.png, rollout.gif and manifest.json."""
    done = [r for r in records if r.artifact is not None and not r.skipped]
    final = done[-1].artifact
    assert final is not None
    onnx = next((r.artifact for r in reversed(done) if r.format == "onnx"), None)
    if onnx is not None:
        shutil.copyfile(onnx.path, out / "policy.onnx")
    if final.format != "onnx":
        shutil.copyfile(final.path, out / policy_file_name(final))
    for r in done:                          # what passes ship beside the policy (later wins)
        for name in r.files:
            shutil.copyfile(r.artifact.path.parent / name, out / Path(name).name)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    plot_stages(report, out / "stages.png")
    if rollout and onnx is not None:
        rollout_gif(load_policy(out / "policy.onnx", robot).act, robot, out / "rollout.gif",
                    seed=seed)
    manifest = build_manifest(out, inp, robot, hardware, plan, seed=seed, profile=profile,
                              episodes=episodes)
    manifest.update(extra_manifest or {})
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
