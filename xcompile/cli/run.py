"""The command that compiles: build (one target or a fleet), with its progress lines.

One call into the library (`xcompile.build`, `xcompile.fleet`); this module turns flags into that
call and renders what comes back. Heavy libraries load inside the commands, so
`xcompile --help` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from xcompile.cli.common import (
    ExecutorOpt,
    InterfaceOpt,
    JsonOpt,
    RayAddressOpt,
    WorkersOpt,
    app,
    console,
    err_console,
    interruptible,
    print_json,
    print_report,
    user_errors,
)
from xcompile.errors import XCompileError
from xcompile.outdir import check_replaceable

# --------------------------------------------------------------------------------------------
# build, passes, report


class _RichHooks:
    """Progress lines for the pass manager: one line per stage, spinner, elapsed time."""

    def __init__(self, progress) -> None:
        self.prog = progress
        self.tasks: dict[str, object] = {}

    def before_pass(self, name: str, index: int, total: int) -> None:
        what = "measuring the input" if index == 0 else "running"
        self.tasks[name] = self.prog.add_task(f"[{index}/{total - 1}] {name}: {what}", total=1.0)

    def progress(self, name: str, desc: str, frac: float) -> None:
        task = self.tasks.get(name)
        if task is not None:
            self.prog.update(task, description=f"{name}: {desc}", completed=max(0.0, min(frac, 1)))

    def after_pass(self, rec) -> None:
        task = self.tasks[rec.name]
        if rec.skipped:
            line = f"[yellow]–[/] {rec.name} skipped: {escape(str(rec.skip_reason))}"
        elif rec.name in ("fat", "input"):          # stage 0: the build's input, measured
            line = f"[green]✓[/] {rec.name}: input measured"
        else:
            line = f"[green]✓[/] {rec.name} → {rec.format}" + (" (cached)" if rec.cached else "")
        self.prog.update(task, description=line, completed=1.0)
        self.prog.stop_task(task)

    def on_failure(self, name: str, error: BaseException, reproducer: Path | None) -> None:
        task = self.tasks.get(name)
        if task is not None:
            self.prog.update(task, description=f"[red]✗[/] {name} failed")
            self.prog.stop_task(task)


@app.command()
def build(
    checkpoint: Annotated[Optional[Path], typer.Argument(  # noqa: UP007
        help="Fat checkpoint (.pt/.safetensors), or a reproducer folder (*.repro) to re-run. "
             "With --from: the checkpoint, unless it lies in the manifest's folder.")] = None,
    target: Annotated[Optional[str], typer.Option(  # noqa: UP007
        "--target", "-t",
        help="Robot: a built-in name (see `xcompile targets`) or a path to a robot TOML. "
             "Several, separated by commas (a1,spot,panda), make a fleet build. "
             "Required unless --from or --fleet is given; with --from, the path of the build's "
             "robot TOML, if it is not built in.")] = None,
    fleet: Annotated[Optional[Path], typer.Option(  # noqa: UP007
        "--fleet", help="Fleet file (TOML): targets = [...] and optional [target.NAME] tables "
                        "of hardware, profile, episodes, seed. Builds every target into "
                        "--out (default build/fleet): OUT/<robot>/ each, and report.md.")] = None,
    from_manifest: Annotated[Optional[Path], typer.Option(  # noqa: UP007
        "--from", help="Rebuild exactly what a manifest.json records (inputs are checked by "
                       "hash); the rebuilt policy is compared with the recorded one.")] = None,
    hardware: Annotated[Optional[str], typer.Option(  # noqa: UP007
        help="Hardware target name or TOML path. Default: the robot's own (see `targets`). "
             "With --from: the path of the build's hardware TOML, if it is not built in.")
    ] = None,
    int8: Annotated[bool, typer.Option(
        "--int8", help="Quantize to int8 (QDQ). This is the default when the plan has quantize "
                       "(quantize's own default precision).")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="Quantize to fp16 instead of int8.")] = False,
    fp32: Annotated[bool, typer.Option("--fp32", help="No quantization: drop quantize from the "
                                                      "plan.")] = False,
    emit: Annotated[str, typer.Option(
        "--emit", help="Back end of the final policy: onnx (policy.onnx), or c (also policy.c "
                       "and policy.h: dependency-free C99 for a control loop or a "
                       "microcontroller, checked against onnxruntime; needs a C compiler, "
                       "otherwise skipped with a note). c ends the plan with emit-c.")] = "onnx",
    passes: Annotated[Optional[str], typer.Option(  # noqa: UP007
        help="The plan: pass names separated by commas, e.g. pin-embodiment,export-onnx,"
             "quantize. Default: pin-embodiment, rl-finetune, distill, export-onnx, "
             "quantize, build-tensorrt (`xcompile passes` shows it).")] = None,
    interface: InterfaceOpt = None,
    config: Annotated[Optional[Path], typer.Option(  # noqa: UP007
        help="TOML build file: passes (list), seed, profile, episodes, and one table of "
             "options per pass named pass.<name>. The command line overrides it.")] = None,
    out: Annotated[Optional[Path], typer.Option(  # noqa: UP007
        help="Output folder, written when the build completes. Default: build/<robot>/. "
             "xcompile replaces it only when it is empty or holds an earlier build.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an earlier build's --out folder even if it also holds files "
                        "that build did not write (they are deleted). Never replaces a folder "
                        "xcompile did not write.")] = False,
    seed: Annotated[Optional[int], typer.Option(  # noqa: UP007
        min=0, max=2**31 - 1, help="Seed of every pass and of the score episodes (each use "
                                   "draws from its own stream, xcompile/seeds.py). Default 0.")
    ] = None,
    profile: Annotated[Optional[str], typer.Option(  # noqa: UP007
        help="fast | default | thorough: how much effort heavy passes and scoring spend.")] = None,
    episodes: Annotated[Optional[int], typer.Option(  # noqa: UP007
        min=1, max=10000, help="Score episodes per stage. Default by profile: fast 3, default 10, "
                    "thorough 30.")] = None,
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", help="Run every pass and measurement again (measurements refresh the "
                           "cache; a valid pass entry is kept: it is the same result)."
    )] = False,
    cache_dir: Annotated[Path, typer.Option(help="Pass and measurement cache.")] = Path(
        ".xcompile/cache"),
    robust: Annotated[bool, typer.Option(
        "--robust", help="Fine-tune and distill with the fault suite in the training "
                         "distribution (a locked joint, a weak leg, a payload, a delay, "
                         "observation noise; `xcompile eval --fault`), so that the slim policy "
                         "keeps the fat policy's fault tolerance. Implies --robustness.")] = False,
    robustness: Annotated[bool, typer.Option(
        "--robustness", help="Also score the fat, tuned and final policy under every fault of "
                             "the suite on the report's episodes and put that table in the "
                             "report (costs up to 6 x 3 x --episodes episodes).")] = False,
    tensorrt: Annotated[bool, typer.Option(
        "--tensorrt", help="Require TensorRT: fail instead of skipping build-tensorrt when "
                           "TensorRT or a GPU is missing.")] = False,
    max_latency_us: Annotated[Optional[float], typer.Option(  # noqa: UP007
        help="Gate: the final policy's p99 latency must be at most this (µs).")] = None,
    max_size_kb: Annotated[Optional[float], typer.Option(  # noqa: UP007
        help="Gate: the final policy file must be at most this (kB, 1000 bytes).")] = None,
    min_score_ratio: Annotated[Optional[float], typer.Option(  # noqa: UP007
        help="Gate: final score / fat score (the first scored stage) must be at least this.")
    ] = None,
    executor: ExecutorOpt = "serial",
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compile a fat checkpoint into a slim policy for one robot, with a report.

    Writes OUT/policy.onnx, report.json, report.md, stages.png, rollout.gif and manifest.json
    (with --emit c also policy.c and policy.h).
    A missed gate exits with code 4 after the report is written. A fleet build (several
    --target, or --fleet) builds each target as a task on --executor and exits non-zero when
    any target failed or missed a gate.

    Example: xcompile build examples/fat_policy.pt --target spot --int8 --max-latency-us 500
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from xcompile.build import compare_outputs, prepare, run_build
    from xcompile.executors import make_executor, use_executor
    from xcompile.manager.settings import parse_plan
    from xcompile.report import Gates

    with user_errors():
        chosen = [n for n, on in (("int8", int8), ("fp16", fp16), ("fp32", fp32)) if on]
        if len(chosen) > 1:
            flags = " and ".join("--" + c for c in chosen)
            raise XCompileError(f"choose one precision, not {flags}")
        gates = Gates(max_latency_us, max_size_kb, min_score_ratio)
        if interface is not None and (fleet is not None or (target and "," in target)):
            raise XCompileError("--interface builds one target; a fleet build from a foreign "
                                "fat policy is not supported yet")
        if fleet is not None or (target is not None and "," in target):
            cli = {"passes": parse_plan(passes) if passes is not None else None, "seed": seed,
                   "profile": profile, "episodes": episodes, "robust": robust,
                   "precision": chosen[0] if chosen else None, "emit": emit}
            return _build_fleet(
                checkpoint, target, fleet, from_manifest, hardware, config, cli, out, force,
                cache_dir, not no_cache, gates, ("build-tensorrt",) if tensorrt else (),
                executor, workers, ray_address, as_json)
        if out is not None:      # before the checkpoint is read and hashed: a refusal is instant
            check_replaceable(out, force=force)
        req = prepare(checkpoint, target, hardware, from_manifest=from_manifest, config=config,
                      cli={"passes": parse_plan(passes) if passes is not None else None,
                           "seed": seed, "profile": profile, "episodes": episodes,
                           "robust": robust, "precision": chosen[0] if chosen else None,
                           "emit": emit},
                      interface=interface)
        for note in req.notes:
            err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
        out_dir = out or Path("build") / req.robot.name
        s = req.settings
        # One target: the passes run here; the report's closed-loop scoring runs on --executor
        # (workers load each stage's file themselves; the scores are the same on every one).
        with interruptible(f"{out_dir} was not touched (it holds the previous build, or "
                            "nothing); finished passes are cached, so running the same command "
                            "again resumes"), \
                make_executor(executor, workers, ray_address) as ex, use_executor(ex), \
                Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                         console=err_console, disable=as_json) as prog:
            result = run_build(
                req.inp, req.robot, req.hardware, s.plan, out_dir, cache_dir,
                use_cache=not no_cache, seed=s.seed, profile=s.profile, episodes=s.episodes,
                hooks=[_RichHooks(prog)], required=("build-tensorrt",) if tensorrt else (),
                gates=gates, extra_manifest={"command": sys.argv}, force=force,
                robustness=robustness or robust)
    if as_json:
        print_json(result.report)
    else:
        print_report(result.report)
        policies = sorted(p.name for p in out_dir.glob("policy.*"))
        console.print(f"wrote {out_dir}/ ({', '.join(policies)}, report.md, report.json, "
                      "manifest.json)", highlight=False)
    same = compare_outputs(out_dir, req.rebuild.expected_outputs) if req.rebuild else {}
    for name, ok in same.items():
        mark = "[green]identical[/]" if ok else "[bold red]DIFFERS[/]"
        err_console.print(f"{name}: {mark} to the one {from_manifest} records", highlight=False)
    with user_errors():
        result.raise_for_gates()
        if not all(same.values()):
            raise XCompileError(f"the rebuild is not byte-identical to the build {from_manifest} "
                                f"records ({', '.join(n for n, ok in same.items() if not ok)}); "
                                "see the notes above for version differences")


# --------------------------------------------------------------------------------------------
# fleet builds


def _build_fleet(checkpoint, target, fleet, from_manifest, hardware, config, cli, out, force,
                 cache_dir, use_cache, gates, required, executor, workers, ray_address,
                 as_json) -> None:
    """`build` for several targets: each a task on the executor, one line per target, and the
    fleet report (xcompile.fleet)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from xcompile.executors import make_executor
    from xcompile.fleet import (
        check_fleet_dir,
        exit_code,
        fleet_table,
        parse_targets,
        prepare_jobs,
        read_fleet_file,
        run_fleet,
    )

    with user_errors():
        if from_manifest is not None:
            raise XCompileError("--from rebuilds one recorded build; it cannot be combined with "
                                "a fleet (--fleet, or several --target)")
        if fleet is not None and target is not None:
            raise XCompileError("give the fleet's targets with --target a,b,c or with --fleet "
                                "FILE, not both")
        if checkpoint is None or checkpoint.is_dir():
            raise XCompileError("a fleet build starts from a fat checkpoint, e.g. xcompile build "
                                "examples/fat_policy.pt --target a1,spot")
        out_dir = out or Path("build") / "fleet"
        check_fleet_dir(out_dir, force=force)    # before any work: a refusal is instant
        targets = read_fleet_file(fleet) if fleet is not None else parse_targets(target)
        jobs, failed = prepare_jobs(checkpoint, targets, hardware=hardware, config=config,
                                    cli=cli, cache_dir=cache_dir, use_cache=use_cache,
                                    gates=gates, required=required)
        for job in jobs:
            for note in dict.fromkeys(job.notes):
                err_console.print(f"[yellow]note:[/] {escape(job.target)}: {escape(note)}",
                                  highlight=False)
        with make_executor(executor, workers, ray_address) as ex, \
                interruptible(f"{out_dir} was not touched; finished passes are cached, so "
                              "running the same command again resumes"), \
                Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                         console=err_console, disable=as_json) as prog:
            if not as_json:
                err_console.print(f"building {len(jobs)} targets {ex.describe()}",
                                  highlight=False)
            for row in failed:
                prog.stop_task(prog.add_task(_fleet_line(row), total=1))
            ids = {j.target: prog.add_task(f"{escape(j.target)}: queued", total=1)
                   for j in jobs}

            def done(row) -> None:
                prog.update(ids[row["target"]], description=_fleet_line(row), completed=1)
                prog.stop_task(ids[row["target"]])

            doc = run_fleet(jobs, failed, out_dir, ex, force=force, on_done=done,
                            order=[t.target for t in targets],
                            meta={"checkpoint": str(checkpoint), "command": sys.argv})
    code = exit_code(doc["targets"])
    if as_json:
        print_json(doc)
    else:
        headers, rows = fleet_table(doc)
        keep = [i for i, h in enumerate(headers) if h != "error" or any(r[i] for r in rows)]
        table = Table(*(headers[i] for i in keep), title=f"fleet: {len(rows)} targets")
        for r in rows:
            table.add_row(*(escape(r[i]) for i in keep))
        console.print(table)
        console.print(f"wrote {out_dir}/ (report.md, report.json, one folder per built target)",
                      highlight=False)
    if code:
        bad = [r["target"] for r in doc["targets"] if not r["ok"]]
        missed = [r["target"] for r in doc["targets"] if r["ok"] and not r["gates_passed"]]
        what = "; ".join(p for p in (
            f"{len(bad)} of {len(doc['targets'])} targets failed ({', '.join(bad)})" if bad
            else "", f"missed a gate: {', '.join(missed)}" if missed else "") if p)
        err_console.print(f"[bold red]error:[/] {escape(what)} (see {out_dir}/report.md)",
                          highlight=False)
        raise typer.Exit(code)


def _fleet_line(row) -> str:
    t = escape(str(row["target"]))
    if not row["ok"]:
        return f"[red]✗[/] {t}: {escape(str(row['error']))}"
    ci = row["score_ci95"]
    score = ("score –" if row["score"] is None else f"score {row['score']:.3f}"
             + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    mark = "[green]✓[/]" if row["gates_passed"] else "[yellow]![/]"
    gate = "" if row["gates_passed"] else " (missed a gate)"
    size = "–" if row["bytes"] is None else f"{row['bytes']:,}"
    return f"{mark} {t}: {score}, {size} bytes, built in {row['build_s']:.1f} s{gate}"
