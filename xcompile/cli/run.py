"""Commands that run: eval (closed-loop score) and build (compile), with their progress lines.

Each is one call into the library (`xcompile.evaluate`, `xcompile.build`); this module turns flags
into that call and renders what comes back. Heavy libraries load inside the commands, so
`xcompile --help` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from xcompile.cli.common import (
    JsonOpt,
    TargetOpt,
    app,
    console,
    err_console,
    interruptible,
    print_json,
    print_report,
    user_errors,
)
from xcompile.errors import XCompileError
from xcompile.outdir import check_file_target, check_replaceable
from xcompile.seeds import STREAMS


@app.command("eval")
def eval_(
    policy: Annotated[Path, typer.Argument(help="Fat checkpoint (.pt/.safetensors) or compiled "
                                                "policy (.onnx, or policy.c from --emit c: run "
                                                "only when it is exactly what xcompile emits "
                                                "from the policy.onnx beside it).")],
    target: TargetOpt,
    episodes: Annotated[int, typer.Option(min=1, max=10000, help="Evaluation episodes.")] = 20,
    seed: Annotated[int, typer.Option(min=0, max=2**31 - 1, help=(
        "Seed of the episodes: with the default --stream report, the episodes a build seeded "
        "SEED scores its stages on."))] = 0,
    stream: Annotated[str, typer.Option(help=(
        "Seed stream of the episodes (xcompile/seeds.py): report (what builds report), bench, "
        "or any other use's, to look at the episodes a pass trained or checked on."))] = "report",
    gif: Annotated[Optional[Path], typer.Option(  # noqa: UP007
        help="Write a rollout GIF of episode 0 here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Closed-loop score of a policy in PyBullet on one robot.

    Example: xcompile eval examples/fat_policy.pt --target a1 --episodes 20 --seed 0
    """
    from rich.progress import Progress

    from xcompile.evaluate import evaluate, rollout_gif
    from xcompile.policy import load_policy
    from xcompile.targets import load_robot

    with user_errors():
        if stream not in STREAMS:
            raise XCompileError(f"unknown --stream {stream!r}: choose one of "
                                f"{', '.join(STREAMS)}")
        if gif:
            check_file_target(gif, "--gif")     # before the evaluation, not after it
        robot = load_robot(target)
        loaded = load_policy(policy, robot)
        with Progress(console=err_console, transient=True, disable=as_json) as prog:
            task = prog.add_task(f"evaluating on {robot.name}", total=episodes)
            res = evaluate(loaded.act, robot, episodes=episodes, seed=seed, stream=stream,
                           on_episode=lambda: prog.advance(task))
        if gif:
            rollout_gif(loaded.act, robot, gif, seed=seed, stream=stream)
    doc = {"policy": str(policy), "kind": loaded.kind, **res.as_dict()}
    if loaded.kind == "fat":
        doc["known_body"] = loaded.info["known_body"]
    if as_json:
        print_json(doc)
        return
    extra = "" if loaded.info.get("known_body", True) else " (zero-shot: body not in checkpoint)"
    lo, hi = res.score_ci95 or (res.score, res.score)
    console.print(f"{robot.name}{extra}: score [bold]{res.score:.3f}[/] [{lo:.3f}, {hi:.3f}] "
                  f"(95% CI) over {episodes} episodes ({stream} stream, seed {seed}), falls "
                  f"{res.falls}, success {100 * res.success_rate:.0f}%")
    if res.nonfinite_message():
        err_console.print(f"[yellow]warning:[/] {escape(res.nonfinite_message() or '')}",
                          highlight=False)
    if gif:
        console.print(f"rollout GIF: {gif}")


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
             "Required unless --from is given; with --from, the path of the build's robot "
             "TOML, if it is not built in.")] = None,
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
        "--no-cache", help="Run every pass and measurement again (results still refresh the "
                           "cache).")] = False,
    cache_dir: Annotated[Path, typer.Option(help="Pass and measurement cache.")] = Path(
        ".xcompile/cache"),
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
    as_json: JsonOpt = False,
) -> None:
    """Compile a fat checkpoint into a slim policy for one robot, with a report.

    Writes OUT/policy.onnx, report.json, report.md, stages.png, rollout.gif and manifest.json
    (with --emit c also policy.c and policy.h).
    A missed gate exits with code 4 after the report is written.

    Example: xcompile build examples/fat_policy.pt --target spot --int8 --max-latency-us 500
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from xcompile.build import compare_outputs, prepare, run_build
    from xcompile.manager.settings import parse_plan
    from xcompile.report import Gates

    with user_errors():
        chosen = [n for n, on in (("int8", int8), ("fp16", fp16), ("fp32", fp32)) if on]
        if len(chosen) > 1:
            flags = " and ".join("--" + c for c in chosen)
            raise XCompileError(f"choose one precision, not {flags}")
        gates = Gates(max_latency_us, max_size_kb, min_score_ratio)
        if out is not None:      # before the checkpoint is read and hashed: a refusal is instant
            check_replaceable(out, force=force)
        req = prepare(checkpoint, target, hardware, from_manifest=from_manifest, config=config,
                      cli={"passes": parse_plan(passes) if passes is not None else None,
                           "seed": seed, "profile": profile, "episodes": episodes,
                           "precision": chosen[0] if chosen else None, "emit": emit})
        for note in req.notes:
            err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
        out_dir = out or Path("build") / req.robot.name
        s = req.settings
        with interruptible(f"{out_dir} was not touched (it holds the previous build, or "
                            "nothing); finished passes are cached, so running the same command "
                            "again resumes"), \
                Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                         console=err_console, disable=as_json) as prog:
            result = run_build(
                req.inp, req.robot, req.hardware, s.plan, out_dir, cache_dir,
                use_cache=not no_cache, seed=s.seed, profile=s.profile, episodes=s.episodes,
                hooks=[_RichHooks(prog)], required=("build-tensorrt",) if tensorrt else (),
                gates=gates, extra_manifest={"command": sys.argv}, force=force)
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
