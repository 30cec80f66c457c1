"""Does the slim policy keep the fat policy's robustness? Scores under the faults a robot meets.

The slim int8 policy is built exactly as bench/quality.py builds it (same plan, options, profile
(fast by default; `--profile`) and cache, so a quality run makes this one cheap). The fat network
and the slim one are then scored here, nominally and under each fault, on the same episodes:
episodes 0..n-1 of seed stream "bench" (xcompile/seeds.py; xcompile.evaluate.evaluate with
xcompile.sim.env.Faults), which no build trains, checks or reports on. (The build's own report
scores, on its "report" stream, are kept in the JSON as `nominal_report`.)

The faults are xcompile's fault suite (`xcompile.sim.fault_suite`, the same that `xcompile eval
--fault NAME` runs): a locked joint (joint 2 held at its default angle), one weak leg (a
quadruped's first leg, an arm's joint 1, at 55% torque), a payload (+25% of the body's mass on
the base; "n/a" on a fixed-base arm, whose base does not move), actions one control step late,
and observation noise (std 0.05 on every entry).

Retained = faulted score / nominal score of the same policy, on the same episodes (a paired ratio:
the JSON gives its bootstrap 95% interval, `xcompile.stats.ratio_ci95`, and each score's,
`mean_ci95`). "slim keeps" = slim retained / fat retained: 1.0 means the slim policy loses
exactly what the fat one loses under that fault, below 1 that compilation made it more fragile.

    python bench/robustness.py                        # all 8 robots, 10 episodes per cell
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
from xcompile.sim.env import Faults
from xcompile.sim.fault_suite import fault_suite
from xcompile.stats import mean_ci95, ratio_ci95
from xcompile.targets import RobotTarget, list_robots, load_robot


def score(path: Any, robot: RobotTarget, episodes: int, seed: int,
          faults: Faults | None) -> list[float]:
    """Per-episode scores of the policy at `path` on episodes 0..episodes-1 of the "bench" seed
    stream (None: no fault)."""
    from xcompile.evaluate import evaluate
    from xcompile.policy import load_policy

    policy = load_policy(path, robot)
    with torch_single_thread():
        return evaluate(policy.act, robot, episodes=episodes, seed=seed, faults=faults,
                        stream=common.BENCH_STREAM).scores


def _mean(scores: list[float]) -> float:
    return float(np.mean(scores))


def bench_robot(args: Any, robot_name: str, names: list[str]) -> tuple[dict[str, Any], list[Any],
                                                                          list[str]]:
    robot = load_robot(robot_name)
    b = common.build(args.checkpoint, robot, names, quick=args.quick, work_dir=args.work_dir,
                     tag="quality", seed=args.seed, episodes=args.episodes,
                     options={"quantize": {"precision": "int8"}}, profile=args.profile)
    if b.error:
        return ({"robot": robot.name, "error": b.error},
                [[robot.name, f"build failed: {b.error}"] + [""] * 7], [])
    fat_art, slim_art = b.artifact("fat"), b.artifact("quantize")
    assert fat_art is not None and slim_art is not None
    report_nom = {"fat": b.row("fat")["score"],                      # type: ignore[index]
                  "slim_int8": b.row("quantize")["score"]}           # type: ignore[index]
    fat_nom_s = score(fat_art.path, robot, args.episodes, args.seed, None)
    slim_nom_s = score(slim_art.path, robot, args.episodes, args.seed, None)
    fat_nom, slim_nom = _mean(fat_nom_s), _mean(slim_nom_s)
    cells, rows = [], []
    one = common.fmt(common.ratio(fat_nom, fat_nom), ".2f")
    rows.append([robot.name, "none (nominal)", "", common.fmt(fat_nom, ".3f"),
                 common.fmt(slim_nom, ".3f"), one, common.fmt(common.ratio(slim_nom, slim_nom),
                                                              ".2f"), one,
                 common.fmt(common.ratio(slim_nom, fat_nom), ".2f")])
    for fault in fault_suite(robot):
        name, faults, detail = fault.name, fault.faults, fault.detail
        if faults is None:
            cells.append({"fault": name, "detail": detail, "applies": False})
            rows.append([robot.name, name, detail] + ["n/a"] * 6)
            continue
        fat_ss = score(fat_art.path, robot, args.episodes, args.seed, faults)
        slim_ss = score(slim_art.path, robot, args.episodes, args.seed, faults)
        fat_s, slim_s = _mean(fat_ss), _mean(slim_ss)
        fat_ret, slim_ret = common.ratio(fat_s, fat_nom), common.ratio(slim_s, slim_nom)
        keeps = common.ratio(slim_ret, fat_ret)
        cells.append({"fault": name, "detail": detail, "applies": True, "faults": asdict(faults),
                      "fat": fat_s, "slim_int8": slim_s,
                      "fat_ci95": mean_ci95(fat_ss), "slim_int8_ci95": mean_ci95(slim_ss),
                      "fat_scores": [round(x, 4) for x in fat_ss],
                      "slim_int8_scores": [round(x, 4) for x in slim_ss],
                      "fat_retained": fat_ret, "slim_retained": slim_ret,
                      "fat_retained_ci95": ratio_ci95(fat_ss, fat_nom_s)[1],
                      "slim_retained_ci95": ratio_ci95(slim_ss, slim_nom_s)[1],
                      "slim_keeps_of_fat": keeps,
                      "slim_over_fat": common.ratio(slim_s, fat_s),
                      "slim_over_fat_ci95": ratio_ci95(slim_ss, fat_ss)[1]})
        rows.append([robot.name, name, detail, common.fmt(fat_s, ".3f"), common.fmt(slim_s, ".3f"),
                     common.fmt(fat_ret, ".2f"), common.fmt(slim_ret, ".2f"),
                     common.fmt(keeps, ".2f"), common.fmt(common.ratio(slim_s, fat_s), ".2f")])
    notes = [f"{robot.name}: {n}" for n in b.notes]
    if not fat_nom:
        notes.append(f"{robot.name}: the fat policy scores 0 nominally; retention is undefined")
    return ({"robot": robot.name, "stream": common.BENCH_STREAM, "seed": args.seed,
             "episodes": args.episodes,
             "nominal": {"fat": fat_nom, "slim_int8": slim_nom,
                         "fat_ci95": mean_ci95(fat_nom_s), "slim_int8_ci95": mean_ci95(slim_nom_s),
                         "fat_scores": [round(x, 4) for x in fat_nom_s],
                         "slim_int8_scores": [round(x, 4) for x in slim_nom_s]},
             "nominal_report": report_nom, "faults": cells}, rows, notes)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__.split("\n\n")[0], list_robots(), default_profile="fast")
    ap.add_argument("--episodes", type=int, default=None,
                    help="episodes per policy per fault (default 10; quick 2)")
    args = common.parse(ap, argv, "robustness")
    args.episodes = args.episodes or (2 if args.quick else 10)
    started = time.perf_counter()
    names, notes = quality_plan()
    results, rows = [], []
    for robot in args.robots:
        res, r_rows, n = bench_robot(args, robot, names)
        results.append(res)
        rows += r_rows
        notes += n
    headers = ["robot", "fault", "detail", "fat", "slim int8", "fat retained", "slim retained",
               "slim keeps (slim ret. / fat ret.)", "slim / fat"]
    md = (f"Scores in [0, 1], mean of {args.episodes} episodes per cell (episodes 0.."
          f"{args.episodes - 1} of seed stream `{common.BENCH_STREAM}`, seed {args.seed}: the same "
          f"episodes in every cell, none that a build trained, checked or reported on); "
          f"slim = plan `{','.join(names)}`"
          f"{' (quick budgets)' if args.quick else f', profile {args.profile}'}.\n\n"
          + common.md_table(headers, rows))
    return common.finish(args, "robustness", results, md, notes, started)


if __name__ == "__main__":
    main()
