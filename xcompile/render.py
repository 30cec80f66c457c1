"""Rendering a build report: the terminal table, report.md and the stage plots.

Everything here reads a report document (`xcompile.report.build_report`, or a report.json read
back), so `xcompile report DIR` shows exactly what the build showed. It knows no pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table


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
    plots = ", ".join(["`stages.png`"] + [f"`{f}` ({stage})" for f, stage in
                                          report.get("files", {}).items() if f.endswith(".png")])
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
