"""What a build costs: wall time and peak memory per pass, by profile, fat-network size and the
number of bodies in the checkpoint's registry.

Fat checkpoints of several sizes are made with random weights (cost does not depend on what the
weights learned) from `FatConfig` variants, with a registry of the first N real robots (the target
first; descriptors from their URDFs). Each pass runs in its own child process: child k runs the plan
up to pass k through the pass manager, with a fresh cache that children 1..k-1 filled, so it
loads their results and runs only pass k. Per pass: the stage's wall time from the build report
(the pass's run and its own check; the measurements the report usually adds are switched off
here), and the child's peak resident memory next to its resident memory before the build started
(Python + torch + onnxruntime + pybullet imported), so "pass adds" is what the pass itself added.
The peak is the address space's high-water mark (VmHWM in /proc/self/status): `ru_maxrss`
survives exec on Linux and would report the parent's peak for a child that used less (seen
here: every child reported the parent's 521 MB).

    python bench/build_cost.py                         # spot; 1M/5M/20M × fast/default; 2/4/8 bodies
    python bench/build_cost.py --sizes 1M --profiles fast --bodies 8
    python bench/build_cost.py --quick --robots a1     # < 2 min: the test suite runs this
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common

from xcompile.targets import list_robots, load_robot

SIZES: dict[str, dict[str, int]] = {   # label -> FatConfig fields (params with 8 bodies)
    "tiny": dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, desc_hidden=32, desc_layers=1),
    "small": dict(d_model=64, n_layers=2, n_heads=2, d_ff=128, desc_hidden=64, desc_layers=1),
    "1M": {},                                                               # 1.10M: the default
    "5M": dict(d_model=256, n_layers=6, n_heads=8, d_ff=768),               # 4.6M
    "20M": dict(d_model=512, n_layers=6, n_heads=8, d_ff=2048, desc_hidden=1024),  # 21.6M
}


# --------------------------------------------------------------------------------------------
# the child: one run_build, its last pass uncached


def _vm_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024          # kB
    raise RuntimeError(f"no {key} in /proc/self/status")


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space, which exec
    replaces; getrusage's ru_maxrss survives exec on Linux and would report the parent's peak
    for a child that used less, so it is only the fallback where /proc is missing."""
    try:
        return _vm_mb("VmHWM")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def child(spec: dict[str, Any]) -> None:
    import onnxruntime  # noqa: F401 - imported before the baseline, like the passes will
    import pybullet  # noqa: F401
    import torch  # noqa: F401

    from xcompile.build import run_build

    def sizes_only(art: Any, robot: Any, **_: Any) -> dict[str, Any]:
        return {"format": art.format, "bytes": art.n_bytes}

    before = peak_rss_mb()
    steps = common.plan_steps(spec["plan"], spec["quick"])
    t0 = time.perf_counter()
    res = run_build(spec["checkpoint"], spec["robot"], None, steps, spec["out"], spec["cache"],
                   seed=spec["seed"], profile=spec["profile"], episodes=0, measure=sizes_only,
                   runtime_floor=lambda: None, rollout=False)  # type: ignore[arg-type,return-value]
    last = res.report["stages"][-1]
    print(json.dumps({"pass": last["name"], "wall_s": last["wall_s"], "cached": last["cached"],
                      "skipped": last["skipped"], "skip_reason": last["skip_reason"],
                      "bytes": last.get("bytes"), "rss_before_mb": round(before, 1),
                      "rss_peak_mb": round(peak_rss_mb(), 1),
                      "run_plan_s": round(time.perf_counter() - t0, 2)}))


def run_child(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"pass": spec["plan"][-1], "error": tail[:300]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["child_s"] = round(time.perf_counter() - t0, 2)
    return out


# --------------------------------------------------------------------------------------------
# the parent


def make_checkpoint(path: Path, size: str, robot: str, n_bodies: int) -> tuple[Path, int]:
    import torch

    from xcompile.models.checkpoint import VERSION, save_checkpoint
    from xcompile.models.descriptors import joint_descriptors
    from xcompile.models.fat import FatConfig, FatPolicy, count_params

    names = [robot] + [n for n in list_robots() if n != robot]
    torch.manual_seed(0)
    model = FatPolicy(FatConfig(**SIZES[size]))
    registry = []
    for n in names[:n_bodies]:
        r = load_robot(n)
        registry.append({"name": n, "family": r.family, "joints": list(r.joints.names),
                         "descriptors": joint_descriptors(r).tolist(), "urdf": r.urdf})
    # Reused between runs, but only while it is of the checkpoint format this xcompile writes.
    if not path.is_file() or read_version(path) != VERSION:
        save_checkpoint(path, model, registry)
    return path, count_params(model)


def read_version(path: Path) -> int | None:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("version")
    except Exception:  # noqa: BLE001 - unreadable: made again
        return None


def full_plan() -> tuple[list[str], list[str]]:
    have = common.registered()
    names = ["pin-embodiment"] + [p for p in common.SLIM_EXTRA if p in have]
    names += ["export-onnx", "quantize"]
    notes = [f"pass '{p}' is not registered: not in the plan" for p in common.SLIM_EXTRA
             if p not in have]
    notes.append("build-tensorrt is left out: it needs TensorRT and a GPU (it is skipped in one "
                 "line where they are missing)")
    return names, notes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        child(json.loads(argv[1]))
        return {}
    ap = common.parser(__doc__.split("\n\n")[0], ["spot"], default_profile=None)
    ap.set_defaults(checkpoint="(unused: random-weight checkpoints of each size are made)")
    ap.add_argument("--sizes", default=None, help=f"fat sizes, comma-separated, of {list(SIZES)} "
                    "(default 1M,5M,20M; quick tiny)")
    ap.add_argument("--profiles", default=None, help="build profiles (default fast,default; "
                    "quick fast)")
    ap.add_argument("--bodies", default=None, help="registry sizes to compare at the first size "
                    "and profile (default 2,4,8; quick 2)")
    ap.add_argument("--timeout-s", type=float, default=1800, help="limit per child process")
    args = common.parse(ap, argv, "build_cost", need_checkpoint=False)
    sizes = (args.sizes or ("tiny" if args.quick else "1M,5M,20M")).split(",")
    profiles = (args.profiles or ("fast" if args.quick else "fast,default")).split(",")
    bodies = [int(b) for b in (args.bodies or ("2" if args.quick else "2,4,8")).split(",")]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r}: choose from {list(SIZES)}")
    robot = args.robots[0]
    started = time.perf_counter()
    names, notes = full_plan()
    if len(args.robots) > 1:
        notes.append(f"build cost is measured on the first robot only ({robot})")
    work = Path(args.work_dir) / "build_cost"
    n_all = len(list_robots())
    # (size, bodies, profile): every size and profile with the full registry, then registry sizes
    # at the first size and profile.
    grid = [(s, n_all, p) for s in sizes for p in profiles]
    grid += [(sizes[0], b, profiles[0]) for b in bodies if (sizes[0], b, profiles[0]) not in grid]
    results, table, totals = [], [], []
    for size, nb, profile in grid:
        ckpt, params = make_checkpoint(work / "ckpts" / f"{size}-{nb}.pt", size, robot, nb)
        cache = work / f"cache-{size}-{nb}-{profile}{'-quick' if args.quick else ''}"
        shutil.rmtree(cache, ignore_errors=True)        # every pass runs, once
        total, errors = 0.0, []
        for k in range(1, len(names) + 1):
            spec = {"checkpoint": str(ckpt), "robot": robot, "plan": names[:k],
                    "quick": args.quick, "seed": args.seed, "profile": profile,
                    "cache": str(cache), "out": str(work / "out" / f"{size}-{nb}-{profile}")}
            r = run_child(spec, args.timeout_s)
            r.update(size=size, params=params, bodies=nb, profile=profile,
                     ckpt_bytes=ckpt.stat().st_size)
            results.append(r)
            if "error" in r:
                errors.append(f"{r['pass']}: {r['error']}")
                table.append([size, common.fmt(params), nb, profile, r["pass"], "failed", "", "",
                              ""])
                break
            total += r["wall_s"]
            table.append([size, common.fmt(params), nb, profile, r["pass"],
                          common.fmt(r["wall_s"], ".2f"), common.fmt(r["rss_peak_mb"], ".0f"),
                          common.fmt(r["rss_peak_mb"] - r["rss_before_mb"], ".0f"),
                          "cached?!" if r["cached"] else ""])
        totals.append([size, common.fmt(params), nb, profile, common.fmt(total, ".1f"),
                       "; ".join(errors)])
        notes += [f"{size}/{nb} bodies/{profile}: {e}" for e in errors]
    headers = ["fat size", "params", "bodies", "profile", "pass", "wall s", "child peak RSS MB",
               "pass adds MB", "note"]
    md = (f"Robot {robot}; plan `{','.join(names)}`{' (quick budgets)' if args.quick else ''}; "
          "one child process per pass; random-weight fat checkpoints.\n\n"
          + common.md_table(headers, table) + "\n\nTotal pass time per build:\n\n"
          + common.md_table(["fat size", "params", "bodies", "profile", "total wall s",
                             "errors"], totals))
    return common.finish(args, "build_cost", {"plan": names, "rows": results}, md, notes,
                         started)


if __name__ == "__main__":
    main()
