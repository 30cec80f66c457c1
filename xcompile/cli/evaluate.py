"""The command that scores: eval (closed-loop score of a policy in PyBullet, optionally under a
fault of the suite), with its progress line.

One call into the library (`xcompile.evaluate`, or `xcompile.executors.evaluate_file` on a pool);
this module turns flags into that call and renders what comes back. Heavy libraries load inside
the command, so `xcompile --help` answers at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from xcompile.cli.common import (
    ExecutorOpt,
    InterfaceOpt,
    JsonOpt,
    RayAddressOpt,
    TargetOpt,
    WorkersOpt,
    app,
    console,
    err_console,
    print_json,
    user_errors,
)
from xcompile.errors import XCompileError
from xcompile.outdir import check_file_target
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
    interface: InterfaceOpt = None,
    fault: Annotated[Optional[str], typer.Option(help=(  # noqa: UP007
        "Score under one fault of the suite, sized for the body (xcompile/sim/fault_suite.py): "
        "locked-joint, weak-leg, payload, delay or obs-noise. Runs in this process."))] = None,
    executor: ExecutorOpt = "serial",
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Closed-loop score of a policy in PyBullet on one robot.

    Episodes run in chunks of 10 (the lock-step batch) on the chosen executor; the per-episode
    scores are the same whatever the executor and --workers, and the same as a build report's.

    Example: xcompile eval examples/fat_policy.pt --target a1 --episodes 20 --seed 0
    """
    from rich.progress import Progress

    from xcompile.evaluate import rollout_gif, score_policy
    from xcompile.executors import evaluate_file, make_executor
    from xcompile.policy import load_policy
    from xcompile.sim.fault_suite import named_fault
    from xcompile.targets import load_robot

    with user_errors():
        if stream not in STREAMS:
            raise XCompileError(f"unknown --stream {stream!r}: choose one of "
                                f"{', '.join(STREAMS)}")
        if gif:
            check_file_target(gif, "--gif")     # before the evaluation, not after it
        robot = load_robot(target)
        faults = named_fault(robot, fault) if fault else None
        if faults:
            executor = "serial"
        if interface is not None:               # a foreign fat policy: this process only
            from xcompile.frontends.graph import fat_graph_policy

            loaded = fat_graph_policy(policy, interface, robot)
            executor = "serial"
        else:
            loaded = load_policy(policy, robot)  # checked here once, whatever the executor
        with make_executor(executor, workers, ray_address) as ex, \
                Progress(console=err_console, transient=True, disable=as_json) as prog:
            task = prog.add_task(f"evaluating on {robot.name}", total=episodes)
            if ex.name == "serial":     # this process: the policy already loaded
                res = score_policy(loaded.act, robot, episodes, seed, stream=stream,
                                   faults=faults, on_episode=lambda: prog.advance(task))
            else:
                res = evaluate_file(policy, robot, episodes, seed, stream, executor=ex,
                                    on_episodes=lambda n: prog.advance(task, n))
        if gif:
            rollout_gif(loaded.act, robot, gif, seed=seed, stream=stream)
    doc = {"policy": str(policy), "kind": loaded.kind, **res.as_dict(), "executor": executor,
           "fault": fault}
    if loaded.kind == "fat":
        doc["known_body"] = loaded.info["known_body"]
    if as_json:
        print_json(doc)
        return
    extra = "" if loaded.info.get("known_body", True) else " (zero-shot: body not in checkpoint)"
    lo, hi = res.score_ci95 or (res.score, res.score)
    extra += f" under fault {fault}" if fault else ""
    console.print(f"{robot.name}{extra}: score [bold]{res.score:.3f}[/] [{lo:.3f}, {hi:.3f}] "
                  f"(95% CI) over {episodes} episodes ({stream} stream, seed {seed}); "
                  f"{res.physical_line()}")
    if res.nonfinite_message():
        err_console.print(f"[yellow]warning:[/] {escape(res.nonfinite_message() or '')}",
                          highlight=False)
    if gif:
        console.print(f"rollout GIF: {gif}")
