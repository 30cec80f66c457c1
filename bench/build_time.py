"""How long a user's `xcompile build` takes, pass by pass: each robot's build runs alone, as the
command line runs it (a child process, a fresh pass cache, the profile's own report episodes),
with the chosen executor and workers. Per stage, the report's wall seconds: the pass (with its own
check) and the scoring of its result for the report; the total is the child's wall time, start-up
and report writing included. `--executor process --workers 2` on a 2-core machine is "the
default build on 2 cores" of the fine-tuning issue's budget (10 minutes per robot).

    python bench/build_time.py --robots laikago              # the slowest built-in robot
    python bench/build_time.py --quick --passes pin-embodiment,export-onnx --robots short.toml
                                                             # the test suite's run (profile fast)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

BUDGET_S = 600.0      # the "within 10 minutes per robot on 2 cores"
STAGES = ("fat", "pin-embodiment", "rl-finetune", "distill", "export-onnx", "quantize")


def build_robot(args, robot: str) -> tuple[dict[str, Any], list[list[Any]], list[Any]]:
    with tempfile.TemporaryDirectory(prefix="xcompile-build-time-") as folder:
        tmp = Path(folder)
        out = tmp / "out"
        cmd = [sys.executable, "-m", "xcompile", "build", str(args.checkpoint), "--target", robot,
               *(["--passes", args.passes] if args.passes else ["--int8"]),
               "--profile", args.profile, "--seed", str(args.seed),
               "--executor", args.executor, "--out", str(out), "--cache-dir",
               str(tmp / "cache"), "--json"]
        if args.workers:
            cmd += ["--workers", str(args.workers)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=common.REPO,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.perf_counter() - t0
        if proc.returncode not in (0, 4):           # 4: a gate missed; the report is written
            raise SystemExit(f"build of {robot} failed ({proc.returncode}):\n"
                             f"{proc.stderr[-3000:]}")
        report = json.loads((out / "report.json").read_text())
    stages = [{"name": s["name"], "wall_s": s["wall_s"], "skipped": s["skipped"],
               "pass_s": (s.get("checks") or {}).get("wall_s")} for s in report["stages"]]
    rows = [[robot, s["name"], f"{s['wall_s']:.1f}", "skipped" if s["skipped"] else ""]
            for s in stages]
    res = {"robot": robot, "wall_s": round(wall, 1), "episodes": report["episodes"],
           "stages": stages, "within_budget": wall <= BUDGET_S}
    by = {s["name"]: s["wall_s"] for s in stages}
    summary = [robot, f"{wall:.0f}", *(f"{by.get(n, 0):.0f}" for n in STAGES),
               f"{wall - sum(by.values()):.0f}", "yes" if res["within_budget"] else "**no**"]
    return res, rows, summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__.split("\n\n")[0], ["laikago"])
    ap.add_argument("--executor", choices=("serial", "process"), default="process",
                    help="where the build's work runs (default process)")
    ap.add_argument("--workers", type=int, default=None,
                    help="workers of the process executor (default: the cores)")
    ap.add_argument("--passes", default=None,
                    help="the plan, as `xcompile build --passes` (default: the default plan)")
    args = common.parse(ap, argv, "build_time")
    if args.quick:
        args.profile = "fast"
    started = time.perf_counter()
    results, rows, summary = [], [], []
    for robot in args.robots:
        res, r, s = build_robot(args, robot)
        results.append(res)
        rows += r
        summary.append(s)
    workers = args.workers or os.cpu_count()
    plan = f"--passes {args.passes}" if args.passes else "--int8"
    md = (f"`xcompile build {args.checkpoint} --target ROBOT {plan} --profile {args.profile} "
          f"--executor {args.executor}"
          + (f" --workers {workers}" if args.executor == "process" else "")
          + f"`, each robot alone on the machine with a fresh pass cache; report episodes "
          f"{results[0]['episodes'] if results else '-'} per stage. Seconds per stage: the pass "
          "and the scoring of its result for the report (\"fat\": scoring the checkpoint); "
          "\"rest\": start-up, loading, files and the report.\n\n"
          + common.md_table(["robot", "total s", *STAGES, "rest", "within 10 min"], summary)
          + "\n\n" + common.md_table(["robot", "stage", "wall s", ""], rows))
    notes = [f"{r['robot']}: {r['wall_s']:.0f} s, over the {BUDGET_S:.0f} s budget"
             for r in results if not r["within_budget"]]
    return common.finish(args, "build_time", results, md, notes, started)


if __name__ == "__main__":
    main()
