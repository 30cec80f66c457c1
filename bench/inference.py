"""Inference cost of each policy a user could deploy for one robot, measured in one run.

Rows: the fat checkpoint in torch eager (the network as trained, driven by the body's descriptors);
the pinned fat network in torch eager; the generic export-and-quantize path (pin-embodiment,
export-onnx, quantize: the fat network's own graph as ONNX fp32 and int8); the slim student
(pin-embodiment[, rl-finetune], distill, export-onnx, quantize) as ONNX fp32, int8 and fp16; and
onnxruntime's empty-graph floor (the cost of calling a runtime at all).

Columns: bytes on disk; batch-1 latency on one thread (median and p99 over `--calls` calls per
round, median over `--rounds` interleaved rounds, after a warm-up; xcompile.measure.latency);
speed-up and size reduction against the fat network; latency as a multiple of the floor; batch-64
throughput in rows/s. A GPU section times torch CUDA (fat, pinned, student) and TensorRT engines
where they exist, else it says in one line why it was skipped.

    python bench/inference.py                      # spot, the sample checkpoint
    python bench/inference.py --quick --robots a1  # < 2 min: the test suite runs this
"""

from __future__ import annotations

import time
from typing import Any

import common

from xcompile.sim.env import obs_dim

ROWS = [  # key, label
    ("fat", "fat checkpoint, torch eager"),
    ("pinned", "pinned fat network, torch eager"),
    ("generic-fp32", "generic: pinned → ONNX fp32"),
    ("generic-int8", "generic: pinned → ONNX int8"),
    ("student", "slim student, torch eager"),
    ("slim-fp32", "slim student → ONNX fp32"),
    ("slim-int8", "slim student → ONNX int8"),
    ("slim-fp16", "slim student → ONNX fp16"),
]


def bench_robot(args: Any, robot: str) -> tuple[dict[str, Any], str, list[str]]:
    v = common.build_variants(args.checkpoint, robot, quick=args.quick, work_dir=args.work_dir,
                              seed=args.seed, profile=args.profile)
    r = v.robot
    arts = {k: v.arts[k] for k, _ in ROWS if k in v.arts}
    lat, floor = common.time_latency(arts, r, args.calls, args.rounds)
    tput = {k: common.throughput(a, r, 64, args.tput_calls) for k, a in arts.items()}
    fat_p50 = lat.get("fat", {}).get("p50_us")
    fat_bytes = arts["fat"].n_bytes if "fat" in arts else None
    rows, table = [], []
    for key, label in ROWS:
        if key not in arts:
            table.append([label, "not built (see notes)"] + [""] * 7)
            continue
        a, t = arts[key], lat[key]
        row = {"key": key, "label": label, "format": a.format,
               "precision": a.meta.get("precision", "fp32"), "runtime": t["runtime"],
               "bytes": a.n_bytes, "p50_us": round(t["p50_us"], 2), "p99_us": round(t["p99_us"], 2),
               "calls": t["calls"], "speedup_vs_fat": common.ratio(fat_p50, t["p50_us"]),
               "size_reduction_vs_fat": common.ratio(fat_bytes, a.n_bytes),
               "x_floor": common.ratio(t["p50_us"], floor["p50_us"]),
               "b64_rows_per_s": round(tput[key], 1)}
        rows.append(row)
        table.append([label, row["runtime"], common.fmt(row["bytes"]),
                      common.fmt(row["p50_us"], ".1f"), common.fmt(row["p99_us"], ".1f"),
                      common.fmt(row["speedup_vs_fat"], ".1f") + "×",
                      common.fmt(row["size_reduction_vs_fat"], ".1f") + "×",
                      common.fmt(row["x_floor"], ".1f") + "×", common.fmt(row["b64_rows_per_s"],
                                                                         ",.0f")])
    table.append(["onnxruntime empty graph (floor)", "onnxruntime", "–",
                  common.fmt(floor["p50_us"], ".1f"), "–",
                  common.fmt(common.ratio(fat_p50, floor["p50_us"]), ".1f") + "×", "–", "1.0×",
                  "–"])
    headers = ["policy", "runtime", "bytes", "p50 µs", "p99 µs", "speed-up vs fat",
               "smaller than fat", "× floor", "batch-64 rows/s"]
    md = (f"### {r.name} (obs {obs_dim(r)}, batch-1 latency: {args.rounds} rounds × "
          f"{args.calls} calls, one thread)\n\n" + common.md_table(headers, table))
    gpu, gpu_md = gpu_section(v, args)
    md += "\n\n" + gpu_md
    notes = v.notes + [n for b in v.builds.values() for n in b.notes]
    for fp, q in (("generic-fp32", "generic-int8"), ("slim-fp32", "slim-int8")):
        if fp in lat and q in lat and lat[q]["p50_us"] > lat[fp]["p50_us"]:
            notes.append(f"{r.name}: {q} is {lat[q]['p50_us'] / lat[fp]['p50_us']:.2f}× the "
                         f"latency of {fp} but {arts[fp].n_bytes / arts[q].n_bytes:.1f}× smaller: "
                         "int8 buys bytes here, not CPU latency")
    res = {"robot": r.name, "rows": rows, "ort_floor_us": floor, "gpu": gpu, "notes": notes}
    return res, md, res["notes"]


# --------------------------------------------------------------------------------------------
# GPU


def gpu_section(v: common.Variants, args: Any) -> tuple[dict[str, Any], str]:
    import torch

    if not torch.cuda.is_available():
        why = (f"GPU section skipped: torch {torch.__version__} sees no CUDA device "
               "(torch.cuda.is_available() is False)")
        return {"skipped": why}, why
    try:
        return _gpu(v, args)
    except Exception as e:  # noqa: BLE001 - a report boundary: keep the CPU tables, say why
        why = f"GPU section failed: {type(e).__name__}: {e}"
        return {"error": why}, why


def _cuda_time(call: Any, x: Any, calls: int) -> float:
    """Median µs of `call(x)` on the GPU, synchronised per call (what a control loop sees)."""
    import numpy as np
    import torch

    for _ in range(max(10, calls // 10)):
        call(x)
    torch.cuda.synchronize()
    t = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter_ns()
        call(x)
        torch.cuda.synchronize()
        t[i] = time.perf_counter_ns() - t0
    return float(np.median(t) / 1e3)


def _gpu(v: common.Variants, args: Any) -> tuple[dict[str, Any], str]:
    import torch

    from xcompile.models.checkpoint import load_checkpoint
    from xcompile.models.slim import load_torch_policy
    from xcompile.policy import body_descriptors
    from xcompile.sim.observations import random_obs

    r, dev = v.robot, torch.device("cuda")
    obs = torch.as_tensor(random_obs(r, 64, seed=3), device=dev)
    calls: dict[str, Any] = {}
    if "fat" in v.arts:
        ckpt = load_checkpoint(v.arts["fat"].path)
        model = ckpt.model.to(dev)
        desc = torch.as_tensor(body_descriptors(ckpt, r)[0], device=dev)
        calls["fat"] = lambda x, m=model, d=desc: m.act(x, d, r.family)
    for key in ("pinned", "student"):
        if key in v.arts:
            calls[key] = load_torch_policy(v.arts[key].path).to(dev).eval()
    rows = []
    with torch.inference_mode():
        for key, call in calls.items():
            b1 = _cuda_time(call, obs[:1], args.calls)
            b64 = _cuda_time(call, obs, max(50, args.calls // 4))
            rows.append({"policy": key, "runtime": "torch CUDA eager", "b1_us": b1,
                         "b64_rows_per_s": 64 / (b64 / 1e6)})
    trt_note = _tensorrt_rows(v, args, rows, obs)
    table = [[x["policy"], x["runtime"], common.fmt(x["b1_us"], ".1f"),
              common.fmt(x["b64_rows_per_s"], ",.0f")] for x in rows]
    md = (f"GPU: {torch.cuda.get_device_name(0)}\n\n"
          + common.md_table(["policy", "runtime", "batch-1 µs (p50)", "batch-64 rows/s"], table)
          + (f"\n\n{trt_note}" if trt_note else ""))
    return {"device": torch.cuda.get_device_name(0), "rows": rows, "tensorrt_note": trt_note}, md


def _tensorrt_rows(v: common.Variants, args: Any, rows: list[dict[str, Any]], obs: Any) -> str:
    """Build engines with the build-tensorrt pass from the ONNX stages and time them."""
    import torch

    from xcompile.errors import ToolUnavailable
    from xcompile.passes.build_tensorrt import import_tensorrt

    try:
        trt = import_tensorrt()
    except ToolUnavailable as e:
        return f"TensorRT rows skipped: {e}"
    for key in ("generic-fp32", "generic-int8", "slim-fp32", "slim-int8", "slim-fp16"):
        if key not in v.arts:
            continue
        b = common.build(v.arts[key], v.robot, ["build-tensorrt"], quick=args.quick,
                         work_dir=args.work_dir, tag=f"trt-{key}", seed=args.seed)
        eng_art = b.artifact("build-tensorrt")
        if eng_art is None:
            rows.append({"policy": key, "runtime": "TensorRT", "b1_us": None,
                         "b64_rows_per_s": None, "error": b.error or "; ".join(b.notes)})
            continue
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            eng_art.path.read_bytes())
        ctx = engine.create_execution_context()
        stream = torch.cuda.Stream()

        def run(x: Any, ctx: Any = ctx, stream: Any = stream, n_act: int = v.robot.n_joints
                ) -> Any:
            y = torch.empty((x.shape[0], n_act), device=x.device)
            ctx.set_input_shape("obs", tuple(x.shape))
            ctx.set_tensor_address("obs", x.data_ptr())
            ctx.set_tensor_address("action", y.data_ptr())
            ctx.execute_async_v3(stream.cuda_stream)
            stream.synchronize()
            return y

        b1 = _cuda_time(run, obs[:1].contiguous(), args.calls)
        b64 = _cuda_time(run, obs.contiguous(), max(50, args.calls // 4))
        rows.append({"policy": key, "runtime": f"TensorRT {trt.__version__}", "b1_us": b1,
                     "b64_rows_per_s": 64 / (b64 / 1e6)})
    return ""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__.split("\n\n")[0], ["spot"])
    ap.add_argument("--calls", type=int, default=None,
                    help="batch-1 calls per variant per round (default 2000; quick 300)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved timing rounds (default 3; quick 1)")
    ap.add_argument("--tput-calls", type=int, default=None,
                    help="batch-64 calls per variant (default 300; quick 20)")
    args = common.parse(ap, argv, "inference")
    args.calls = args.calls or (300 if args.quick else 2000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.tput_calls = args.tput_calls or (20 if args.quick else 300)
    started = time.perf_counter()
    results, md, notes = common.each_robot(args, lambda robot: bench_robot(args, robot))
    return common.finish(args, "inference", results, md, notes, started)


if __name__ == "__main__":
    main()
