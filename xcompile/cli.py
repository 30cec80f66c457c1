"""The `xcompile` command line: a thin layer over the Python API.

Every command maps to one library call; `XCompileError`s become one red line and a non-zero exit,
anything else is a bug and keeps its traceback. Heavy libraries are imported inside commands so
`xcompile --help` answers at once.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from xcompile import __version__
from xcompile.errors import XCompileError

app = typer.Typer(
    help="Compile a fat multi-robot policy into a slim policy for one robot.\n\n"
    "Example: xcompile build examples/fat_policy.pt --target spot --int8",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"xcompile {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option(  # noqa: UP007 (typer needs Optional)
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """Compile a fat multi-robot policy into a slim policy for one robot."""


@contextmanager
def _user_errors():
    try:
        yield
    except XCompileError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, markup=True)
        raise typer.Exit(e.exit_code) from None


def _print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")]
TargetOpt = Annotated[str, typer.Option(
    "--target", "-t", help="Robot: a built-in name (see `xcompile targets`) or a path to a robot TOML.")]


@app.command()
def targets(as_json: JsonOpt = False) -> None:
    """List the built-in robots and hardware targets.

    Example: xcompile targets --json
    """
    from xcompile.targets import list_hardware, list_robots, load_hardware, load_robot

    with _user_errors():
        robots = [load_robot(n) for n in list_robots()]
        hws = [load_hardware(n) for n in list_hardware()]
    if as_json:
        _print_json({
            "robots": [{"name": r.name, "family": r.family, "joints": r.n_joints,
                        "control_hz": r.control_hz, "hardware": r.hardware,
                        "description": r.description} for r in robots],
            "hardware": [h.model_dump(exclude={"source"}) for h in hws],
        })
        return
    t = Table(title="robots")
    for c in ("name", "task", "joints", "control Hz", "hardware", "description"):
        t.add_column(c)
    for r in robots:
        t.add_row(r.name, r.family, str(r.n_joints), f"{r.control_hz:g}", r.hardware,
                  r.description)
    console.print(t)
    t = Table(title="hardware")
    for c in ("name", "runtime", "precisions", "latency budget µs", "description"):
        t.add_column(c)
    for h in hws:
        t.add_row(h.name, h.runtime, ",".join(h.precisions), f"{h.latency_budget_us:g}",
                  h.description)
    console.print(t)


@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Fat checkpoint (.pt or .safetensors).")],
    as_json: JsonOpt = False,
) -> None:
    """Show what a fat checkpoint holds: bodies, parameters, bytes, what each body uses.

    Like `lipo -info` for a fat binary. Example: xcompile inspect examples/fat_policy.pt
    """
    from xcompile.models.checkpoint import inspect_checkpoint, load_checkpoint

    with _user_errors():
        info = inspect_checkpoint(load_checkpoint(checkpoint))
    if as_json:
        _print_json(info)
        return
    console.print(f"[bold]{checkpoint}[/]: {info['format']} v{info['version']}, "
                  f"{info['params_total']:,} parameters, {info['bytes']:,} bytes, "
                  f"sha256 {info['sha256'][:12]}")
    cfg = info["config"]
    console.print(f"architecture: transformer d_model={cfg['d_model']} layers={cfg['n_layers']} "
                  f"heads={cfg['n_heads']} families={sorted(cfg['global_dims'])}")
    t = Table(title=f"{len(info['bodies'])} bodies")
    for c in ("body", "task", "joints", "params used", "share of network"):
        t.add_column(c)
    for b in info["bodies"]:
        t.add_row(b["name"], b["family"], str(b["n_joints"]), f"{b['params_used']:,}",
                  f"{100 * b['fraction_used']:.1f}%")
    console.print(t)


@app.command("eval")
def eval_(
    policy: Annotated[Path, typer.Argument(help="Fat checkpoint (.pt/.safetensors) or compiled "
                                                "policy (.onnx).")],
    target: TargetOpt,
    episodes: Annotated[int, typer.Option(min=1, max=10000, help="Evaluation episodes.")] = 20,
    seed: Annotated[int, typer.Option(min=0, help="Episode i uses seed SEED+i.")] = 0,
    gif: Annotated[Optional[Path], typer.Option(help="Write a rollout GIF of episode 0 here.")] = None,  # noqa: UP007
    as_json: JsonOpt = False,
) -> None:
    """Closed-loop score of a policy in PyBullet on one robot.

    Example: xcompile eval examples/fat_policy.pt --target a1 --episodes 20 --seed 0
    """
    from rich.progress import Progress

    from xcompile.evaluate import evaluate, rollout_gif
    from xcompile.policy import load_policy
    from xcompile.targets import load_robot

    with _user_errors():
        robot = load_robot(target)
        loaded = load_policy(policy, robot)
        with Progress(console=err_console, transient=True, disable=as_json) as prog:
            task = prog.add_task(f"evaluating on {robot.name}", total=episodes)
            res = evaluate(loaded.act, robot, episodes=episodes, seed=seed,
                           on_episode=lambda: prog.advance(task))
        if gif:
            rollout_gif(loaded.act, robot, gif, seed=seed)
    doc = {"policy": str(policy), "kind": loaded.kind, **res.as_dict()}
    if loaded.kind == "fat":
        doc["known_body"] = loaded.info["known_body"]
    if as_json:
        _print_json(doc)
        return
    extra = "" if loaded.info.get("known_body", True) else " (zero-shot: body not in checkpoint)"
    console.print(f"{robot.name}{extra}: score [bold]{res.score:.3f}[/] over {episodes} episodes "
                  f"(seed {seed}), falls {res.falls}, success {100 * res.success_rate:.0f}%")
    if gif:
        console.print(f"rollout GIF: {gif}")
