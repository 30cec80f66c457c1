"""RAPTOR (PyPI foundation-policy), compiled the thin way: size, latency and error of its ONNX forms.

RAPTOR is a recurrent quadrotor policy nobody here wrote (Dense 22->16, GRU(16), Dense 16->4).
examples/raptor/convert.py turns the package's checkpoint into ONNX with the GRU state explicit
(obs, h_in -> action, h_out). This is what the thin plan's export and quantize make of it, open
loop (its closed-loop flight, and its compiled students, are bench/quadrotor.py's):

- fp32: the converted graph as it is;
- int8 weight-only: onnxruntime `quantize_static` (QDQ, symmetric int8, per tensor, MatMul/Gemm
  weights only: biases and the GRU's element-wise arithmetic stay float), then the activation
  Q/DQ pairs removed by `xcompile.onnx.graph.weight_only`, as the quantize pass does for onnxruntime-cpu;
  `ort_session` folds the int8 weights to float at load (contract `int8_activations` = "false");
- int8 dynamic: onnxruntime `quantize_dynamic` (8-bit weights; the activations quantized to uint8
  on every call, MatMulInteger). Its weights are int8 where the CPU multiplies u8 x s8 exactly
  and uint8 where it does not (x86 with AVX2 but no VNNI, `int8_dot_products_exact`): there the
  u8 x s8 kernel adds pairs of products in 16 bits and saturates (RAPTOR's actions off by 1.0),
  while u8 x u8 is widened first and stays exact; the row's label says which;
- fp16: `onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)`, as the
  quantize pass's fp16 (obs, h_in, action, h_out stay float32).

For each: bytes on disk; p50/p99 of a batch-1 step with its state input in onnxruntime (one
thread, sequential; `xcompile.measure`'s timing loop, all variants interleaved in `--rounds`
rounds of `--calls` calls, each figure the median over rounds), replaying the (obs, h_in) pairs
of the package's example sequence; and the largest |action - reference| with the state carried,
where the reference is the package's own numpy implementation (foundation_policy.Raptor), over
the shipped example (2 x 500 steps) and over 5 seeded random sequences of 200 steps.

    python bench/raptor.py              # < 1 min
    python bench/raptor.py --quick      # the test suite runs this
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path
from typing import Any

import common
import numpy as np

from xcompile import measure as xm
from xcompile.onnx.contract import extend_contract
from xcompile.onnx.graph import drop_unused_opsets, weight_only
from xcompile.onnx.model import get_metadata, save_onnx, set_metadata
from xcompile.onnx.session import int8_dot_products_exact, ort_session

EXAMPLE = common.REPO / "examples" / "raptor"
# quantize_dynamic's weight type: int8 where u8 x s8 products are exact on this CPU, else uint8.
DYNAMIC_WEIGHTS = (("int8 weights", "QInt8") if int8_dot_products_exact()
                   else ("uint8 weights: u8 x s8 saturates on this CPU", "QUInt8"))
ROWS = [("fp32", "fp32 (as converted)"), ("int8-weight-only", "int8 weight-only (W8A32)"),
        ("int8-dynamic", f"int8 dynamic (quantize_dynamic, {DYNAMIC_WEIGHTS[0]})"),
        ("fp16", "fp16")]


def _module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"raptor_{name}", EXAMPLE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_variants(fp32: Path, calib: list[dict[str, np.ndarray]]) -> dict[str, Path]:
    """The quantized and fp16 forms of the converted model, written beside it."""
    import onnx
    from onnxconverter_common import float16
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder, meta = fp32.parent, get_metadata(onnx.load(str(fp32)))
    paths = {"fp32": fp32}

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    # Shape inference first, as the quantize pass does (quant_pre_process; its optimizer also
    # fuses each MatMul + bias Add into a Gemm).
    pre = folder / "raptor_pre.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=False)
    qdq = folder / "raptor_int8_qdq.onnx"
    q.quantize_static(str(pre), str(qdq), Reader(), quant_format=q.QuantFormat.QDQ,
                      activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                      op_types_to_quantize=["MatMul", "Gemm"], per_channel=False,
                      extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                     "QuantizeBias": False, "DedicatedQDQPair": True})
    model = weight_only(onnx.load(str(qdq)))
    qdq.unlink()
    drop_unused_opsets(model)
    set_metadata(model, extend_contract(meta, "quantize", precision="int8",
                                        int8_activations="false"))
    paths["int8-weight-only"] = save_onnx(model, folder / "raptor_int8_weight_only.onnx")

    dyn = folder / "raptor_int8_dynamic.onnx"
    q.quantize_dynamic(str(pre), str(dyn), weight_type=q.QuantType[DYNAMIC_WEIGHTS[1]],
                       op_types_to_quantize=["MatMul", "Gemm"], per_channel=False)
    pre.unlink()
    model = onnx.load(str(dyn))
    drop_unused_opsets(model)
    set_metadata(model, extend_contract(meta, "quantize", precision="int8",
                                        quantization="dynamic (MatMulInteger)"))
    paths["int8-dynamic"] = save_onnx(model, dyn)

    model = float16.convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    set_metadata(model, extend_contract(meta, "quantize", precision="fp16"))
    paths["fp16"] = save_onnx(model, folder / "raptor_fp16.onnx")
    return paths


def weight_bytes(path: Path) -> int:
    """Bytes of the graph's initializers (weights, biases, scales): the file less its graph
    structure and metadata."""
    import onnx
    from onnx import numpy_helper

    return int(sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer))


def time_variants(sessions: dict[str, Any], feeds: list[dict[str, np.ndarray]], calls: int,
                  rounds: int) -> tuple[dict[str, dict[str, float]], float]:
    """Interleaved batch-1 timing ({key: {p50_us, p99_us}}) and onnxruntime's empty-graph floor
    (one (1, 22) input), both the median over rounds."""
    per: dict[str, list[dict[str, float]]] = {k: [] for k in sessions}
    floors = []
    for _ in range(rounds):
        for k, sess in sessions.items():
            run = sess.run
            per[k].append(xm._time_calls(lambda f, run=run: run(None, f), feeds, calls))
        floors.append(xm.ort_floor_us(22, calls))
    return ({k: {m: statistics.median(r[m] for r in v) for m in ("p50_us", "p99_us")}
             for k, v in per.items()}, statistics.median(floors))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    rollout = _module("rollout")
    convert = _module("convert")
    ap = common.parser(__doc__.split("\n\n")[0], [], default_profile=None)
    try:
        default_ckpt = str(rollout.package_checkpoint())
    except ImportError:
        default_ckpt = "(foundation-policy is not installed)"
    ap.set_defaults(checkpoint=default_ckpt)
    ap.add_argument("--calls", type=int, default=None,
                    help="batch-1 calls per variant per round (default 2000; quick 300)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved timing rounds (default 5; quick 1)")
    ap.add_argument("--sequences", type=int, default=5, help="random sequences (default 5)")
    ap.add_argument("--steps", type=int, default=200, help="steps per random sequence")
    args = common.parse(ap, argv, "raptor")
    args.calls = args.calls or (300 if args.quick else 2000)
    args.rounds = args.rounds or (1 if args.quick else 5)
    started = time.perf_counter()

    fp32, _ = convert.convert(Path(args.work_dir) / "raptor", Path(args.checkpoint))
    x_ex, y_ex = rollout.example_sequences(Path(args.checkpoint))
    x_rand = rollout.random_sequences(args.sequences, args.steps, seed=args.seed)
    ref_ex, ref_rand = rollout.reference_rollout(x_ex), rollout.reference_rollout(x_rand)
    base = ort_session(fp32)
    _, states = rollout.onnx_rollout(base, x_ex)
    calib = [{"obs": x_ex[t], "h_in": states[t]} for t in range(0, len(x_ex), 5)]
    paths = make_variants(fp32, calib)
    sessions = {k: ort_session(p) for k, p in paths.items()}
    # Batch 1: the first example sequence's (obs, h_in) pairs, as the fp32 model met them.
    feeds = [{"obs": x_ex[t, :1], "h_in": states[t][:1]} for t in range(len(x_ex))]
    lat, floor = time_variants(sessions, feeds, args.calls, args.rounds)

    rows, table = [], []
    for key, label in ROWS:
        a_ex, _ = rollout.onnx_rollout(sessions[key], x_ex)
        a_rand, _ = rollout.onnx_rollout(sessions[key], x_rand)
        row = {"key": key, "label": label, "path": str(paths[key]),
               "bytes": paths[key].stat().st_size, "weight_bytes": weight_bytes(paths[key]),
               "params": xm.onnx_param_count(paths[key]),
               "p50_us": lat[key]["p50_us"], "p99_us": lat[key]["p99_us"],
               "max_err_example": float(np.abs(a_ex - ref_ex).max()),
               "max_err_random": float(np.abs(a_rand - ref_rand).max()),
               "max_err_example_vs_shipped": float(np.abs(a_ex - y_ex).max())}
        rows.append(row)
        table.append([label, common.fmt(row["bytes"]), common.fmt(row["weight_bytes"]),
                      common.fmt(row["p50_us"], ".1f"),
                      common.fmt(row["p99_us"], ".1f"), f"{row['max_err_example']:.2g}",
                      f"{row['max_err_random']:.2g}"])
    n_ex, n_rand = x_ex.shape[1], x_rand.shape[1]
    headers = ["RAPTOR ONNX", "bytes", "of which weights", "p50 µs", "p99 µs",
               f"max abs action error, example ({n_ex} × {len(x_ex)} steps)",
               f"max abs action error, random ({n_rand} × {len(x_rand)} steps)"]
    macs = xm.onnx_macs(fp32)
    ship = float(np.abs(ref_ex - y_ex).max())
    md = (common.md_table(headers, table) + "\n\n"
          f"Batch-1 step (obs and h_in in, action and h_out out), one thread; onnxruntime's "
          f"empty-graph floor (one (1, 22) input) {floor:.1f} µs; {macs:,} MACs per step. Errors "
          "against foundation_policy's numpy reference with the state carried (its own outputs "
          f"differ from the shipped example outputs by {ship:.2g}). Raw actions, before any "
          "clipping to [-1, 1].")
    notes = ["closed-loop scores of RAPTOR and its compiled students: bench/quadrotor.py",
             f"int8 and fp16 timed in onnxruntime on this CPU; {args.calls} calls x "
             f"{args.rounds} rounds per variant"]
    results = {"rows": rows, "ort_floor_us": floor, "macs": macs,
               "reference_vs_shipped_max_abs": ship,
               "package_version": convert.package_version(),
               "sequences": {"example": list(x_ex.shape), "random": list(x_rand.shape),
                             "random_seed": args.seed}}
    return common.finish(args, "raptor", results, md, notes, started)


if __name__ == "__main__":
    main()
