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
from typing import Any

import common
from quality import quality_plan

from xcompile.executors import make_executor
from xcompile.policy import load_policy
from xcompile.render import ratio_text
from xcompile.robustness import fault_table
from xcompile.targets import list_robots, load_robot

ROBUST = {"rl-finetune": {"faults": "suite"}, "distill": {"faults": "suite"}}


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
    # Each policy loaded once, scored under every fault (xcompile.robustness, as a build's report).
    policies = {k: load_policy(paths[k].path, robot).act for k in ("fat", "tuned", "final")
                if paths.get(k) is not None}
    table = fault_table(policies, robot, args.episodes, args.seed, stream=common.BENCH_STREAM)
    rows = []
    for c in table["faults"]:
        if not c["applies"]:
            rows.append([robot.name, c["fault"], c["detail"]] + ["n/a"] * 4)
            continue
        rows.append([robot.name, c["fault"], c["detail"], f"{c['fat']:.3f}",
                     f"{c['tuned']:.3f}" if "tuned" in c else "= fat (start kept)",
                     f"{c['final']:.3f}", ratio_text(c["final_over_fat"], c["final_over_fat_ci95"])])
    notes = [f"{robot.name}: {n}" for n in b.notes]
    return ({"robot": robot.name, "robust": bool(args.robust), "tuned_kept": kept,
             "stream": common.BENCH_STREAM, "seed": args.seed, "episodes": args.episodes,
             "final_over_fat_under_faults": table["final_over_fat_under_faults"],
             "final_over_fat_under_faults_ci95": table["final_over_fat_under_faults_ci95"],
             "faults": table["faults"]}, rows, notes)


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
                            ratio_text(res["final_over_fat_under_faults"],
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
