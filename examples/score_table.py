"""The score table of examples/README.md: each robot's expert, the sample fat policy, and two
damaged copies of the fat policy (its actions x 0.7; one joint's action held at 0), all on the same
held-out episodes, with bootstrap 95% intervals.

Held out: the "bench" seed stream (xcompile/seeds.py), which no training, tuning, pass check or
build report uses. Every row of a robot is scored on the same episodes, so the comparisons are
paired; the table can tell good from worse where the intervals do not overlap.

    python examples/score_table.py --episodes 50 --workers 2 --json bench/results/score_table.json
"""

from __future__ import annotations

import argparse
import json
import sys
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from xcompile.evaluate import EvalResult, score_policy
from xcompile.policy import load_policy
from xcompile.sim.experts import evaluate_expert
from xcompile.stats import mean_ci95
from xcompile.targets import list_robots, load_robot

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sabotage import scaled, zero_joint  # noqa: E402  (the tests' damaged policies)

STREAM = "bench"


def _row(res: EvalResult) -> dict:
    d = res.as_dict()
    keep = ("score", "score_ci95", "falls", "episodes", "success_rate", "vel_error_mps",
            "yaw_rate_error_rps", "cost_of_transport", "reach_error_mm", "time_to_1cm_s",
            "scores")
    return {k: d[k] for k in keep if k in d}


def score_robot(job: tuple[str, str, int, int]) -> dict:
    name, ckpt, episodes, seed = job
    import torch

    torch.set_num_threads(1)
    robot = load_robot(name)
    fat = load_policy(ckpt, robot).act
    rows = {"expert": evaluate_expert(robot, episodes, seed, stream=STREAM)}
    for label, act in (("fat", fat), ("fat, actions x 0.7", scaled(fat)),
                       ("fat, joint 1 held at 0", zero_joint(fat))):
        rows[label] = score_policy(act, robot, episodes, seed, stream=STREAM)
    out = {"robot": name, "family": robot.family, **{k: _row(v) for k, v in rows.items()}}
    ex, ft = np.array(rows["expert"].scores), np.array(rows["fat"].scores)
    out["fat_over_expert"] = float(ft.mean() / max(ex.mean(), 1e-9))
    out["fat_minus_expert_ci95"] = mean_ci95(list(ft - ex))
    print(f"{name}: expert {ex.mean():.3f} fat {ft.mean():.3f}", file=sys.stderr, flush=True)
    return out


def _ci(v: dict) -> str:
    lo, hi = v["score_ci95"]
    return f"{v['score']:.3f} [{lo:.2f}, {hi:.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", default="examples/fat_policy.pt")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--robots", nargs="*", default=list_robots())
    ap.add_argument("--workers", type=int, default=1, help="robots scored at once (processes)")
    ap.add_argument("--json", help="also write every figure (and per-episode scores) here")
    a = ap.parse_args()
    jobs = [(n, a.checkpoint, a.episodes, a.seed) for n in a.robots]
    if a.workers > 1:
        with get_context("spawn").Pool(a.workers) as pool:
            rows = pool.map(score_robot, jobs, chunksize=1)
    else:
        rows = [score_robot(j) for j in jobs]
    print(f"Held-out episodes: {a.episodes} per row, seed stream {STREAM!r}, seed {a.seed}; "
          "score [bootstrap 95% interval].\n")
    print("| robot | expert | fat | fat / expert | fat, actions x 0.7 | fat, joint 1 held at 0 "
          "| falls (expert / fat) | fat: physical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        fat = r["fat"]
        phys = (f"{fat['vel_error_mps']:.2f} m/s, {fat['yaw_rate_error_rps']:.2f} rad/s off"
                if r["family"] == "locomotion" else
                f"{fat['reach_error_mm']:.1f} mm at goal end")
        print(f"| {r['robot']} | {_ci(r['expert'])} | {_ci(fat)} | {r['fat_over_expert']:.2f} | "
              f"{_ci(r['fat, actions x 0.7'])} | {_ci(r['fat, joint 1 held at 0'])} | "
              f"{r['expert']['falls']} / {fat['falls']} | {phys} |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"episodes": a.episodes, "seed": a.seed,
                                            "stream": STREAM, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
