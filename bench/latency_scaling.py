"""How the slim policy's latency compares with the pinned fat network's, as the fat network grows.

The speed-up of a slim student over the pinned fat network, both in onnxruntime, is bounded by
onnxruntime's per-call floor (an empty graph costs about 5 µs here): the student's call is
mostly that floor, so the ratio is set by how slow the pinned network is, i.e. by the fat
network's size. This script times, in one interleaved run per robot (batch 1, one thread):

- the pinned network exported to ONNX fp32 (`pin-embodiment,export-onnx`) of the sample fat
  checkpoint, and of fat networks of the same architecture family at other sizes with random
  weights (the checkpoints `build_cost.py` makes: latency does not depend on the weights' values);
  the default, 1M, is the size of the first sample checkpoint (1.1M parameters);
- the slim int8 student of the sample checkpoint (the default build, `xcompile build --int8`),
  which is the same network whatever the fat size (its widths come from the distill config);
- onnxruntime's empty-graph floor.

    python bench/latency_scaling.py                        # all 8 robots: sample, and 1M
    python bench/latency_scaling.py --robots spot --sizes 1M,20M
    python bench/latency_scaling.py --quick --robots a1       # < 2 min: the test suite runs this
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import common
from build_cost import SIZES, make_checkpoint

PINNED_PLAN = ["pin-embodiment", "export-onnx"]


def bench_robot(args: Any, robot: str) -> tuple[dict[str, Any], str, list[str]]:
    names, notes = common.slim_plan()
    if names is None:
        return {"robot": robot, "error": "no distill pass registered"}, "", notes
    slim = common.build(args.checkpoint, robot, names,
                        quick=args.quick, work_dir=args.work_dir, tag="quality", seed=args.seed,
                        options={"quantize": {"precision": "int8"}}, profile=args.profile)
    pinned = {"sample": common.build(args.checkpoint, robot, PINNED_PLAN, quick=args.quick,
                                     work_dir=args.work_dir, tag="pinned-onnx", seed=args.seed,
                                     profile=args.profile)}
    ckpts = Path(args.work_dir) / "build_cost" / "ckpts"
    for size in args.sizes:
        path, _ = make_checkpoint(ckpts / f"{size}-8.pt", size, pinned["sample"].robot.name, 8)
        pinned[size] = common.build(path, robot, PINNED_PLAN, quick=args.quick,
                                    work_dir=args.work_dir, tag=f"pinned-onnx-{size}",
                                    seed=args.seed, profile=args.profile)
    failed = {k: b.error for k, b in [*pinned.items(), ("slim", slim)] if b.error}
    if failed:
        return {"robot": robot, "error": failed}, f"build failed: {failed}", notes
    arts = {f"pinned-{k}": b.artifact("export-onnx") for k, b in pinned.items()}
    arts["slim-int8"] = slim.artifact("quantize")
    lat, floor = common.time_latency(arts, slim.robot, args.calls, args.rounds)
    s = lat["slim-int8"]["p50_us"]
    rows, table = [], []
    for k, b in pinned.items():
        a, t = arts[f"pinned-{k}"], lat[f"pinned-{k}"]
        params = b.row("pin-embodiment").get("params")
        fat_params = b.row("fat").get("params")
        row = {"fat": "sample checkpoint" if k == "sample" else f"{k}, random weights",
               "fat_params": fat_params, "pinned_params": params, "pinned_bytes": a.n_bytes,
               "pinned_p50_us": t["p50_us"], "pinned_p99_us": t["p99_us"],
               "slim_p50_us": s, "speedup": t["p50_us"] / s}
        rows.append(row)
        table.append([row["fat"], common.fmt(fat_params), common.fmt(params),
                      common.fmt(t["p50_us"], ".1f"), common.fmt(t["p99_us"], ".1f"),
                      common.fmt(s, ".1f"), f"{row['speedup']:.1f}×"])
    headers = ["fat network", "fat params", "pinned params", "pinned ONNX p50 µs",
               "pinned ONNX p99 µs", "slim int8 p50 µs", "pinned p50 / slim p50"]
    f = floor["p50_us"]
    md = (f"### {slim.robot.name}\n\n" + common.md_table(headers, table) + "\n\n"
          f"onnxruntime's empty-graph floor in this run: {f:.1f} µs per call, so no onnxruntime "
          f"policy can be more than {rows[0]['pinned_p50_us'] / f:.0f}× faster than the sample's "
          f"pinned network; 100× needs a pinned network of at least {100 * s:.0f} µs with this "
          "student.")
    return {"robot": slim.robot.name, "rows": rows, "ort_floor_us": floor,
            "slim_int8_p99_us": lat["slim-int8"]["p99_us"]}, md, notes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__.split("\n\n")[0], common.list_robots())
    ap.add_argument("--sizes", default=None, help="random-weight fat sizes besides the sample, "
                    f"comma-separated, of {list(SIZES)} (default 1M; quick: tiny)")
    ap.add_argument("--calls", type=int, default=None,
                    help="batch-1 calls per policy per round (default 1000; quick 100)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved timing rounds (default 3; quick 1)")
    args = common.parse(ap, argv, "latency_scaling")
    args.sizes = (args.sizes or ("tiny" if args.quick else "1M")).split(",")
    bad = [s for s in args.sizes if s not in SIZES]
    if bad:
        ap.error(f"unknown size(s) {bad}: choose from {list(SIZES)}")
    args.calls = args.calls or (100 if args.quick else 1000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    started = time.perf_counter()
    results, md, notes = common.each_robot(args, lambda robot: bench_robot(args, robot))
    short = [r["robot"] for r in results if not (r.get("rows") and r["rows"][0]["speedup"] >= 100)]
    md += (f"\n\nThe sample's slim int8 policy is at least 100× faster than its pinned network "
           f"on {len(results) - len(short)} of {len(results)} robots"
           + (f" (not on {', '.join(short)})." if short else "."))
    return common.finish(args, "latency_scaling", {"robots": results}, md, notes, started)


if __name__ == "__main__":
    main()
