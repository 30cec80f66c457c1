"""The learning-curve plot of rl-finetune: env steps against the score and return of PPO's
training episodes (without PPO: the gain search's generations against their candidates' scores),
with the held-out scores of the start and the kept policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_learning_curve(curve: list[dict[str, Any]], summary: dict[str, Any], path: Path,
                        title: str) -> None:
    """Env steps vs mean training-episode score (left axis) and return (right axis)."""
    import matplotlib  # heavy: only when a curve is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), constrained_layout=True)
    pts = [(r["env_steps"], r["score"], r["return"]) for r in curve if r["score"] is not None]
    extra: list[Any] = []
    if pts:
        x, sc, ret = zip(*pts)
        ax.plot(x, sc, "o-", color="#4c72b0", label="score (training episodes)")
        ax2 = ax.twinx()
        extra = ax2.plot(x, ret, "s--", color="#dd8452", label="return (training episodes)")
        ax2.set_ylabel("return", color="#dd8452")
    search = summary.get("search") or []
    if not pts and search:
        gens = [r["iteration"] for r in search]
        ax.plot(gens, [r["score_center"] for r in search], "o-", color="#4c72b0",
                label="search: current gains")
        ax.plot(gens, [r["score_best"] for r in search], "s--", color="#dd8452",
                label="search: best candidate")
    warm = [r["env_steps"] for r in curve if r["phase"] == "warmup"]
    if warm:
        ax.axvspan(0, max(warm), color="0.9", label="critic warm-up")
    ax.axhline(summary["score_start"], color="0.4", ls=":", label="start, held-out")
    ax.axhline(summary["score_tuned"], color="#55a868", ls=":", label=f"{summary['kept']}, held-out")
    ax.set_xlabel("env steps" if pts or not search else "gain-search iteration")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.05)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles + extra, labels + [h.get_label() for h in extra], loc="lower right",
              fontsize=7)
    ax.set_title(f"{title} (kept: {summary['kept']})")
    fig.savefig(path, dpi=100)
    plt.close(fig)
