"""Fleet builds on each executor, and closed-loop evaluation throughput against worker count.

Part 1: the fleet of `--robots` (default: the 8 built-in robots), built as `xcompile build CKPT
--target a,b,... --profile fast` builds it (default plan, rollout GIF included), once per executor:
serial (this process), process (a local pool of `--workers` processes) and ray (a local Ray
instance of `--workers` CPUs), one after another in this run, each with a fresh pass cache (else
the second run would be all cache hits). Wall time includes starting the executor. The ratios are
serial / executor; the scores of every target must be the same on every executor (seeded), and
the table says whether they are.

Part 2: `xcompile.executors.evaluate_file` of the checkpoint on one robot (`--eval-robot`), the
same episodes (bench seed stream) in chunks of `--chunk`, serial and on a process pool of 1 and
`--workers` workers (each pool started and warmed up before it is timed): episodes per second,
and whether the per-episode scores are identical.

A note projects a fleet of 100 targets on a 10-node cluster from the measured per-target cost.

    python bench/fleet.py                               # 8 robots, fast profile (see RESULTS.md)
    python bench/fleet.py --quick --robots a1 panda     # thin plan, quick budgets: a few minutes
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import common

from xcompile.errors import XCompileError
from xcompile.executors import evaluate_file, make_executor
from xcompile.fleet import FleetTarget, prepare_jobs, run_fleet
from xcompile.targets import list_robots, load_robot

THIN = ["pin-embodiment", "export-onnx", "quantize"]


def fleet_run(args: Any, name: str) -> dict[str, Any]:
    """One fleet build on executor `name`, in a fresh work folder (removed afterwards)."""
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"fleet-{name}-", dir=work))
    cli: dict[str, Any] = {"profile": "fast", "seed": args.seed, "episodes": args.episodes}
    if args.quick:
        steps = common.plan_steps(THIN, quick=True)
        cli["passes"] = THIN
        cli["options"] = {s.name: s.config.model_dump(mode="json") for s in steps}
    try:
        t0 = time.perf_counter()
        with make_executor(name, None if name == "serial" else args.workers) as ex:
            started = time.perf_counter() - t0
            jobs, failed = prepare_jobs(Path(args.checkpoint),
                                        [FleetTarget(r, r) for r in args.robots], hardware=None,
                                        config=None, cli=cli, cache_dir=tmp / "cache")
            doc = run_fleet(jobs, failed, tmp / "out", ex, order=args.robots)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"executor": name, "workers": doc["workers"], "wall_s": round(wall, 1),
            "startup_s": round(started, 1), "built": doc["built"], "failed": doc["failed"],
            "plan": [p["name"] for p in jobs[0].plan] if jobs else [],
            "targets": [{k: r[k] for k in ("target", "ok", "score", "score_ci95", "scores",
                                            "bytes", "latency_p50_us", "build_s", "error")}
                        for r in doc["targets"]]}


def eval_run(args: Any, executor: str, workers: int | None) -> dict[str, Any]:
    robot = load_robot(args.eval_robot)
    with make_executor(executor, workers) as ex:
        if executor != "serial":        # start the workers and load the policy in each
            evaluate_file(args.checkpoint, robot, ex.workers, args.seed, "bench", executor=ex,
                          chunk=1)
        t0 = time.perf_counter()
        res = evaluate_file(args.checkpoint, robot, args.eval_episodes, args.seed, "bench",
                            executor=ex, chunk=args.chunk)
        wall = time.perf_counter() - t0
    return {"executor": executor, "workers": ex.workers, "episodes": args.eval_episodes,
            "chunk": args.chunk, "wall_s": round(wall, 2),
            "episodes_per_s": round(args.eval_episodes / wall, 3), "scores": res.scores,
            "returns": res.returns}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__.split("\n\n")[0], list_robots(), default_profile=None)
    ap.add_argument("--workers", type=int, default=2, help="workers of process and ray (2)")
    ap.add_argument("--executors", nargs="+", default=["serial", "process", "ray"],
                    choices=["serial", "process", "ray"], help="fleet executors to compare")
    ap.add_argument("--episodes", type=int, default=None,
                    help="score episodes per stage (default: the fast profile's 3; quick 1)")
    ap.add_argument("--eval-robot", default=None, help="robot of part 2 (default: the first)")
    ap.add_argument("--eval-episodes", type=int, default=None, help="default 40; quick 8")
    ap.add_argument("--chunk", type=int, default=None, help="episodes per task (10; quick 2)")
    args = common.parse(ap, argv, "fleet")
    args.episodes = args.episodes or (1 if args.quick else None)
    args.eval_robot = args.eval_robot or args.robots[0]
    args.eval_episodes = args.eval_episodes or (8 if args.quick else 40)
    args.chunk = args.chunk or (2 if args.quick else 10)
    started = time.perf_counter()
    notes: list[str] = []

    runs = []
    for name in args.executors:
        try:
            runs.append(fleet_run(args, name))
        except XCompileError as e:
            notes.append(f"executor {name} not measured: {e}")
    base = next((r for r in runs if r["executor"] == "serial"), None)
    ref = {t["target"]: t["scores"] for t in base["targets"]} if base else {}
    rows = []
    for r in runs:
        same = all(ref.get(t["target"]) == t["scores"] for t in r["targets"]) if ref else None
        r["scores_equal_serial"] = same
        r["speedup_vs_serial"] = common.ratio(base["wall_s"], r["wall_s"]) if base else None
        rows.append([r["executor"], r["workers"], common.fmt(r["wall_s"], ".1f"),
                     common.fmt(r["startup_s"] if r["executor"] == "ray" else None, ".1f"),
                     common.fmt(r["speedup_vs_serial"], ".2f"),
                     f"{r['built']}/{len(r['targets'])}", "–" if same is None else
                     ("yes" if same else "NO")])
    md = (f"Fleet of {len(args.robots)} robots, plan `{','.join(runs[0]['plan'])}` "
          f"({'quick budgets' if args.quick else 'profile fast'}), fresh pass cache per "
          "executor; wall includes starting the executor (a process pool starts its workers "
          "with the first targets; Ray's start is also shown alone).\n\n" + common.md_table(
              ["executor", "workers", "wall s", "of which ray.init s", "serial / this",
               "built", "scores = serial"], rows) if runs else "No fleet run completed.")
    if runs:
        per = [[t["target"]] + [common.fmt(next(x for x in r["targets"] if x["target"] ==
                                                t["target"])["build_s"], ".1f") for r in runs]
               + [common.fmt(t["score"], ".3f")] for t in runs[0]["targets"]]
        md += "\n\nBuild time per target (s, as each executor ran it):\n\n" + common.md_table(
            ["target"] + [r["executor"] for r in runs] + ["final score"], per)
        md += "\n\n" + projection(runs[0], args)

    evals = []
    for ex, w in (("serial", None), ("process", 1), ("process", args.workers)):
        try:
            evals.append(eval_run(args, ex, w))
        except XCompileError as e:
            notes.append(f"evaluation on {ex} ({w}) not measured: {e}")
    if evals:
        e0 = evals[0]
        md += (f"\n\nEvaluation throughput: the checkpoint on {args.eval_robot}, "
               f"{args.eval_episodes} episodes (bench stream) in chunks of {args.chunk}; pools "
               "started and warmed up before timing.\n\n" + common.md_table(
                   ["executor", "workers", "wall s", "episodes/s", "vs serial",
                    "same per-episode scores"],
                   [[e["executor"], e["workers"], common.fmt(e["wall_s"], ".2f"),
                     common.fmt(e["episodes_per_s"], ".2f"),
                     common.fmt(common.ratio(e["episodes_per_s"], e0["episodes_per_s"]), ".2f"),
                     "yes" if e["scores"] == e0["scores"] and e["returns"] == e0["returns"]
                     else "NO"] for e in evals]))
    return common.finish(args, "fleet", {"fleet": runs, "eval": evals}, md, notes, started)


def projection(run: dict[str, Any], args: Any) -> str:
    """A fleet of 100 targets on 10 nodes, from this run's mean per-target build time."""
    times = [t["build_s"] for t in run["targets"] if t["ok"]]
    if not times:
        return ""
    per, n, nodes, cores = statistics.mean(times), 100, 10, args.workers
    serial_h = n * per / 3600
    waves = -(-n // (nodes * cores))
    return (f"Projection: at this run's mean of {per:.0f} s per target ({run['executor']}), "
            f"100 targets take {serial_h:.1f} h in one process; on 10 nodes of {cores} cores "
            f"(one target per core) {waves} waves, about {waves * per / 60:.0f} min plus Ray's "
            "start-up, if the nodes share the checkpoint and cache folder on one file system. "
            "Targets are independent, so the bottleneck moves to the slowest target's build "
            "(its RL fine-tuning and distillation are serial inside one task) and to the shared "
            "file system the cache and outputs go through.")


if __name__ == "__main__":
    main()
