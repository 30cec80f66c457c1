"""How well each stage of a compiled policy still does its task, for every built-in robot.

One build per robot through the pass manager (pin-embodiment[, rl-finetune][, distill],
export-onnx, quantize int8), every stage scored by the build itself on the same seeded episodes
(episode i uses seed `--seed + i`); the numbers are read from the build's report (report.json
`stages`), not measured again here. Columns: score of the fat network, the pinned network (equal to
the fat one to float rounding), the RL-tuned one, the distilled student and the int8 student; the
int8 score as a fraction of the fat score; parameters of fat and int8; compression (fat bytes /
int8 bytes). A stage whose pass is not registered is shown as "n/a" with a note.

Builds use profile "fast" unless `--profile` says otherwise: the 8 robots then fit in about 15
minutes on 2 cores; `--profile default` (what `xcompile build` uses) takes several times longer
(RL fine-tuning and distillation budgets).

    python bench/quality.py                           # all 8 robots, 10 episodes per stage
    python bench/quality.py --profile default         # the builds `xcompile build` makes
    python bench/quality.py --quick --robots a1       # < 2 min: the test suite runs this
"""

from __future__ import annotations

import time
from typing import Any

import common

from xcompile.targets import list_robots

COLS = [("fat", "fat"), ("pinned", "pin-embodiment"), ("tuned", "rl-finetune"),
        ("student", "distill"), ("int8", "quantize")]


def quality_plan() -> tuple[list[str], list[str]]:
    names, notes = common.slim_plan()
    if names is None:   # no student: the int8 column is then the generic path's (pinned → int8)
        return list(common.GENERIC_PLAN), notes + [
            "the int8 column is the pinned network quantized (no distill pass registered)"]
    return names, notes


def bench_robot(args: Any, robot: str, names: list[str]) -> tuple[dict[str, Any], list[Any]]:
    b = common.build(args.checkpoint, robot, names, quick=args.quick, work_dir=args.work_dir,
                     tag="quality", seed=args.seed, episodes=args.episodes,
                     options={"quantize": {"precision": "int8"}}, profile=args.profile)
    res: dict[str, Any] = {"robot": robot, "plan": names, "error": b.error, "notes": b.notes}
    if b.error:
        return res, [robot, f"build failed: {b.error}"] + [""] * (len(COLS) + 3)
    stages = {key: b.row(stage) for key, stage in COLS}
    res["stages"] = stages
    scores = {k: (s["score"] if s else None) for k, s in stages.items()}
    fat, q = stages["fat"], stages["int8"]
    res["scores"] = scores
    res["int8_over_fat"] = common.ratio(scores["int8"], scores["fat"])
    res["compression"] = common.ratio(fat["bytes"] if fat else None, q["bytes"] if q else None)
    res["params_fat"] = fat["params"] if fat else None
    res["params_int8"] = q["params"] if q else None
    row = [robot] + [common.fmt(scores[k], ".3f", "n/a") for k, _ in COLS]
    row += [common.fmt(res["int8_over_fat"], ".2f"), common.fmt(res["params_fat"]),
            common.fmt(res["params_int8"]), common.fmt(res["compression"], ".1f") + "×"]
    return res, row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__.split("\n\n")[0], list_robots(), default_profile="fast")
    ap.add_argument("--episodes", type=int, default=None,
                    help="score episodes per stage (default 10; quick 2)")
    args = common.parse(ap, argv, "quality")
    args.episodes = args.episodes or (2 if args.quick else 10)
    started = time.perf_counter()
    names, notes = quality_plan()
    results, rows = [], []
    for robot in args.robots:
        res, row = bench_robot(args, robot, names)
        results.append(res)
        rows.append(row)
        notes += [f"{robot}: {n}" for n in res["notes"]]
    headers = ["robot", "fat", "pinned", "tuned", "student", "int8", "int8 / fat",
               "params fat", "params int8", "fat bytes / int8 bytes"]
    md = (f"Scores in [0, 1], mean of {args.episodes} episodes (seeds {args.seed}.."
          f"{args.seed + args.episodes - 1}, the same for every stage); plan "
          f"`{','.join(names)}`{' (quick budgets)' if args.quick else ''}.\n\n"
          + common.md_table(headers, rows))
    return common.finish(args, "quality", results, md, notes, started)


if __name__ == "__main__":
    main()
