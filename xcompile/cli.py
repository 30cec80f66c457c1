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
from rich.markup import escape
from rich.table import Table

from xcompile import __version__
from xcompile.errors import XCompileError
from xcompile.outdir import check_file_target

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
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True)
        raise typer.Exit(e.exit_code) from None


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup on the way out runs."""


@contextmanager
def _interruptible(what: str):
    """Ctrl-C or SIGTERM: unwind (temporary files are removed on the way), say what is left."""
    import signal

    def on_term(signum, frame):
        raise Interrupted()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except KeyboardInterrupt as e:
        # Cleanups ran on the way here; a second Ctrl-C now would only cut this message short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        err_console.print(f"[bold red]interrupted:[/] {what}", highlight=False)
        raise typer.Exit(143 if isinstance(e, Interrupted) else 130) from None
    finally:
        if signal.getsignal(signal.SIGTERM) is on_term:
            signal.signal(signal.SIGTERM, previous)


def _print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print one JSON document instead of a table.")]
TargetOpt = Annotated[str, typer.Option(
    "--target", "-t",
    help="Robot: a built-in name (see `xcompile targets`) or a path to a robot TOML.")]


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


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="Fat checkpoint to read (.pt or .safetensors).")],
    dest: Annotated[Path, typer.Argument(help="Where to write it; the suffix picks the container "
                                              "(.safetensors recommended).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DEST if it exists.")
                         ] = False,
) -> None:
    """Re-save a fat checkpoint as .safetensors (or back to .pt), checked bit for bit.

    safetensors holds only tensors and a JSON header, so loading it can never run code.
    Example: xcompile convert examples/fat_policy.pt fat_policy.safetensors
    """
    from xcompile.models.checkpoint import convert_checkpoint

    with _user_errors():
        out = convert_checkpoint(source, dest, overwrite=overwrite)
    console.print(f"wrote {dest} ({out.n_bytes:,} bytes, {len(out.registry)} bodies, "
                  f"sha256 {out.sha256[:12]}); weights identical to {source}", highlight=False)


@app.command("eval")
def eval_(
    policy: Annotated[Path, typer.Argument(help="Fat checkpoint (.pt/.safetensors) or compiled "
                                                "policy (.onnx).")],
    target: TargetOpt,
    episodes: Annotated[int, typer.Option(min=1, max=10000, help="Evaluation episodes.")] = 20,
    seed: Annotated[int, typer.Option(min=0, max=2**31 - 1,
                                      help="Episode i uses seed SEED+i.")] = 0,
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

    with _user_errors():
        if gif:
            check_file_target(gif, "--gif")     # before the evaluation, not after it
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
        min=0, max=2**31 - 1, help="Seed of every pass and of the score episodes. Default 0.")
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

    Writes OUT/policy.onnx, report.json, report.md, stages.png, rollout.gif and manifest.json.
    A missed gate exits with code 4 after the report is written.

    Example: xcompile build examples/fat_policy.pt --target spot --int8 --max-latency-us 500
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from xcompile.build import compare_outputs, prepare, run_build
    from xcompile.manager.settings import parse_plan
    from xcompile.report import Gates

    with _user_errors():
        chosen = [n for n, on in (("int8", int8), ("fp16", fp16), ("fp32", fp32)) if on]
        if len(chosen) > 1:
            flags = " and ".join("--" + c for c in chosen)
            raise XCompileError(f"choose one precision, not {flags}")
        gates = Gates(max_latency_us, max_size_kb, min_score_ratio)
        req = prepare(checkpoint, target, hardware, from_manifest=from_manifest, config=config,
                      cli={"passes": parse_plan(passes) if passes is not None else None,
                           "seed": seed, "profile": profile, "episodes": episodes,
                           "precision": chosen[0] if chosen else None})
        for note in req.notes:
            err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
        out_dir = out or Path("build") / req.robot.name
        s = req.settings
        with _interruptible(f"{out_dir} was not touched (it holds the previous build, or "
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
        _print_json(result.report)
    else:
        _print_report(result.report)
        console.print(f"wrote {out_dir}/ ({result.report['final']['policy']}, report.md, "
                      "report.json, manifest.json)", highlight=False)
    same = compare_outputs(out_dir, req.rebuild.expected_outputs) if req.rebuild else {}
    for name, ok in same.items():
        mark = "[green]identical[/]" if ok else "[bold red]DIFFERS[/]"
        err_console.print(f"{name}: {mark} to the one {from_manifest} records", highlight=False)
    with _user_errors():
        result.raise_for_gates()
        if not all(same.values()):
            raise XCompileError(f"the rebuild is not byte-identical to the build {from_manifest} "
                                f"records ({', '.join(n for n, ok in same.items() if not ok)}); "
                                "see the notes above for version differences")


def _print_report(doc: dict) -> None:
    """The stage table, notes and gates of a report: what `build` ends with and `report` shows."""
    from xcompile.render import render_table

    console.print(render_table(doc))
    for note in doc.get("notes", []):
        console.print(f"note: {escape(str(note))}", highlight=False)
    for g in doc.get("gates", []):
        mark = "[green]pass[/]" if g["passed"] else "[bold red]MISSED[/]"
        console.print(f"gate {escape(str(g['name']))}: {mark} — {escape(str(g['message']))}",
                      highlight=False)


def _type_name(ann) -> str:
    from typing import Literal, get_args, get_origin

    if get_origin(ann) is Literal:
        return "|".join(repr(a) for a in get_args(ann))
    name = getattr(ann, "__name__", None)
    return name if name and get_origin(ann) is None else str(ann).replace("typing.", "")


def pass_info(cls) -> dict:
    """A registered pass as a JSON-able dict: formats, version, options from its Config."""
    from pydantic_core import PydanticUndefined

    opts = []
    for fname, f in cls.Config.model_fields.items():
        if f.default is not PydanticUndefined:
            default = f.default
        elif f.default_factory is not None:
            default = f.default_factory()
        else:
            default = "(required)"
        opts.append({"name": fname, "type": _type_name(f.annotation), "default": default,
                     "description": f.description or ""})
    return {"name": cls.name, "summary": cls.summary, "input_format": cls.input_format,
            "output_format": cls.output_format, "version": cls.version,
            "options": opts}


@app.command("passes")
def passes_(as_json: JsonOpt = False) -> None:
    """List every registered pass: what it does, formats, version and options.

    Options are set in a build file, in a table per pass named pass.<name>.

    Example: xcompile passes --json
    """
    from xcompile.passes import DEFAULT_PLAN
    from xcompile.passes.base import all_passes

    registry = all_passes()
    order = [n for n in DEFAULT_PLAN if n in registry] + sorted(set(registry) - set(DEFAULT_PLAN))
    infos = [pass_info(registry[n]) for n in order]
    if as_json:
        _print_json({"default_plan": DEFAULT_PLAN, "passes": infos})
        return
    console.print(f"default plan: [bold]{','.join(DEFAULT_PLAN)}[/]\n", highlight=False)
    for p in infos:
        console.print(f"[bold]{p['name']}[/] ({p['input_format']} → {p['output_format']}, "
                      f"version {p['version']}): {p['summary']}", highlight=False)
        if p["options"]:
            t = Table(show_header=True, box=None, padding=(0, 2, 0, 2))
            for c in ("option", "type", "default", "description"):
                t.add_column(c, style="dim" if c == "type" else None)
            for o in p["options"]:
                t.add_row(o["name"], o["type"], repr(o["default"]), o["description"])
            console.print(t)
        console.print()


@app.command()
def report(
    build_dir: Annotated[Path, typer.Argument(help="A build output folder (holds report.json).")],
    as_json: JsonOpt = False,
) -> None:
    """Show the report of a finished build again.

    Example: xcompile report build/spot
    """
    from xcompile.report import read_report

    with _user_errors():
        doc = read_report(build_dir)
    if as_json:
        _print_json(doc)
        return
    _print_report(doc)
