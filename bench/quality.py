"""How well each stage of a compiled policy still does its task, for every built-in robot.

One build per robot through the pass manager (pin-embodiment[, rl-finetune][, distill],
export-onnx, quantize int8), every stage scored by the build itself on the same episodes: episodes
0..n-1 of the build's "report" seed stream (xcompile/seeds.py, seed `--seed`), which no pass trains,
checks or chooses on. The numbers are read from the build's report (report.json `stages`), not
measured again here. Columns: score of the fat network, the pinned network (equal to the fat one to
float rounding), the RL-tuned one, the distilled student and the int8 student; the int8 score as a
fraction of the pinned (and tuned) score; compression (fat bytes / int8 bytes); speed-up. The JSON
also has each stage's bootstrap 95% interval (`score_ci95`) and, where the report carries the
per-episode scores, the paired interval of int8 / fat, int8 / pinned and int8 / tuned
(`xcompile.stats.ratio_ci95`: the stages ran the same episodes). A stage whose pass is not
registered is shown as "n/a" with a note.

Builds use profile "fast" unless `--profile` says otherwise: the 8 robots then fit in about 15
minutes on 2 cores; `--profile default` (what `xcompile build` uses) takes several times longer
(RL fine-tuning and distillation budgets).

    python bench/quality.py                           # all 8 robots, 10 episodes per stage
    python bench/quality.py --profile default         # the builds `xcompile build` makes
    python bench/quality.py --quick --robots a1       # < 2 min: the test suite runs this

`--workers 2` builds two robots at a time (one process each, torch on one thread): on 2 cores the
8 default builds take about half the wall time, and the latency columns are timed beside the other
robot's build (noisier; the ratios still come from one process's back-to-back rounds).
"""

from __future__ import annotations

import time
from typing import Any

import common

from xcompile.executors import make_executor
from xcompile.stats import ratio_ci95
from xcompile.targets import list_robots

COLS = [("fat", "fat"), ("pinned", "pin-embodiment"), ("tuned", "rl-finetune"),
        ("student", "distill"), ("int8", "quantize")]
THIN_COLS = [("fat", "fat"), ("pinned", "pin-embodiment"), ("onnx", "export-onnx"),
             ("int8", "quantize")]


def quality_plan(thin: bool = False) -> tuple[list[str], list[str]]:
    if thin:
        return list(common.GENERIC_PLAN), []
    names, notes = common.slim_plan()
    if names is None:   # no student: the int8 column is then the generic path's (pinned → int8)
        return list(common.GENERIC_PLAN), notes + [
            "the int8 column is the pinned network quantized (no distill pass registered)"]
    return names, notes


def bench_robot(args: Any, robot: str, names: list[str], cols: list[tuple[str, str]]
                ) -> tuple[dict[str, Any], list[Any], list[list[Any]]]:
    b = common.build(args.checkpoint, robot, names, quick=args.quick, work_dir=args.work_dir,
                     tag="quality-thin" if args.plan == "thin" else "quality", seed=args.seed,
                     episodes=args.episodes, options={"quantize": {"precision": "int8"}},
                     profile=args.profile)
    res: dict[str, Any] = {"robot": robot, "plan": names, "error": b.error, "notes": b.notes}
    if b.error:
        return res, [robot, f"build failed: {b.error}"] + [""] * (len(cols) + 4), []
    stages = {key: b.row(stage) for key, stage in cols}
    # Batch-1 latency of every stage, timed back to back in one run (interleaved rounds).
    arts = {key: a for key, stage in cols if (a := b.artifact(stage)) is not None}
    calls, rounds = (50, 1) if args.quick else (500, 3)
    timed, floor = common.time_latency(arts, b.robot, calls, rounds)
    for key, t in timed.items():
        stages[key] = {**stages[key], "latency_p50_us": round(t["p50_us"], 2),
                       "latency_p99_us": round(t["p99_us"], 2), "runtime": t["runtime"]}
    res.update(stages=stages, floor_us=floor["p50_us"],
               wall_s={s["name"]: s["wall_s"] for s in b.result.report["stages"]})
    scores = {k: (s["score"] if s else None) for k, s in stages.items()}
    fat, q = stages["fat"], stages["int8"]
    res["scores"] = scores
    res["int8_over_fat"] = common.ratio(scores["int8"], scores["fat"])
    res["int8_over_pinned"] = common.ratio(scores["int8"], scores["pinned"])
    res["int8_over_tuned"] = common.ratio(scores["int8"], scores.get("tuned"))
    res["score_ci95"] = {k: (s.get("score_ci95") if s else None) for k, s in stages.items()}
    per_episode = {k: s.get("scores") for k, s in stages.items() if s and s.get("scores")}
    for den in ("fat", "pinned", "tuned"):
        if "int8" in per_episode and den in per_episode:
            res[f"int8_over_{den}_ci95"] = ratio_ci95(per_episode["int8"], per_episode[den])[1]
    res["compression"] = common.ratio(fat["bytes"] if fat else None, q["bytes"] if q else None)
    res["speedup_vs_pinned"] = common.ratio(stages["pinned"].get("latency_p50_us"),
                                            q.get("latency_p50_us"))
    row = [robot] + [common.fmt(scores[k], ".3f", "n/a") for k, _ in cols]
    row += [common.fmt(res["int8_over_pinned"], ".2f")]
    if args.plan == "slim":
        row += [common.fmt(res["int8_over_tuned"], ".2f")]
    row += [common.fmt(res["compression"], ".1f") + "×",
            common.fmt(res["speedup_vs_pinned"], ".1f") + "×"]
    detail = [[robot, key, common.fmt(s.get("score"), ".3f", "n/a"), _ci(s.get("score_ci95")),
               common.fmt(s.get("params")),
               common.fmt(s.get("bytes")), common.fmt(s.get("latency_p50_us"), ".1f"),
               common.fmt(s.get("latency_p99_us"), ".1f"), s.get("runtime") or "–"]
              for key, s in stages.items() if s]
    return res, row, detail


def _bench_job(job: tuple[Any, str, list[str], list[tuple[str, str]]]):
    return bench_robot(*job)


def _ci(ci: list[float] | None) -> str:
    return "–" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__.split("\n\n")[0], list_robots(), default_profile="fast")
    ap.add_argument("--episodes", type=int, default=None,
                    help="score episodes per stage (default 10; quick 2)")
    ap.add_argument("--workers", type=int, default=1,
                    help="robots built at once, one process each (default 1)")
    ap.add_argument("--plan", choices=["slim", "thin"], default="slim",
                    help="slim: pin, rl-finetune, distill, export, int8 (default); thin: pin, "
                         "export, int8 (no fine-tuning or student)")
    pre, _ = ap.parse_known_args(argv)
    script = "quality" + ("-thin" if pre.plan == "thin" else "") + (
        f"-{pre.profile}" if pre.profile != "fast" and not pre.quick else "")
    args = common.parse(ap, argv, script)
    args.episodes = args.episodes or (2 if args.quick else 10)
    started = time.perf_counter()
    names, notes = quality_plan(args.plan == "thin")
    cols = THIN_COLS if names == list(common.GENERIC_PLAN) else COLS
    results, rows, details = [], [], []
    # The fleet's executors: --workers > 1 spawns processes with torch on one thread each.
    with make_executor("process" if args.workers > 1 else "serial",
                       args.workers if args.workers > 1 else None) as ex:
        outs = ex.map(_bench_job, [(args, robot, names, cols) for robot in args.robots])
    for res, row, detail in outs:
        results.append(res)
        rows.append(row)
        details += detail
        notes += [f"{res['robot']}: {n}" for n in res["notes"]]
    headers = (["robot"] + [k for k, _ in cols] + ["int8 / pinned"]
               + (["int8 / tuned"] if cols is COLS else [])
               + ["fat bytes / int8 bytes", "pinned torch p50 / int8 p50"])
    md = (f"Scores in [0, 1], mean of {args.episodes} episodes (episodes 0.."
          f"{args.episodes - 1} of the builds' seed stream `report`, seed {args.seed}: the same "
          "for every stage, none that a pass trained, checked or chose on); plan "
          f"`{','.join(names)}`, profile {'fast (quick budgets)' if args.quick else args.profile}. "
          "Latency: batch 1, one thread, every stage of a robot timed back to back in one run "
          "(fat and pinned in torch eager, the rest in onnxruntime).\n\n"
          + common.md_table(headers, rows)
          + "\n\nPer stage:\n\n"
          + common.md_table(["robot", "stage", "score", "score 95% CI", "params", "bytes",
                             "p50 µs", "p99 µs", "runtime"], details))
    return common.finish(args, script, results, md, notes, started)


if __name__ == "__main__":
    main()
