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
           ("score", "score", ".3f"), ("95% CI", "score_ci95", None), ("time s", "wall_s", ".1f"))
# The terminal table leaves out the runtime (report.md has it) and writes counts as 4.62M, 38.2k,
# so that it fits an 80-column terminal without cutting a number.
TERMINAL = {"stage": "stage", "params": "params", "bytes": "bytes", "MACs": "MACs",
            "p50 µs": "p50µs", "p99 µs": "p99µs", "score": "score", "95% CI": "95% CI",
            "time s": "time s"}    # column -> its terminal heading


def _si(v: float) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.0f}"


def _ci(v: Any, digits: int = 3) -> str:
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float))
                                                           for x in v):
        return f"{v[0]:.{digits}f}–{v[1]:.{digits}f}"
    return "—"


def _cells(s: Mapping[str, Any], compact: bool = False) -> list[str]:
    """One stage's row: full numbers for report.md, short ones (`compact`) for the terminal."""
    cells = []
    for head, key, fmt in COLUMNS:
        v = s.get(key)
        if compact and head not in TERMINAL:
            continue
        if s.get("skipped") and key not in ("name", "wall_s", "score"):
            cells.append("—")
        elif s.get("skipped") and key == "score":
            cells.append("skip" if compact else "skipped")
        elif key == "score_ci95":
            cells.append(_ci(v, 2 if compact else 3))
        elif v is None:
            cells.append("—")
        elif fmt == ",":
            cells.append(_si(float(v)) if compact else f"{int(v):,}")
        elif compact and key.startswith("latency") and float(v) >= 1000:
            cells.append(_si(float(v)))
        elif fmt:
            cells.append(format(float(v), fmt))
        else:
            cells.append(str(v))
    if s.get("cached"):
        cells[-1] = "cached" if compact else cells[-1] + " (cached)"
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
              collapse_padding=True, pad_edge=False, padding=(0, 1))
    for head, _, fmt in COLUMNS:
        if head in TERMINAL:
            t.add_column(TERMINAL[head], justify="left" if fmt is None else "right",
                         no_wrap=True)
    for s in report["stages"]:
        t.add_row(*_cells(s, compact=True))
    return t


def ratio_text(r: float | None, ci: list[float] | None) -> str:
    if r is None:
        return "n/a"
    return f"{r:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def render_fault_table(table: Mapping[str, Any]) -> list[str]:
    """Markdown lines: one row per fault, each policy's score [95%] and final / fat."""
    names = list(table["policies"])
    lines = ["| fault | detail | " + " | ".join(names) + " | final / fat [95%] |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for row in table["faults"]:
        if not row["applies"]:
            lines.append(f"| {row['fault']} | {row['detail']} | " + "n/a | " * len(names)
                         + "n/a |")
            continue
        cells = [f"{row[k]:.3f} [{row[k + '_ci95'][0]:.3f}, {row[k + '_ci95'][1]:.3f}]"
                 if row.get(k + "_ci95") else f"{row[k]:.3f}" for k in names]
        lines.append(f"| {row['fault']} | {row['detail']} | " + " | ".join(cells) + " | "
                     + ratio_text(row["final_over_fat"], row["final_over_fat_ci95"]) + " |")
    lines += ["", "Final / fat under faults (every faulted episode of every fault that applies, "
              "paired): " + ratio_text(table["final_over_fat_under_faults"],
                                   table["final_over_fat_under_faults_ci95"])]
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    lines = [f"# xcompile build: {report['robot']} on {report['hardware']}", "",
             f"Plan `{','.join(s['name'] for s in report['plan'])}`, seed {report['seed']}, "
             f"profile {report['profile']}, {report['episodes']} score episodes per stage "
             "(the same episodes for every stage; intervals: bootstrap 95% of the mean), "
             f"xcompile {report['xcompile_version']}.", "",
             "| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for s in report["stages"]:
        lines.append("| " + " | ".join(_cells(s)) + " |")
    final = report["final"]
    lines += ["", f"Final policy: `{final.get('policy')}` ({final['format']})."]
    if report.get("score_ratios"):
        lines += ["", "## Score ratios (paired, the same episodes)", "",
                  "| ratio | value | 95% CI |", "|---|---|---|"]
        lines += [f"| {r['final']} / {r['stage']} | {r['ratio']:.3f} | {_ci(r['ci95'])} |"
                  for r in report["score_ratios"]]
    if report.get("robustness"):
        rb = report["robustness"]
        lines += ["", "## Robustness: the fault suite", "",
                  f"Each policy on the same {rb['episodes']} report episodes per fault, "
                  "score [95%]; final / fat is the paired ratio.", ""]
        lines += render_fault_table(rb)
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
    """One figure, three charts per stage: bytes and p50 latency on log scales (a 500x ratio is
    visible), and the score with its 95% interval."""
    import matplotlib  # heavy: only when a build writes its plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in report["stages"] if not s["skipped"]]
    names = [s["name"] for s in stages]
    x = list(range(len(names)))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), constrained_layout=True)
    for ax, key, title in zip(axes, ("bytes", "latency_p50_us", "score"),
                              ("size (bytes, log)", "p50 latency (µs, log)", "score, 95% CI")):
        vals = [float(s[key]) if s[key] is not None else float("nan") for s in stages]
        if key == "score":
            lo = [v - s["score_ci95"][0] if _ci(s.get("score_ci95")) != "—" else 0.0
                  for v, s in zip(vals, stages)]
            hi = [s["score_ci95"][1] - v if _ci(s.get("score_ci95")) != "—" else 0.0
                  for v, s in zip(vals, stages)]
            ax.errorbar(x, vals, yerr=[lo, hi], fmt="o", color="#4c72b0", capsize=4)
            ax.set_ylim(0, 1.05)
        else:
            ax.bar(x, vals, color="#4c72b0")
            if any(v > 0 for v in vals):
                ax.set_yscale("log")
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    fig.suptitle(f"{report['robot']} on {report['hardware']}")
    fig.savefig(path, dpi=100)
    plt.close(fig)
