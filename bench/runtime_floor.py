"""Where a slim policy's time goes: arithmetic, the runtime's per-call overhead, or neither.

For each policy (fat and pinned in torch eager for context; the generic and slim ONNX graphs) it
puts the measured batch-1 latency (xcompile.measure.latency, one thread, median and p99) beside:

- the arithmetic floor: the policy's MACs (xcompile.measure.macs: matrix products of one call)
  divided by this CPU's single-core multiply-accumulate rate, measured in the same run as a large
  fp32 matmul in torch on one thread (the best the core does). For reference also divided by the
  rate of a 1×n @ n×n matrix-vector product (the batch-1 shape, weights streamed from memory),
  which a batch-1 policy is closer to;
- onnxruntime's per-call floor: an empty (Identity) graph of the same input, called the same way
  (xcompile.measure.ort_floor_us).

The verdict names the largest share of the p50: per-call overhead (the empty-graph floor; ONNX rows
only), arithmetic (at the peak rate), or everything else (operator dispatch, small matrices far
from peak, memory traffic, Q/DQ nodes; for torch rows also torch's own per-call cost). The
crossover line says how many MACs of arithmetic one runtime call costs.

    python bench/runtime_floor.py                      # spot, the sample checkpoint
    python bench/runtime_floor.py --quick --robots a1  # < 2 min: the test suite runs this
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import common

from xcompile import measure as xm

ROWS = [("fat", "fat checkpoint, torch eager"), ("pinned", "pinned, torch eager"),
        ("generic-fp32", "generic ONNX fp32"), ("generic-int8", "generic ONNX int8"),
        ("slim-fp32", "slim ONNX fp32"), ("slim-int8", "slim ONNX int8"),
        ("slim-fp16", "slim ONNX fp16")]


def mac_rates(n: int, reps: int) -> dict[str, float]:
    """Single-thread fp32 MAC/s: an n×n @ n×n matmul (peak) and 1×n @ n×n (batch-1 shape)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    x = torch.randn(1, n, generator=g)
    out: dict[str, float] = {}
    with xm.torch_single_thread(), torch.inference_mode():
        for name, lhs, macs in (("peak_mac_per_s", a, n ** 3), ("matvec_mac_per_s", x, n * n)):
            inner = 1 if lhs is a else 200      # a matvec alone is too short to time well
            for _ in range(2):
                lhs @ b
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(inner):
                    lhs @ b
                times.append((time.perf_counter() - t0) / inner)
            out[name] = macs / statistics.median(times)
    out["matrix_n"] = n
    return out


def verdict(p50: float, call_us: float | None, math_us: float) -> tuple[str, dict[str, float]]:
    call = call_us or 0.0
    shares = {"per-call overhead": call / p50, "arithmetic": math_us / p50}
    shares["everything else"] = max(0.0, 1.0 - sum(shares.values()))
    return max(shares, key=lambda k: shares[k]), shares


def bench_robot(args: Any, robot: str, rates: dict[str, float]) -> tuple[dict[str, Any], str,
                                                                        list[str]]:
    v = common.build_variants(args.checkpoint, robot, quick=args.quick, work_dir=args.work_dir,
                              seed=args.seed, profile=args.profile)
    r = v.robot
    arts = {k: v.arts[k] for k, _ in ROWS if k in v.arts}
    lat, floor = common.time_latency(arts, r, args.calls, args.rounds)
    f_us = floor["p50_us"]
    rows, table = [], []
    for key, label in ROWS:
        if key not in arts:
            continue
        a, t = arts[key], lat[key]
        macs = xm.macs(a, r)
        peak_us = macs / rates["peak_mac_per_s"] * 1e6
        mv_us = macs / rates["matvec_mac_per_s"] * 1e6
        onnx = a.format == "onnx"
        what, shares = verdict(t["p50_us"], f_us if onnx else None, peak_us)
        row = {"key": key, "label": label, "runtime": t["runtime"], "macs": macs,
               "p50_us": t["p50_us"], "p99_us": t["p99_us"], "arith_floor_peak_us": peak_us,
               "arith_floor_matvec_us": mv_us, "ort_floor_us": f_us if onnx else None,
               "shares": shares, "dominant": what}
        rows.append(row)
        table.append([label, common.fmt(macs), common.fmt(t["p50_us"], ".1f"),
                      common.fmt(t["p99_us"], ".1f"), common.fmt(peak_us, ".2f"),
                      common.fmt(mv_us, ".2f"), common.fmt(row["ort_floor_us"], ".1f"),
                      f"{shares['per-call overhead']:.0%} / {shares['arithmetic']:.0%} / "
                      f"{shares['everything else']:.0%}", what])
    headers = ["policy", "MACs", "p50 µs", "p99 µs", "arith. floor µs (peak)",
               "arith. floor µs (batch-1 rate)", "ORT call floor µs",
               "share of p50: call / arithmetic / else", "dominant"]
    cross = f_us * 1e-6 * rates["peak_mac_per_s"]
    md = (f"### {r.name}\n\n" + common.md_table(headers, table) + "\n\n"
          f"One onnxruntime call ({f_us:.1f} µs) costs as much time as {cross:,.0f} MACs at the "
          f"peak rate ({f_us * 1e-6 * rates['matvec_mac_per_s']:,.0f} at the matrix-vector "
          "rate): a policy with fewer MACs than that is bound by calling the runtime, not by its "
          "arithmetic.")
    notes = v.notes + [n for b in v.builds.values() for n in b.notes]
    if "slim-fp32" not in arts:
        notes.append(f"{r.name}: no slim student built; the table shows the generic graphs only")
    return {"robot": r.name, "rows": rows, "ort_floor_us": floor,
            "crossover_macs_peak_rate": cross}, md, notes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__.split("\n\n")[0], ["spot"])
    ap.add_argument("--calls", type=int, default=None,
                    help="batch-1 calls per policy per round (default 2000; quick 300)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved timing rounds (default 3; quick 1)")
    ap.add_argument("--matrix-n", type=int, default=1024, help="size of the rate matmul")
    args = common.parse(ap, argv, "runtime_floor")
    args.calls = args.calls or (300 if args.quick else 2000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    started = time.perf_counter()
    rates = mac_rates(args.matrix_n, 3 if args.quick else 10)
    results, md, notes = common.each_robot(args, lambda robot: bench_robot(args, robot, rates))
    head = (f"This CPU, one thread, fp32: {rates['peak_mac_per_s'] / 1e9:.1f} GMAC/s on a "
            f"{args.matrix_n}² matmul (peak), {rates['matvec_mac_per_s'] / 1e9:.1f} GMAC/s on a "
            f"1×{args.matrix_n} @ {args.matrix_n}² matrix-vector product (the batch-1 shape).")
    return common.finish(args, "runtime_floor", {"rates": rates, "robots": results},
                         head + "\n\n" + md, notes, started)


if __name__ == "__main__":
    main()
