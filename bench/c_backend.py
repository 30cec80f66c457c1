"""The C back end against the runtimes, for the same slim student: does it match, score the same,
run faster, and fit a microcontroller?

For each robot it takes the int8 `policy.onnx` of a default build (`--builds DIR` holding
`DIR/<robot>/policy.onnx`, e.g. the --out folders of `xcompile build --target ROBOT`; without it,
the script builds the slim int8 policy through the pass manager like bench/quality.py) and:

- emits C (`xcompile.cgen.emit_c`), compiles it with -Werror, and compares it with onnxruntime on
  `--check-obs` observations (random, shaped like the simulator's) plus the observations of
  closed-loop episodes: max and mean |C - onnxruntime|;
- scores both in closed loop on the same `--episodes` episodes of seed stream "bench" (the C
  through ctypes), with the paired difference C - onnxruntime and its bootstrap 95% interval;
- times, in one run and interleaved, `--calls` batch-1 calls of: the C harness (clock_gettime
  around each call, no Python; compiled -O2 -march=native for this CPU, as a deployment compiles
  for its own, and -O2 for baseline x86-64), the C through ctypes, onnxruntime (one thread, the build's own
  session options) and torch eager (the same dense layers, weights dequantized, one thread):
  p50, p99, max;
- sizes: text/data/bss of the object on this machine, the stack use of `xc_policy_step`
  (gcc -fstack-usage) and, where `arm-none-eabi-gcc` is installed (Debian: gcc-arm-none-eabi),
  the same for a Cortex-M4F (-mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16 -O2):
  the object, and the flash/RAM of a linked image (newlib-nano, libm) minus an empty image.

    python bench/c_backend.py --builds build/             # DIR/<robot>/policy.onnx, 8 robots
    python bench/c_backend.py --quick --robots a1        # < 2 min: the test suite runs this
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import numpy as np

from xcompile.artifact import file_sha256
from xcompile.evaluate import evaluate, torch_single_thread
from xcompile.onnx.model import get_metadata
from xcompile.onnx.session import ort_session, read_onnx
from xcompile.sim.observations import random_obs
from xcompile.stats import mean_ci95
from xcompile.targets import load_robot

M4_FLAGS = ("-std=c99", "-O2", "-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard",
            "-mfpu=fpv4-sp-d16")
M4_PREFIX = "arm-none-eabi-"
NATIVE_FLAGS = ("-std=c99", "-O2", "-march=native")


def policy_onnx(args: Any, robot: str) -> tuple[Path, list[str]]:
    if args.builds:
        path = Path(args.builds) / robot / "policy.onnx"
        if not path.is_file():
            raise SystemExit(f"{path} does not exist: --builds DIR must hold DIR/<robot>/"
                             "policy.onnx (the --out folder of `xcompile build`)")
        return path, []
    v = common.build_variants(args.checkpoint, robot, quick=args.quick, work_dir=args.work_dir,
                              seed=args.seed, profile=args.profile)
    if "slim-int8" not in v.arts:
        raise SystemExit(f"{robot}: no slim int8 policy was built ({'; '.join(v.notes)})")
    return v.arts["slim-int8"].path, v.notes


def ort_actions(sess: Any, obs: np.ndarray) -> np.ndarray:
    inp = sess.get_inputs()[0]
    b = inp.shape[0] if isinstance(inp.shape[0], int) else 512
    return np.concatenate([sess.run(None, {inp.name: obs[i:i + b]})[0]
                           for i in range(0, len(obs), b)])


def paired_diff_ci95(a: list[float], b: list[float]) -> tuple[float, list[float] | None]:
    d = np.asarray(a) - np.asarray(b)
    return float(d.mean()), mean_ci95(d.tolist())


def torch_model(model: Any) -> Any | None:
    """The student as torch eager: the same dense layers (`xcompile.cgen.graph.fold`), weights
    dequantized to float; None for a graph with more than dense layers and activations."""
    import torch

    from xcompile.cgen.graph import Dense, fold

    acts = {"elu": lambda a: torch.nn.ELU(a or 1.0), "relu": lambda a: torch.nn.ReLU(),
            "tanh": lambda a: torch.nn.Tanh(), "sigmoid": lambda a: torch.nn.Sigmoid()}
    mods: list[Any] = []
    for layer in fold(model)[0]:
        if not isinstance(layer, Dense) or (layer.act and layer.act.fn not in acts):
            return None
        w = layer.w.astype(np.float32) * np.float32(layer.alpha)      # Gemm's alpha
        if layer.scale is not None:
            w = w * (layer.scale[:, None] if layer.scale_axis == "in" else layer.scale)
        lin = torch.nn.Linear(layer.k, layer.n, bias=layer.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(w.T.copy()))
            if layer.bias is not None:
                lin.bias.copy_(torch.as_tensor(layer.bias))
        mods.append(lin)
        if layer.act is not None:
            mods.append(acts[layer.act.fn](layer.act.alpha))
    return torch.nn.Sequential(*mods).eval()


def time_all(calls: dict[str, Any], inputs: dict[str, Any], harness: dict[str, Any],
             n: int, rounds: int) -> dict[str, Any]:
    """Interleaved rounds: in each, n/rounds calls of every C harness build (`harness`: name ->
    flags; timed in C) and of every Python-called runtime (`calls`); per-call µs pooled over
    the rounds, so every runtime sees the same stretches of machine time."""
    from xcompile.cgen import harness_samples, latency_stats

    clock = time.perf_counter_ns
    times: dict[str, list[np.ndarray]] = {k: [] for k in (*harness, *calls)}
    per = max(1, n // rounds)
    for _ in range(rounds):
        for name, (c_path, obs, flags) in harness.items():
            times[name].append(harness_samples(c_path, obs, per, flags=flags))
        for name, call in calls.items():
            xs = inputs[name]
            for i in range(min(200, per)):
                call(xs[i % len(xs)])
            t = np.empty(per)
            for i in range(per):
                x = xs[i % len(xs)]
                t0 = clock()
                call(x)
                t[i] = clock() - t0
            times[name].append(t / 1e3)
    return {name: latency_stats(np.concatenate(ts)) for name, ts in times.items()}


def m4_sizes(c_path: Path) -> dict[str, Any] | None:
    """Cortex-M4F object sizes, stack, and linked-image flash/RAM over an empty image."""
    from xcompile.cgen import object_sizes, stack_usage

    if shutil.which(M4_PREFIX + "gcc") is None:
        return None
    obj = object_sizes(c_path, cc=M4_PREFIX + "gcc", flags=M4_FLAGS, prefix=M4_PREFIX)
    stack = stack_usage(c_path, cc=M4_PREFIX + "gcc", flags=M4_FLAGS, prefix=M4_PREFIX)
    images = {}
    with tempfile.TemporaryDirectory() as tmp:
        main = Path(tmp) / "main.c"
        for kind, body in (("empty", "int main(void) { return 0; }\n"),
                           ("policy", '#include "policy.h"\nstatic float o[XC_OBS_DIM], '
                                      "a[XC_ACT_DIM];\nint main(void) { xc_policy_step(o, a); "
                                      "return (int)a[0]; }\n")):
            main.write_text(body)
            elf = Path(tmp) / f"{kind}.elf"
            srcs = [str(main)] + ([str(c_path)] if kind == "policy" else [])
            subprocess.run([M4_PREFIX + "gcc", *M4_FLAGS, "-I", str(c_path.parent),
                            "--specs=nano.specs", "--specs=nosys.specs", *srcs, "-lm",
                            "-o", str(elf)], check=True, capture_output=True, timeout=120)
            out = subprocess.run([M4_PREFIX + "size", str(elf)], check=True,
                                 capture_output=True, text=True, timeout=60).stdout
            text, data, bss = (int(x) for x in out.splitlines()[1].split()[:3])
            images[kind] = {"text": text, "data": data, "bss": bss}
    e, p = images["empty"], images["policy"]
    return {"object": obj, "stack_bytes": stack.get("xc_policy_step"),
            "flash_bytes": (p["text"] + p["data"]) - (e["text"] + e["data"]),
            "ram_bytes": (p["data"] + p["bss"]) - (e["data"] + e["bss"]),
            "image": images}


def bench_robot(args: Any, name: str) -> tuple[dict[str, Any], str, list[str]]:
    import torch

    from xcompile.cgen import CFLAGS, CPolicy, compile_shared, emit_c, object_sizes, stack_usage

    robot = load_robot(name)
    path, notes = policy_onnx(args, name)
    model = read_onnx(path)
    meta = get_metadata(model)
    t0 = time.perf_counter()
    src = emit_c(model, contract=meta, source_sha256=file_sha256(path))
    emit_s = time.perf_counter() - t0
    sess = ort_session(path)
    tm = torch_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        c_path = Path(tmp) / "policy.c"
        c_path.write_text(src.c)
        (Path(tmp) / "policy.h").write_text(src.h)
        t0 = time.perf_counter()
        lib = compile_shared(c_path, Path(tmp) / "libpolicy.so")
        compile_s = time.perf_counter() - t0
        c = CPolicy(lib, src.obs_dim, src.act_dim)
        # --- equality: random and closed-loop observations
        obs = random_obs(robot, args.check_obs, seed=args.seed + 11)
        ort_res = evaluate(lambda o: ort_actions(sess, np.asarray(o, np.float32)), robot,
                           episodes=args.episodes, seed=args.seed, stream="bench",
                           record_obs=True)
        closed = np.concatenate(ort_res.observations).astype(np.float32)
        allobs = np.concatenate([obs, closed])
        err = np.abs(c(allobs) - ort_actions(sess, allobs))
        terr = None
        if tm is not None:
            with torch.inference_mode():
                terr = float(np.abs(tm(torch.as_tensor(allobs)).numpy()
                                    - ort_actions(sess, allobs)).max())
        # --- closed loop: the same episodes
        c_res = evaluate(c, robot, episodes=args.episodes, seed=args.seed, stream="bench")
        diff, diff_ci = paired_diff_ci95(c_res.scores, ort_res.scores)
        # --- latency, one run
        x1 = obs[:256]
        inputs = {"c_ctypes": [x1[i] for i in range(len(x1))],
                  "onnxruntime": [{sess.get_inputs()[0].name: x1[i:i + 1]}
                                  for i in range(len(x1))],
                  "torch": [torch.as_tensor(x1[i:i + 1]) for i in range(len(x1))]}
        run = sess.run
        calls = {"c_ctypes": c, "onnxruntime": lambda f: run(None, f), "torch": tm}
        if tm is None:
            del calls["torch"]
            notes.append(f"{name}: no torch row (the graph is more than dense layers)")
        builds = {"c_harness": (c_path, x1, NATIVE_FLAGS),       # built for this CPU
                  "c_harness_portable": (c_path, x1, CFLAGS)}    # baseline x86-64
        with torch_single_thread(), torch.inference_mode():
            lat = time_all(calls, inputs, builds, args.calls, args.rounds)
        harness, portable = lat["c_harness"], lat["c_harness_portable"]
        host = object_sizes(c_path)
        stack = stack_usage(c_path).get("xc_policy_step")
        m4 = m4_sizes(c_path) if not args.no_cross else None
    res = {"robot": name, "onnx": str(path), "onnx_sha256": file_sha256(path),
           "precision": meta.get("precision"), "layers": list(src.layers),
           "weight_bytes": src.weight_bytes, "c_bytes": len(src.c), "emit_s": emit_s,
           "compile_s": compile_s, "check_obs": int(len(allobs)),
           "max_abs_err": float(err.max()), "mean_abs_err": float(err.mean()),
           "torch_max_abs_err": terr,
           "scores": {"c": c_res.scores, "onnxruntime": ort_res.scores},
           "score": {"c": c_res.score, "onnxruntime": ort_res.score},
           "score_ci95": {"c": c_res.score_ci95, "onnxruntime": ort_res.score_ci95},
           "diff_c_minus_ort": diff, "diff_ci95": diff_ci, "latency": lat,
           "speedup_p50_vs_ort": lat["onnxruntime"]["p50_us"] / harness["p50_us"],
           "host_object": host, "host_stack_bytes": stack, "cortex_m4": m4}
    ci = diff_ci or [diff, diff]
    row = [name, meta.get("precision", "?"), f"{err.max():.1e}", f"{c_res.score:.3f}",
           f"{ort_res.score:.3f}", f"{diff:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]",
           f"{harness['p50_us']:.2f} / {harness['p99_us']:.2f} / {harness['max_us']:.0f}",
           f"{portable['p50_us']:.2f}",
           f"{lat['c_ctypes']['p50_us']:.2f}", f"{lat['onnxruntime']['p50_us']:.2f} / "
           f"{lat['onnxruntime']['p99_us']:.2f}",
           f"{lat['torch']['p50_us']:.1f}" if "torch" in lat else "–",
           f"{res['speedup_p50_vs_ort']:.1f}×", f"{host['text'] + host['data']:,}",
           f"{stack}", (f"{m4['flash_bytes']:,} / {m4['ram_bytes']:,}" if m4 else "–")]
    return res, row, notes


HEADERS = ["robot", "precision", "max |C − ORT|", "score C", "score ORT",
           "C − ORT [95% CI]", "C harness p50 / p99 / max µs", "C portable p50 µs",
           "C ctypes p50 µs",
           "ORT p50 / p99 µs", "torch p50 µs", "ORT p50 / C p50", "host text+data B",
           "stack B", "Cortex-M4 flash / RAM B"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__.split("\n\n")[0], common.list_robots())
    ap.add_argument("--builds", default=None, help="folder holding <robot>/policy.onnx (default: "
                    "build the slim int8 policy like bench/quality.py)")
    ap.add_argument("--episodes", type=int, default=None,
                    help="closed-loop episodes per robot, stream 'bench' (default 50; quick 2)")
    ap.add_argument("--calls", type=int, default=None,
                    help="timed batch-1 calls per runtime (default 100000; quick 2000)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--check-obs", type=int, default=10_000,
                    help="random observations C is compared with onnxruntime on")
    ap.add_argument("--no-cross", action="store_true", help="skip the Cortex-M4 sizes")
    args = common.parse(ap, argv, "c_backend", need_checkpoint=False)
    args.episodes = args.episodes or (2 if args.quick else 50)
    args.calls = args.calls or (2000 if args.quick else 100_000)
    if args.quick:
        args.check_obs = min(args.check_obs, 2000)
    started = time.perf_counter()
    rows, results, notes = [], [], []
    for robot in args.robots:
        res, row, n = bench_robot(args, robot)
        results.append(res)
        rows.append(row)
        notes += n
    md = (common.md_table(HEADERS, rows) + "\n\nPolicies (int8 ONNX, sha256): " + ", ".join(
        f"{r['robot']} `{r['onnx_sha256'][:12]}`" for r in results) + ". Latency: "
        f"{args.calls:,} batch-1 calls per runtime in {args.rounds} interleaved rounds: the C "
        "harness compiled -O2 -march=native (\"C portable\": -O2 for baseline x86-64), timed in "
        "C; C through ctypes, onnxruntime and torch on one thread, called from Python. Scores: "
        f"{args.episodes} episodes of stream 'bench', the same for C and onnxruntime; C − ORT "
        "is the paired difference with its bootstrap 95% interval.")
    return common.finish(args, "c_backend", results, md, notes, started)


if __name__ == "__main__":
    main()
