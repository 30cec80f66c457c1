"""What every command shares: the app, the consoles, user errors, interrupts, JSON output.

`XCompileError`s become one red line and a non-zero exit; anything else is a bug and keeps its
traceback. Ctrl-C and SIGTERM unwind (cleanups run) and say what is left.
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
def user_errors():
    try:
        yield
    except XCompileError as e:
        # One line however long (a path can be): a wrapped error breaks grep and log parsers.
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True,
                          soft_wrap=True)
        raise typer.Exit(e.exit_code) from None


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup on the way out runs."""


@contextmanager
def interruptible(what: str):
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


def print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print one JSON document instead of a table.")]
InterfaceOpt = Annotated[Optional[Path], typer.Option(  # noqa: UP007
    "--interface", help="Interface description (TOML) of a foreign fat policy (.onnx or .pt2): "
                        "its observation input, action output, task family and a table of "
                        "embodiment input values per body (README: 'Foreign fat policies').")]
TargetOpt = Annotated[str, typer.Option(
    "--target", "-t",
    help="Robot: a built-in name (see `xcompile targets`) or a path to a robot TOML.")]
ExecutorOpt = Annotated[str, typer.Option(
    "--executor", help="Where the work runs: serial (this process), process (a local process "
                       "pool) or ray (Ray: a local instance, or the cluster at --ray-address; "
                       "pip install 'xcompile[ray]'). Results are the same on each.")]
WorkersOpt = Annotated[Optional[int], typer.Option(  # noqa: UP007
    "--workers", min=1, max=256, help="Workers of the process or ray executor. Default: the "
                                      "cores this process may use (ray with an address: the "
                                      "cluster's CPUs).")]
RayAddressOpt = Annotated[Optional[str], typer.Option(  # noqa: UP007
    "--ray-address", help="With --executor ray: join this running cluster (auto, or HOST:PORT "
                          "as `ray start --head` prints it) instead of starting a local Ray.")]


def print_report(doc: dict) -> None:
    """The stage table, notes and gates of a report: what `build` ends with and `report` shows."""
    from xcompile.render import render_table

    console.print(render_table(doc))
    for note in doc.get("notes", []):
        console.print(f"note: {escape(str(note))}", highlight=False)
    for g in doc.get("gates", []):
        mark = "[green]pass[/]" if g["passed"] else "[bold red]MISSED[/]"
        console.print(f"gate {escape(str(g['name']))}: {mark} — {escape(str(g['message']))}",
                      highlight=False)
