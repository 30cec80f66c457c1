"""What every benchmark script shares: its options, builds through the pass manager, timing, the
machine it ran on, and how results are written (a JSON file and a markdown table on stdout).

Builds go through `xcompile.build.run_build`, exactly as `xcompile build` runs them, with their
own cache (`<work-dir>/cache`), so the scripts reuse each other's builds (quality.py and
robustness.py build the same slim policies) but never read or write a user's `.xcompile/cache`.
Two measure functions are handed to run_build instead of the full `measure_artifact`:

- `size_measure` (used with episodes=0): params, bytes, MACs only. The latency scripts re-time
  every variant themselves, back to back in one process, so their ratios come from one run.
- `score_measure` (used with episodes >= 1): params, bytes, MACs and the closed-loop score
  (`xcompile.measure.score`: episodes of the build's "report" seed stream, the same for every
  stage; with its bootstrap 95% interval and the per-episode scores, as the report carries them).

Seeds (`xcompile/seeds.py`): a script that reads scores off a build reads the build's own, taken
on the "report" stream; a script that runs episodes itself (robustness.py) draws them from the
"bench" stream (`BENCH_STREAM`), which no build uses.

The pass manager caches measurements on disk by artifact id and episode count (not by measure
function), so each measure function is only ever used with its own kind of episode count; the
bench cache never holds the CLI's full measurements and the CLI never sees these.

Passes are looked up in the registry at run time (`xcompile.passes.base.all_passes`): a plan
leaves out what is not registered and says so in a note, so the scripts run on any checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from xcompile import measure as xm
from xcompile.artifact import Artifact, file_sha256
from xcompile.build import BuildResult, run_build
from xcompile.errors import PlanError, ToolUnavailable
from xcompile.manager.plan import validate_plan
from xcompile.manager.settings import PROFILES, PlanStep, make_config
from xcompile.passes.base import all_passes
from xcompile.targets import RobotTarget, list_airframes, list_robots, load_robot

REPO = Path(__file__).resolve().parent.parent
BENCH_STREAM = "bench"    # the seed stream of episodes a script runs itself (xcompile/seeds.py)
DEFAULT_CKPT = "examples/fat_policy.pt"
DEFAULT_WORK_DIR = ".xcompile/bench"

# The "generic export-and-quantize" path a user has without xcompile's body-specific passes:
# pin the fat network (exact), export it, quantize it.
GENERIC_PLAN = ["pin-embodiment", "export-onnx", "quantize"]
# Optional passes of the slim plan, in plan order, and what the report calls their stage.
SLIM_EXTRA = ["rl-finetune", "distill"]
STAGE = {"fat": "fat", "pinned": "pin-embodiment", "tuned": "rl-finetune", "student": "distill",
         "onnx": "export-onnx", "quantized": "quantize"}

# Small budgets for --quick, per pass; only fields the registered pass has are used (a pass that
# changes its options does not break the scripts). Profile "fast" sets the rest. --quick checks a
# script's plumbing, so rl-finetune's gain search is left out (tests/test_gain_search.py and the
# fast builds of the suite run it).
QUICK_OPTIONS: dict[str, dict[str, Any]] = {
    "pin-embodiment": {"check_episodes": 0, "n_check_obs": 256},
    "export-onnx": {"n_check_obs": 64},
    "quantize": {"calibration_episodes": 1, "heldout_episodes": 1, "calibration_samples": 256,
                 "auto_episodes": 1},
    "rl-finetune": {"env_steps": 512, "n_envs": 2, "rollout_steps": 64, "epochs": 1,
                    "critic_warmup_iters": 1, "eval_episodes": 1, "search_iterations": 0},
    "distill": {"rounds": 2, "episodes_per_round": 1, "fit_epochs": 5, "final_fit_epochs": 10,
                "heldout_episodes": 1, "eval_episodes": 1},
}


# --------------------------------------------------------------------------------------------
# options


def parser(description: str, default_robots: Sequence[str], default_profile: str | None = "default"
           ) -> argparse.ArgumentParser:
    """default_profile=None: the script has no --profile (it chooses profiles itself)."""
    """The options every script takes; a script adds its own."""
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small budgets (< 2 min on 2 cores): for the test suite, not for numbers")
    ap.add_argument("--checkpoint", default=DEFAULT_CKPT, help="fat checkpoint (.pt/.safetensors)")
    ap.add_argument("--robots", nargs="+", default=list(default_robots), metavar="ROBOT",
                    help=f"robot targets (default: {' '.join(default_robots)}; "
                    f"built-in: {' '.join(list_robots())})")
    ap.add_argument("--out", default=None, help="JSON results file (default bench/results/"
                    "<script>[-quick].json)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every build (its passes and "
                    "its report's score episodes, seed stream 'report') and of the episodes a "
                    "script runs itself (stream 'bench'); see xcompile/seeds.py")
    if default_profile is not None:
        ap.add_argument("--profile", choices=PROFILES, default=default_profile,
                        help=f"build profile of every pass (default {default_profile}; --quick: "
                        "fast with smaller budgets still)")
    ap.add_argument("--work-dir", default=DEFAULT_WORK_DIR,
                    help="where builds and the bench's own pass cache go")
    return ap


def parse(ap: argparse.ArgumentParser, argv: Sequence[str] | None, script: str,
          need_checkpoint: bool = True) -> argparse.Namespace:
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = str(REPO / "bench" / "results" / f"{script}{'-quick' if args.quick else ''}.json")
    known = list_robots() + list_airframes()
    unknown = [r for r in args.robots if r not in known and not Path(r).is_file()]
    if unknown:
        ap.error(f"unknown robot(s) {unknown}: choose from {known} or give a TOML path")
    if need_checkpoint and not Path(args.checkpoint).is_file():
        ap.error(f"checkpoint {args.checkpoint!r} does not exist (the sample one is made by "
                 "examples/train_fat_policy.py)")
    return args


def command_line() -> str:
    return " ".join(["python", os.path.relpath(sys.argv[0], REPO) if sys.argv else "?",
                     *sys.argv[1:]])


# --------------------------------------------------------------------------------------------
# plans


def registered() -> set[str]:
    return set(all_passes())


def slim_plan() -> tuple[list[str] | None, list[str]]:
    """(pass names of the slim build up to export-onnx's input, notes) from what is registered.

    None when `distill` is missing: without it there is no slim student, only the pinned network.
    """
    have = registered()
    names, notes = ["pin-embodiment"], []
    for p in SLIM_EXTRA:
        if p in have:
            names.append(p)
        else:
            notes.append(f"pass '{p}' is not registered in this checkout: its stage is left out")
    names += ["export-onnx", "quantize"]
    if "distill" not in have:
        return None, notes + ["no slim student without 'distill': slim rows are not measured"]
    try:
        validate_plan(names)
    except PlanError as e:
        return None, notes + [f"the slim plan {','.join(names)} does not validate: {e}"]
    return names, notes


def plan_steps(names: Sequence[str], quick: bool, options: Mapping[str, Mapping[str, Any]] | None
               = None) -> list[PlanStep]:
    """Plan steps with validated configs: quick budgets (fields the pass has) < `options`."""
    known = all_passes()
    steps = []
    for n in names:
        opts: dict[str, Any] = {}
        if quick:
            fields = known[n].Config.model_fields
            opts.update({k: v for k, v in QUICK_OPTIONS.get(n, {}).items() if k in fields})
        opts.update((options or {}).get(n, {}))
        steps.append(PlanStep(n, make_config(n, opts)))
    return steps


# --------------------------------------------------------------------------------------------
# measure functions handed to run_build (see the module docstring)


def size_measure(art: Artifact, robot: RobotTarget, episodes: int = 0, seed: int = 0,
                 latency_n: int = 0) -> dict[str, Any]:
    """params, bytes, MACs; no latency (timed later, in one run), no score."""
    if episodes:
        raise ValueError("size_measure is used with episodes=0 only (its disk cache key)")
    pb = xm.count_params_bytes(art)
    return {"format": art.format, "params": pb["params"], "bytes": pb["bytes"],
            "macs": _macs(art, robot), "latency_p50_us": None, "latency_p99_us": None,
            "runtime": None, "score": None, "score_std": None, "score_ci95": None,
            "scores": None, "episodes": 0}


def score_measure(art: Artifact, robot: RobotTarget, episodes: int = 1, seed: int = 0,
                  latency_n: int = 0) -> dict[str, Any]:
    """params, bytes, MACs and the closed-loop score over episodes 0..episodes-1 of the
    "report" seed stream (seed `seed`), with its 95% interval and the per-episode scores."""
    if episodes < 1:
        raise ValueError("score_measure is used with episodes >= 1 only (its disk cache key)")
    row = {**size_measure(art, robot), "episodes": episodes}
    try:
        res = xm.score(art, robot, episodes, seed)
    except ToolUnavailable:
        return row
    row.update(score=round(res.score, 4), score_std=round(float(np.std(res.scores)), 4),
               score_ci95=res.score_ci95, scores=[round(float(s), 4) for s in res.scores])
    return row


def _macs(art: Artifact, robot: RobotTarget) -> int | None:
    try:
        return xm.macs(art, robot)
    except ToolUnavailable:
        return None


# --------------------------------------------------------------------------------------------
# builds


@dataclass
class Built:
    """One run_build build: its stages by report name, and what the script should say about it."""

    robot: RobotTarget
    result: BuildResult | None
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def artifact(self, stage: str) -> Artifact | None:
        rec = self._record(stage)
        return rec.artifact if rec else None

    def row(self, stage: str) -> dict[str, Any] | None:
        """The report.json stage document (name, params, bytes, macs, score, wall_s, checks...)."""
        if self.result is None:
            return None
        return next((s for s in self.result.report["stages"]
                     if s["name"] == stage and not s["skipped"]), None)

    def _record(self, stage: str) -> Any:
        if self.result is None:
            return None
        return next((r for r in self.result.stages if r.name == stage and not r.skipped), None)


def build(ckpt: str | Path, robot: str | RobotTarget, names: Sequence[str], *, quick: bool,
          work_dir: str | Path, tag: str, seed: int = 0, episodes: int = 0,
          profile: str | None = None,
          options: Mapping[str, Mapping[str, Any]] | None = None,
          measure: Callable[..., dict[str, Any]] | None = None) -> Built:
    """Run the plan `names` on `ckpt` for `robot` through the pass manager (cached per work dir).

    episodes=0 measures sizes only; episodes >= 1 also scores every stage on episodes 0..n-1 of
    the "report" seed stream (the same episodes for every stage).
    A pass that fails with an xcompile error (a check that refuses, a missing tool) is reported
    in `Built.error`, so one robot's failure does not lose the other rows.
    """
    from xcompile.errors import XCompileError

    r = robot if isinstance(robot, RobotTarget) else load_robot(robot)
    work = Path(work_dir)
    steps = plan_steps(names, quick, options)
    if measure is None:
        measure = score_measure if episodes else size_measure
    try:
        res = run_build(ckpt, r, None, steps, work / "builds" / f"{r.name}-{tag}", work / "cache",
                       seed=seed, profile="fast" if quick else (profile or "default"),
                       episodes=episodes,
                       measure=measure, rollout=False)
    except XCompileError as e:
        return Built(r, None, error=f"{type(e).__name__}: {e}".splitlines()[0])
    notes = [f"{s['name']} skipped: {s['skip_reason']}" for s in res.report["stages"]
             if s["skipped"]]
    return Built(r, res, notes=notes)


@dataclass
class Variants:
    """The policies a user could deploy for one robot, as artifacts, and why any is missing."""

    robot: RobotTarget
    arts: dict[str, Artifact]
    notes: list[str]
    builds: dict[str, Built]


def build_variants(ckpt: str | Path, robot: str | RobotTarget, *, quick: bool,
                   work_dir: str | Path, seed: int = 0, slim: bool = True,
                   fp16: bool = True, profile: str | None = None) -> Variants:
    """Fat, pinned, generic ONNX fp32/int8 and (when distill is registered) slim fp32/int8/fp16.

    Keys: fat, pinned, generic-fp32, generic-int8, student, slim-fp32, slim-int8, slim-fp16.
    Sizes only (episodes=0): the caller times them.
    """
    r = robot if isinstance(robot, RobotTarget) else load_robot(robot)
    arts: dict[str, Artifact] = {}
    notes: list[str] = []
    builds: dict[str, Built] = {}
    gen = build(ckpt, r, GENERIC_PLAN, quick=quick, work_dir=work_dir, tag="generic", seed=seed,
                profile=profile)
    builds["generic"] = gen
    if gen.error:
        notes.append(f"generic build failed: {gen.error}")
    for key, stage in (("fat", "fat"), ("pinned", "pin-embodiment"),
                       ("generic-fp32", "export-onnx"), ("generic-int8", "quantize")):
        a = gen.artifact(stage)
        if a is not None:
            arts[key] = a
    if not slim:
        return Variants(r, arts, notes, builds)
    names, why = slim_plan()
    notes += why
    if names is None:
        return Variants(r, arts, notes, builds)
    precisions = ["int8", "fp16"] if fp16 else ["int8"]
    for prec in precisions:
        b = build(ckpt, r, names, quick=quick, work_dir=work_dir, tag=f"slim-{prec}", seed=seed,
                  options={"quantize": {"precision": prec}}, profile=profile)
        builds[f"slim-{prec}"] = b
        if b.error:
            notes.append(f"slim {prec} build failed: {b.error}")
            continue
        for key, stage in (("tuned", "rl-finetune"), ("student", "distill"),
                           ("slim-fp32", "export-onnx"), (f"slim-{prec}", "quantize")):
            a = b.artifact(stage)
            if a is not None:
                arts.setdefault(key, a)
    return Variants(r, arts, notes, builds)


# --------------------------------------------------------------------------------------------
# timing (xcompile.measure does the calls; this only interleaves rounds)


def time_latency(arts: Mapping[str, Artifact], robot: RobotTarget, calls: int, rounds: int
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Batch-1 one-thread latency of every artifact and onnxruntime's empty-graph floor.

    `rounds` interleaved rounds of `calls` calls each (variant A, B, ..., floor, then again), so
    a burst of load from other jobs on a shared machine hits every variant alike; each figure is
    the median over rounds of that round's median (p50) and p99. Returns (per-artifact
    {p50_us, p99_us, runtime, calls}, floor {p50_us, rounds_us}).
    """
    from xcompile.sim.env import obs_dim

    per: dict[str, list[dict[str, Any]]] = {k: [] for k in arts}
    floors: list[float] = []
    for _ in range(rounds):
        xm.clear_cache()        # else latency() returns the first round's cached figure
        for k, art in arts.items():
            per[k].append(xm.latency(art, robot, calls))
        floors.append(xm.ort_floor_us(obs_dim(robot), calls))
    out = {k: {"p50_us": statistics.median(x["p50_us"] for x in v),
               "p99_us": statistics.median(x["p99_us"] for x in v),
               "runtime": v[0]["runtime"], "calls": calls * rounds} for k, v in per.items()}
    return out, {"p50_us": statistics.median(floors), "rounds_us": floors}


def throughput(art: Artifact, robot: RobotTarget, batch: int = 64, calls: int = 200) -> float:
    """Rows per second of batch-`batch` calls on one thread (median call time), via the same
    loader `xcompile eval` uses (`xcompile.policy.load_policy`)."""
    from xcompile.policy import load_policy

    act = load_policy(art.path, robot).act
    obs = xm.random_obs(robot, batch * 4, seed=2)
    xs = [obs[i * batch:(i + 1) * batch] for i in range(4)]
    times = np.empty(calls)
    with xm.torch_single_thread():
        for i in range(max(5, calls // 10)):
            act(xs[i % 4])
        for i in range(calls):
            t0 = time.perf_counter_ns()
            act(xs[i % 4])
            times[i] = time.perf_counter_ns() - t0
    return float(batch / (np.median(times) / 1e9))


# --------------------------------------------------------------------------------------------
# the machine


def machine() -> dict[str, Any]:
    """What a reader needs to compare numbers: cores, CPU, versions, date, how busy it was."""
    from importlib import metadata

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("xcompile", "torch", "onnxruntime", "onnx", "numpy", "pybullet"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "versions": versions, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "loadavg_1_5_15": load}


def checkpoint_id(path: str | Path) -> dict[str, Any] | None:
    """Bytes and sha256 of the fat checkpoint a result was measured on (None if there is none)."""
    p = Path(path)
    if not p.is_file():
        return None
    return {"bytes": p.stat().st_size, "sha256": file_sha256(p)}


def machine_line(m: Mapping[str, Any]) -> str:
    v = m["versions"]
    return (f"{m['nproc']} cores ({m['cpu']}), Python {m['python']}, torch {v['torch']}, "
            f"onnxruntime {v['onnxruntime']}, {m['date']}, load average {m['loadavg_1_5_15']}")


# --------------------------------------------------------------------------------------------
# output


def fmt(v: Any, spec: str = ".3g", none: str = "–") -> str:
    if v is None:
        return none
    if isinstance(v, float) and not np.isfinite(v):
        return none
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and spec == ".3g":
        return f"{int(v):,}"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return float(a) / float(b)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def each_robot(args: argparse.Namespace, bench_robot: Callable[[str], tuple[Any, str, list[str]]]
               ) -> tuple[list[Any], str, list[str]]:
    """Run `bench_robot(robot)` -> (result, markdown, notes) for every `--robots` entry; return
    the results, the markdown sections joined, and all notes."""
    results, mds, notes = [], [], []
    for robot in args.robots:
        res, md, n = bench_robot(robot)
        results.append(res)
        mds.append(md)
        notes += n
    return results, "\n\n".join(mds), notes


def finish(args: argparse.Namespace, script: str, results: Any, markdown: str,
           notes: Sequence[str] = (), started: float | None = None) -> dict[str, Any]:
    """Print the table (and notes) and write the JSON results file; return the document."""
    m = machine()
    doc = {"script": script, "command": command_line(), "quick": bool(args.quick),
           "checkpoint": str(args.checkpoint), "checkpoint_id": checkpoint_id(args.checkpoint),
           "robots": list(args.robots), "machine": m, "protocol": xm.MEASURE_VERSION,
           "wall_s": round(time.perf_counter() - started, 1) if started else None,
           "notes": list(dict.fromkeys(notes)), "results": results, "markdown": markdown}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    print(markdown)
    for n in doc["notes"]:
        print(f"\nnote: {n}")
    print(f"\nmachine: {machine_line(m)}; wall {doc['wall_s']} s; results in {out}")
    return doc


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)
