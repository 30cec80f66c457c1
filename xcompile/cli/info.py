"""Commands that describe: targets, inspect, passes, report, and convert (a checkpoint's format).

Heavy libraries (torch, onnxruntime, pybullet) and the modules that import them load inside each
command, so `xcompile --help` answers at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from xcompile.cli.common import JsonOpt, app, console, print_json, print_report, user_errors


@app.command()
def targets(as_json: JsonOpt = False) -> None:
    """List the built-in robots (quadrotors included) and hardware targets.

    Example: xcompile targets --json
    """
    from xcompile.targets import (
        list_airframes,
        list_hardware,
        list_robots,
        load_hardware,
        load_robot,
    )

    with user_errors():
        robots = [load_robot(n) for n in list_robots() + list_airframes()]
        hws = [load_hardware(n) for n in list_hardware()]
    if as_json:
        print_json({
            "robots": [{"name": r.name, "family": r.family, "joints": r.n_joints,
                        "actuators": r.actuators,
                        "control_hz": r.control_hz, "hardware": r.hardware,
                        "description": r.description} for r in robots],
            "hardware": [h.model_dump(exclude={"source"}) for h in hws],
        })
        return
    t = Table(title="robots")
    for c in ("name", "task", "actuators", "control Hz", "hardware", "description"):
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
    checkpoint: Annotated[Path, typer.Argument(
        help="Fat policy: an xcompile checkpoint (.pt or .safetensors), or a foreign one (.onnx "
             "or torch.export .pt2).")],
    interface: Annotated[Path | None, typer.Option(
        "--interface", help="Interface description of a foreign fat policy (TOML): with it, each "
                            "body's share is measured by pinning the graph for it.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show what a fat policy holds: bodies, parameters, bytes, what each body uses.

    Like `lipo -info` for a fat binary. Examples: xcompile inspect examples/fat_policy.pt;
    xcompile inspect hpt.onnx --interface fat.toml
    """
    from xcompile.errors import CheckpointError
    from xcompile.frontends import FOREIGN_SUFFIXES

    foreign = checkpoint.suffix in FOREIGN_SUFFIXES
    with user_errors():
        if interface is not None and not foreign:
            raise CheckpointError(f"{checkpoint}: --interface describes a foreign fat policy "
                                  "(.onnx or .pt2); an xcompile checkpoint describes itself")
        if foreign:
            from xcompile.frontends.measure import inspect_graph

            info = inspect_graph(checkpoint, interface)
        else:
            from xcompile.models.checkpoint import inspect_checkpoint, load_checkpoint

            info = inspect_checkpoint(load_checkpoint(checkpoint))
    if as_json:
        print_json(info)
        return
    head = info["format"] if foreign else f"{info['format']} v{info['version']}"
    console.print(f"[bold]{checkpoint}[/]: {head}, {info['params_total']:,} parameters, "
                  f"{info['bytes']:,} bytes, sha256 {info['sha256'][:12]}")
    if foreign:
        for kind in ("inputs", "outputs"):
            console.print(f"{kind}: " + ", ".join(f"{g['name']} {g['dtype']}{g['shape']}"
                                                   for g in info[kind]), highlight=False)
        if interface is None:
            console.print("(give --interface to see what each body keeps after pinning)")
            return
        for s in info["recurrent"]:
            console.print(f"recurrent state: {s['input']} -> {s['output']} {s['dtype']}"
                          f"{s['shape']}, reset {'zeros' if s['reset'] == 'zeros' else 'given'}",
                          highlight=False)
        if not info["bodies"]:
            console.print(f"no embodiment input: serves any {info['family']} target")
            return
    else:
        cfg = info["config"]
        console.print(f"architecture: transformer d_model={cfg['d_model']} "
                      f"layers={cfg['n_layers']} heads={cfg['n_heads']} "
                      f"families={sorted(cfg['global_dims'])}")
    t = Table(title=f"{len(info['bodies'])} bodies")
    for c in ("body", "task", "joints", "params used", "share of network"):
        t.add_column(c)
    for b in info["bodies"]:
        t.add_row(b["name"], b["family"], "?" if b["n_joints"] is None else str(b["n_joints"]),
                  f"{b['params_used']:,}", f"{100 * b['fraction_used']:.1f}%")
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

    with user_errors():
        out = convert_checkpoint(source, dest, overwrite=overwrite)
    console.print(f"wrote {dest} ({out.n_bytes:,} bytes, {len(out.registry)} bodies, "
                  f"sha256 {out.sha256[:12]}); weights identical to {source}", highlight=False)


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
            "input_formats": {f: cls.output_for(f) for f in cls.takes()},
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
        print_json({"default_plan": DEFAULT_PLAN, "passes": infos})
        return
    console.print(f"default plan: [bold]{','.join(DEFAULT_PLAN)}[/]\n", highlight=False)
    for p in infos:
        flow = ", ".join(f"{a} → {b}" for a, b in p["input_formats"].items())
        console.print(f"[bold]{p['name']}[/] ({flow}, "
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

    with user_errors():
        doc = read_report(build_dir)
    if as_json:
        print_json(doc)
        return
    print_report(doc)
