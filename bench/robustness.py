"""Does compilation keep the fat policy's fault tolerance? Scores under the fault suite.

The slim int8 policy is built as bench/quality.py builds it (same plan, options, profile (fast by
default; `--profile`) and cache, so a quality run makes the default build here cheap), or, with
`--robust`, as `xcompile build --robust` builds it (rl-finetune and distill train under the fault
suite). Three stages are then scored, nominally and under each fault, on the same episodes:
the fat network, the tuned policy (rl-finetune's output; when its guard kept the start, that is
the pinned network, equal to the fat one, and is not scored again) and the final int8 policy.
Episodes 0..n-1 of seed stream "bench" (xcompile/seeds.py), which no build trains, checks or
reports on.

The faults are xcompile's fault suite (`xcompile.sim.fault_suite`, the same that `xcompile eval
--fault NAME` runs): a locked joint (joint 2 held at its default angle), one weak leg (a
quadruped's first leg, an arm's joint 1, at 55% torque), a payload (+25% of the body's mass on
the base; "n/a" on a fixed-base arm, whose base does not move), actions one control step late,
and observation noise (std 0.05 on every entry).

Per cell: each stage's score and interval, and final / fat on the same episodes (paired ratio and
its bootstrap 95% interval, `xcompile.stats.ratio_ci95`). Per robot, "final / fat under faults":
the final policy's score over every faulted episode of every applicable fault over the fat
policy's on the same episodes (the issue's "keeps at least 90% of the fat policy's score,
averaged over faults"), with its paired interval.

    python bench/robustness.py --profile default --episodes 30 --workers 2
    python bench/robustness.py --profile default --episodes 30 --workers 2 --robust
    python bench/robustness.py --quick --robots a1    # < 2 min: the test suite runs this
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import common
import numpy as np
from quality import quality_plan

from xcompile.evaluate import torch_single_thread
from xcompile.executors import make_executor
from xcompile.policy import load_policy
from xcompile.sim.env import Faults
from xcompile.sim.fault_suite import fault_suite
from xcompile.stats import mean_ci95, ratio_ci95
from xcompile.targets import RobotTarget, list_robots, load_robot

ROBUST = {"rl-finetune": {"faults": "suite"}, "distill": {"faults": "suite"}}


def score(act: Any, robot: RobotTarget, episodes: int, seed: int,
          faults: Faults | None) -> list[float]:
    """Per-episode scores of the batch policy `act` on episodes 0..episodes-1 of the "bench"
    seed stream (None: no fault)."""
    from xcompile.evaluate import evaluate

    with torch_single_thread():
        return evaluate(act, robot, episodes=episodes, seed=seed, faults=faults,
                        stream=common.BENCH_STREAM).scores


def _cell(scores: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, s in scores.items():
        out[k] = round(float(np.mean(s)), 4)
        out[f"{k}_ci95"] = mean_ci95(s)
        out[f"{k}_scores"] = [round(x, 4) for x in s]
    out["final_over_fat"], out["final_over_fat_ci95"] = ratio_ci95(scores["final"], scores["fat"])
    return out


def bench_robot(args: Any, robot_name: str, names: list[str]
                ) -> tuple[dict[str, Any], list[list[str]], list[str]]:
    robot = load_robot(robot_name)
    options = {"quantize": {"precision": "int8"}, **(ROBUST if args.robust else {})}
    b = common.build(args.checkpoint, robot, names, quick=args.quick, work_dir=args.work_dir,
                     tag="quality-robust" if args.robust else "quality", seed=args.seed,
                     episodes=0, options=options, profile=args.profile)
    if b.error:
        return ({"robot": robot.name, "error": b.error},
                [[robot.name, f"build failed: {b.error}"] + [""] * 6], [])
    tuned_row = b.row("rl-finetune")
    kept = (tuned_row or {}).get("checks", {}).get("kept", "start")
    paths = {"fat": b.artifact("fat"), "final": b.artifact("quantize")}
    if kept != "start":     # "calibrated" or "tuned": rl-finetune changed the policy
        paths["tuned"] = b.artifact("rl-finetune")
    # Each policy loaded once, scored under every fault.
    policies = {k: load_policy(a.path, robot).act for k, a in paths.items() if a is not None}
    cells, rows, faulted = [], [], {k: [] for k in policies}
    for fault in [None, *fault_suite(robot)]:
        name = "none (nominal)" if fault is None else fault.name
        detail = "" if fault is None else fault.detail
        if fault is not None and fault.faults is None:
            cells.append({"fault": name, "detail": detail, "applies": False})
            rows.append([robot.name, name, detail] + ["n/a"] * 4)
            continue
        faults = None if fault is None else fault.faults
        got = {k: score(act, robot, args.episodes, args.seed, faults)
               for k, act in policies.items()}
        if fault is not None:
            for k, s in got.items():
                faulted[k] += s
        c = _cell(got)
        cells.append({"fault": name, "detail": detail, "applies": True,
                      "faults": asdict(faults) if faults else None, **c})
        rows.append([robot.name, name, detail, f"{c['fat']:.3f}",
                     f"{c['tuned']:.3f}" if "tuned" in c else "= fat (start kept)",
                     f"{c['final']:.3f}", _ratio(c["final_over_fat"], c["final_over_fat_ci95"])])
    under = ratio_ci95(faulted["final"], faulted["fat"])
    notes = [f"{robot.name}: {n}" for n in b.notes]
    return ({"robot": robot.name, "robust": bool(args.robust), "tuned_kept": kept,
             "stream": common.BENCH_STREAM, "seed": args.seed, "episodes": args.episodes,
             "final_over_fat_under_faults": under[0],
             "final_over_fat_under_faults_ci95": under[1], "faults": cells}, rows, notes)


def _ratio(r: float | None, ci: list[float] | None) -> str:
    if r is None:
        return "n/a"
    return f"{r:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _job(job: tuple[Any, str, list[str]]):
    return bench_robot(*job)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__.split("\n\n")[0], list_robots(), default_profile="fast")
    ap.add_argument("--episodes", type=int, default=None,
                    help="episodes per stage per fault (default 10; quick 2)")
    ap.add_argument("--robust", action="store_true",
                    help="build as `xcompile build --robust` (training under the fault suite)")
    ap.add_argument("--workers", type=int, default=1,
                    help="robots at once, one process each (default 1)")
    robust = ap.parse_known_args(argv)[0].robust
    args = common.parse(ap, argv, "robustness-robust" if robust else "robustness")
    args.episodes = args.episodes or (2 if args.quick else 10)
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    started = time.perf_counter()
    names, notes = quality_plan()
    with make_executor("process" if args.workers > 1 else "serial",
                       args.workers if args.workers > 1 else None) as ex:
        outs = ex.map(_job, [(args, robot, names) for robot in args.robots])
    results, rows, summary = [], [], []
    for res, r_rows, n in outs:
        results.append(res)
        rows += r_rows
        notes += n
        if "error" not in res:
            summary.append([res["robot"], res["tuned_kept"],
                            _ratio(res["final_over_fat_under_faults"],
                                   res["final_over_fat_under_faults_ci95"])])
    build = "robust (`--robust`)" if args.robust else "default"
    md = (f"{build} builds; scores in [0, 1], mean of {args.episodes} episodes per cell (episodes "
          f"0..{args.episodes - 1} of seed stream `{common.BENCH_STREAM}`, seed {args.seed}: the "
          f"same episodes in every cell, none that a build trained, checked or reported on); "
          f"final = plan `{','.join(names)}`"
          f"{' (quick budgets)' if args.quick else f', profile {args.profile}'}.\n\n"
          + common.md_table(["robot", "rl-finetune kept", "final / fat under faults [95%]"],
                            summary) + "\n\n"
          + common.md_table(["robot", "fault", "detail", "fat", "tuned", "final int8",
                             "final / fat [95%]"], rows))
    return common.finish(args, "robustness-robust" if robust else "robustness", results, md,
                         notes, started)


if __name__ == "__main__":
    main()
