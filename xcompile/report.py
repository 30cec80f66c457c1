"""Build reports: report.json (stable keys), report.md, stages.png, rollout.gif, manifest.json.

`build_report` turns the pass manager's stage records into the report document; `write_outputs`
writes every output file of a build into a (temporary) folder; `render_table` draws the terminal
table from a report document, so `xcompile report DIR` shows exactly what the build showed.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xcompile import __version__
from xcompile.artifact import Artifact, file_sha256
from xcompile.errors import XCompileError

if TYPE_CHECKING:
    from rich.table import Table

    from xcompile.pipeline import Gates, PlanStep, StageRecord
    from xcompile.targets import HardwareTarget, RobotTarget

REPORT_VERSION = 1
MEASURE_KEYS = ("params", "bytes", "macs", "latency_p50_us", "latency_p99_us", "runtime", "score",
                "score_std")
STAGE_KEYS = ("name", "format", *MEASURE_KEYS, "wall_s", "cached", "skipped", "skip_reason",
              "checks")
VERSIONED = ("torch", "onnx", "onnxruntime", "pybullet", "numpy", "pydantic")


def stage_doc(rec: StageRecord) -> dict[str, Any]:
    m = rec.measurements
    doc: dict[str, Any] = {"name": rec.name, "format": rec.format}
    for k in MEASURE_KEYS:
        doc[k] = m.get(k)
    doc.update(wall_s=round(rec.wall_s, 3), cached=rec.cached, skipped=rec.skipped,
               skip_reason=rec.skip_reason, checks=dict(rec.checks))
    return doc


def _final_index(stages: list[dict[str, Any]]) -> int:
    return max(i for i, s in enumerate(stages) if not s["skipped"])


def evaluate_gates(stages: list[dict[str, Any]], gates: Gates) -> list[dict[str, Any]]:
    final = stages[_final_index(stages)]
    out = []

    def gate(name: str, limit: float, value: float | None, ok: bool, msg: str) -> None:
        out.append({"name": name, "limit": limit, "value": value, "passed": ok, "message": msg})

    if gates.max_latency_us is not None:
        v = final["latency_p99_us"]
        ok = v is not None and v <= gates.max_latency_us
        gate("max_latency_us", gates.max_latency_us, v, ok,
             f"p99 latency {_num(v)} µs vs limit {gates.max_latency_us:g} µs")
    if gates.max_size_kb is not None:
        v = None if final["bytes"] is None else final["bytes"] / 1000
        ok = v is not None and v <= gates.max_size_kb
        gate("max_size_kb", gates.max_size_kb, v, ok,
             f"size {_num(v)} kB vs limit {gates.max_size_kb:g} kB")
    if gates.min_score_ratio is not None:
        ref = next((s for s in stages if s["score"] is not None and not s["skipped"]), None)
        v = None
        if ref is not None and final["score"] is not None and ref["score"] > 0:
            v = final["score"] / ref["score"]
        ok = v is not None and v >= gates.min_score_ratio
        gate("min_score_ratio", gates.min_score_ratio, v, ok,
             f"score ratio {_num(v)} (final {_num(final['score'])} / "
             f"{ref['name'] if ref else '?'} {_num(ref['score'] if ref else None)}) vs minimum "
             f"{gates.min_score_ratio:g}")
    return out


def _finetune_notes(stages: list[dict[str, Any]]) -> list[str]:
    """What RL fine-tuning added over the pinned policy (zero-shot or not), in words."""
    by = {s["name"]: s for s in stages if not s["skipped"]}
    pin, rl = by.get("pin-embodiment"), by.get("rl-finetune")
    if not pin or not rl or pin["score"] is None or rl["score"] is None:
        return []
    known = pin["checks"].get("known_body")
    body = ("a body the fat policy was trained on" if known else
            "a body the fat policy never saw (zero-shot)" if known is False else "this body")
    c = rl["checks"]
    kept = (f"; the pass kept the {c['kept']} policy (held-out seeds: start "
            f"{c['score_start']:.3f}, tuned {c['score_tuned']:.3f})" if "kept" in c else "")
    return [f"RL fine-tuning on {body}: pinned {pin['score']:.3f} → tuned {rl['score']:.3f} "
            f"({rl['score'] - pin['score']:+.3f}) on the report's episodes{kept}"]


def _int8_notes(stages: list[dict[str, Any]]) -> list[str]:
    """What form quantize's int8 took, in words."""
    q = next((s for s in stages if s["name"] == "quantize" and not s["skipped"]), None)
    c = q["checks"] if q else {}
    if c.get("precision") != "int8" or "activations" not in c:
        return []
    form = ("int8 weights and int8 activations" if c["activations"] == "int8" else
            "int8 weights, float activations (weight-only: the weights stay int8 in the file and "
            "are folded to float when onnxruntime loads it)")
    first = {"float": "; the first layer in float",
             "fp16": "; the first layer's weights in fp16"}.get(c.get("input_layer"), "")
    tried = (" (closed-loop scores of what `auto` tried: " + ", ".join(
        f"{k} {v:.3f}" for k, v in c["auto_scores"].items()) + ")") if c.get("auto_scores") else ""
    return [f"int8: {form}{first}{tried}"]


def build_report(robot: RobotTarget, hardware: HardwareTarget, plan: Sequence[PlanStep],
                 records: Sequence[StageRecord], *, seed: int, profile: str, episodes: int,
                 gates: Gates, runtime_floor_us: float | None) -> dict[str, Any]:
    stages = [stage_doc(r) for r in records]
    fi = _final_index(stages)
    final = dict(stages[fi])
    final["policy"] = policy_file_name(records[fi].artifact) if records[fi].artifact else None
    notes = []
    for s in stages:
        if s["skipped"]:
            notes.append(f"{s['name']} skipped: {s['skip_reason']}")
    for r in records:
        bad = r.measurements.get("nonfinite_action_episodes")
        if bad:
            notes.append(f"{r.name}: the policy emitted NaN/Inf actions in {bad} of {episodes} "
                         "score episodes (those episodes score 0)")
    notes += _finetune_notes(stages) + _int8_notes(stages)
    p50 = final["latency_p50_us"]
    if p50 is not None and p50 > hardware.latency_budget_us:
        notes.append(f"final p50 latency {p50:.1f} µs is over {hardware.name}'s budget of "
                     f"{hardware.latency_budget_us:g} µs")
    for step in plan:
        prec = step.config.model_dump().get("precision")
        if step.name == "quantize" and prec and prec not in hardware.precisions:
            notes.append(f"{prec} is not among {hardware.name}'s fast precisions "
                         f"({', '.join(hardware.precisions)})")
    if runtime_floor_us is not None:
        notes.append(f"latency includes the runtime's per-call overhead: onnxruntime runs an "
                     f"empty graph in {runtime_floor_us:.1f} µs (p50) on this machine")
    return {
        "report_version": REPORT_VERSION,
        "xcompile_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "robot": robot.name,
        "hardware": hardware.name,
        "plan": [s.to_json() for s in plan],
        "seed": seed,
        "profile": profile,
        "episodes": episodes,
        "stages": stages,
        "runtime_floor_us": runtime_floor_us,
        "gates": evaluate_gates(stages, gates),
        "final": final,
        "notes": notes,
    }


def policy_file_name(art: Artifact) -> str:
    return {"onnx": "policy.onnx", "tensorrt": "policy.plan"}.get(
        art.format, "policy" + "".join(art.path.suffixes))


def write_outputs(out: Path, report: dict[str, Any], records: Sequence[StageRecord],
                  inp: Artifact, robot: RobotTarget, hardware: HardwareTarget,
                  plan: Sequence[PlanStep], *, seed: int, profile: str, episodes: int,
                  rollout: bool = True, extra_manifest: Mapping[str, Any] | None = None) -> None:
    """Write every output of a build into the folder `out` (which the caller swaps into place)."""
    arts = [r.artifact for r in records if r.artifact is not None and not r.skipped]
    final = arts[-1]
    onnx = next((a for a in reversed(arts) if a.format == "onnx"), None)
    if onnx is not None:
        shutil.copyfile(onnx.path, out / "policy.onnx")
    if final.format == "tensorrt":
        shutil.copyfile(final.path, out / "policy.plan")
    elif final.format not in ("onnx",):
        shutil.copyfile(final.path, out / policy_file_name(final))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    plot_stages(report, out / "stages.png")
    for art in arts:   # a stage's own plots, named in its meta relative to its folder (rl-finetune)
        png = art.meta.get("learning_curve_png")
        if png and (art.path.parent / png).is_file():
            shutil.copyfile(art.path.parent / png, out / "learning_curve.png")
    if rollout and onnx is not None:
        from xcompile.evaluate import rollout_gif
        from xcompile.policy import load_policy

        rollout_gif(load_policy(out / "policy.onnx", robot).act, robot, out / "rollout.gif",
                    seed=seed)
    manifest = build_manifest(out, inp, robot, hardware, plan, seed=seed, profile=profile,
                              episodes=episodes)
    manifest.update(extra_manifest or {})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def lib_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

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
    if urdf.is_file():
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


# --------------------------------------------------------------------------------------------
# rendering


def _num(v: Any, fmt: str = ".3g") -> str:
    if v is None:
        return "—"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float):
        return format(v, fmt)
    return str(v)


COLUMNS = (("stage", "name", None), ("params", "params", ","), ("bytes", "bytes", ","),
           ("MACs", "macs", ","), ("p50 µs", "latency_p50_us", ".1f"),
           ("p99 µs", "latency_p99_us", ".1f"), ("runtime", "runtime", None),
           ("score", "score", ".3f"), ("time s", "wall_s", ".1f"))


def _cells(s: dict[str, Any], compact: bool = False) -> list[str]:
    if s.get("skipped"):
        return [s["name"], *(["—"] * (len(COLUMNS) - 3)), "skipped", f"{s['wall_s']:.1f}"]
    cells = []
    for _, key, fmt in COLUMNS:
        v = s.get(key)
        if v is None:
            cells.append("—")
        elif fmt == ",":
            cells.append(f"{int(v):,}")
        elif fmt:
            cells.append(format(float(v), fmt))
        else:
            cells.append(str(v))
    if s.get("score") is not None and s.get("score_std") is not None and not compact:
        cells[7] += f" ± {float(s['score_std']):.3f}"
    if s.get("cached"):
        cells[8] = "cached" if compact else cells[8] + " (cached)"
    return cells


def read_report(build_dir: Path) -> dict[str, Any]:
    """A build folder's report.json, checked to be one that `render_table` can show."""
    path = Path(build_dir) / "report.json"
    try:
        if path.stat().st_size > 50_000_000:
            raise XCompileError(f"{path} is over 50 MB: not an xcompile build report")
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise XCompileError(f"{path} does not exist: give the --out folder of a build") from None
    except (OSError, ValueError) as e:
        raise XCompileError(f"{path} is not valid JSON ({e})") from None
    problem = _report_problem(doc)
    if problem is None:
        try:
            render_table(doc)
            render_markdown(doc)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            problem = f"{type(e).__name__}: {e}"
    if problem:
        raise XCompileError(f"{path} is not an xcompile build report ({problem}); give the "
                            "--out folder of a build")
    return doc


def _report_problem(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return "not a JSON object"
    for key, typ in (("robot", str), ("hardware", str), ("plan", list), ("stages", list),
                     ("notes", list), ("gates", list), ("final", dict)):
        if not isinstance(doc.get(key), typ):
            return f"'{key}' is missing or not a {typ.__name__}"
    if not doc["stages"] or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                    for s in doc["stages"]):
        return "'stages' must be a non-empty list of stages with names"
    if not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in doc["plan"]):
        return "'plan' must list passes with names"
    if not all(isinstance(g, dict) and {"name", "passed", "message"} <= set(g)
               for g in doc["gates"]):
        return "'gates' entries need name, passed and message"
    return None


def render_table(report: Mapping[str, Any]) -> Table:
    from rich import box
    from rich.table import Table

    floor = report.get("runtime_floor_us")
    caption = (f"onnxruntime empty-graph floor on this machine: {floor:.1f} µs per call"
               if floor is not None else None)
    t = Table(title=f"{report['robot']} on {report['hardware']}: "
                    f"{','.join(s['name'] for s in report['plan'])}",
              caption=caption, caption_justify="left", box=box.SIMPLE_HEAD,
              collapse_padding=True, pad_edge=False)
    for head, _, fmt in COLUMNS:
        t.add_column(head, justify="left" if fmt is None else "right", no_wrap=head == "stage")
    for s in report["stages"]:
        t.add_row(*_cells(s, compact=True))
    return t


def render_markdown(report: Mapping[str, Any]) -> str:
    lines = [f"# xcompile build: {report['robot']} on {report['hardware']}", "",
             f"Plan `{','.join(s['name'] for s in report['plan'])}`, seed {report['seed']}, "
             f"profile {report['profile']}, {report['episodes']} score episodes per stage, "
             f"xcompile {report['xcompile_version']}.", "",
             "| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for s in report["stages"]:
        lines.append("| " + " | ".join(_cells(s)) + " |")
    final = report["final"]
    lines += ["", f"Final policy: `{final.get('policy')}` ({final['format']})."]
    if report["gates"]:
        lines += ["", "## Gates", ""]
        lines += [f"- {'pass' if g['passed'] else '**MISSED**'}: {g['message']}"
                  for g in report["gates"]]
    checks = [(s["name"], s["checks"]) for s in report["stages"] if s["checks"]]
    if checks:
        lines += ["", "## Checks", ""]
        for name, c in checks:
            lines.append(f"- {name}: " + ", ".join(f"{k} = {_num(v)}" for k, v in c.items()))
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    plots = "`stages.png`" + (", `learning_curve.png` (rl-finetune)"
                              if any("rl-finetune" == s["name"] for s in report["stages"]) else "")
    lines += ["", f"Plots: {plots}. Rollout of the final policy: `rollout.gif`.", ""]
    return "\n".join(lines)


def plot_stages(report: Mapping[str, Any], path: Path) -> None:
    """One figure, three bar charts: bytes, p50 latency and score per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in report["stages"] if not s["skipped"]]
    names = [s["name"] for s in stages]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), constrained_layout=True)
    for ax, key, title in zip(axes, ("bytes", "latency_p50_us", "score"),
                              ("size (bytes)", "p50 latency (µs)", "score")):
        vals = [float(s[key]) if s[key] is not None else 0.0 for s in stages]
        ax.bar(range(len(names)), vals, color="#4c72b0")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        positive = [v for v in vals if v > 0]
        if key == "bytes" and positive and max(positive) / min(positive) > 50:
            ax.set_yscale("log")   # a fat checkpoint dwarfs the slim stages
        if key == "score":
            ax.set_ylim(0, 1.05)
    fig.suptitle(f"{report['robot']} on {report['hardware']}")
    fig.savefig(path, dpi=100)
    plt.close(fig)
