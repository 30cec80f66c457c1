"""Compiling emitted C policies: find a compiler, build a shared library and load it through
ctypes (`CPolicy`), measure object sizes (binutils `size`), stack use (gcc -fstack-usage) and the
latency of one call in a small C harness.

Every tool runs as a subprocess without a shell, with a timeout; temporary files live in a
TemporaryDirectory.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xcompile.errors import ContractError, ToolUnavailable, XCompileError

CFLAGS: tuple[str, ...] = ("-std=c99", "-O2", "-Wall", "-Wextra", "-Werror")
TIMEOUT_S = 300


def find_cc() -> str:
    """$CC if set, else the first of cc, gcc, clang on PATH."""
    env = os.environ.get("CC", "").strip()
    if env:
        words = shlex.split(env)
        if not words or shutil.which(words[0]) is None:
            raise ToolUnavailable(f"CC={env!r}, but there is no program {words[0] if words else ''}"
                                  f"; set CC to a C compiler on PATH (or unset it)")
        return env
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    raise ToolUnavailable("no C compiler found (cc, gcc or clang on PATH); install one "
                          "(e.g. `apt install gcc`) or set CC to its path")


def _run(cmd: Sequence[str], what: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                             check=False)
    except FileNotFoundError as e:
        raise ToolUnavailable(f"{what}: {cmd[0]} is not installed ({e.strerror})") from e
    except subprocess.TimeoutExpired as e:
        raise XCompileError(f"{what}: {cmd[0]} ran over {timeout:.0f} s") from e
    if res.returncode != 0:
        err = "\n".join((res.stderr or res.stdout).strip().splitlines()[:15])
        raise XCompileError(f"{what} failed ({shlex.join(cmd)}):\n{err}")
    return res


def _cc(cc: str | None, prefix: str = "") -> list[str]:
    if cc:
        return shlex.split(cc)
    if prefix:
        return [f"{prefix}gcc"]
    return shlex.split(find_cc())


def compile_shared(c_path: Path, out: Path, cc: str | None = None,
                   extra_flags: Sequence[str] = ()) -> Path:
    """Compile policy.c (its header beside it) into the shared library `out`."""
    c_path, out = Path(c_path), Path(out)
    cmd = [*_cc(cc), *CFLAGS, "-fPIC", "-shared", *extra_flags, "-o", str(out), str(c_path), "-lm"]
    _run(cmd, f"compiling {c_path.name}")
    return out


class CPolicy:
    """A compiled policy loaded through ctypes; call it on observations like a session."""

    def __init__(self, lib_path: Path, obs_dim: int, act_dim: int):
        self.lib_path = Path(lib_path)
        try:
            lib = ctypes.CDLL(str(self.lib_path.resolve()))
        except OSError as e:
            raise XCompileError(f"{lib_path}: cannot load the compiled policy ({e})") from e
        try:
            lib.xc_policy_step_batch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            lib.xc_policy_step_batch.restype = None
            lib.xc_policy_reset.restype = None
            lib.xc_policy_obs_dim.restype = ctypes.c_int
            lib.xc_policy_act_dim.restype = ctypes.c_int
        except AttributeError as e:
            raise XCompileError(f"{lib_path}: not a policy compiled by emit-c ({e})") from e
        got = (lib.xc_policy_obs_dim(), lib.xc_policy_act_dim())
        if got != (obs_dim, act_dim):
            raise ContractError(f"{lib_path}: the library maps {got[0]} observations to {got[1]} "
                                f"actions, not {obs_dim} -> {act_dim}")
        self._lib, self.obs_dim, self.act_dim = lib, obs_dim, act_dim

    def reset(self) -> None:
        self._lib.xc_policy_reset()

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(obs, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.obs_dim:
            raise ContractError(f"observations of shape {list(np.shape(obs))}; this policy takes "
                                f"(batch, {self.obs_dim}) or ({self.obs_dim},)")
        y = np.empty((x.shape[0], self.act_dim), dtype=np.float32)
        for start in range(0, x.shape[0], 1 << 30):   # c_int rows per call
            xs, ys = x[start:start + (1 << 30)], y[start:start + (1 << 30)]
            self._lib.xc_policy_step_batch(xs.ctypes.data, ys.ctypes.data, xs.shape[0])
        return y


def _object(c_path: Path, tmp: Path, cc: str | None, flags: Sequence[str], prefix: str,
            extra: Sequence[str] = ()) -> Path:
    obj = tmp / (Path(c_path).stem + ".o")
    _run([*_cc(cc, prefix), *flags, *extra, "-c", "-o", str(obj), str(c_path)],
         f"compiling {Path(c_path).name}")
    return obj


def object_sizes(c_path: Path, cc: str | None = None, flags: Sequence[str] = CFLAGS,
                 prefix: str = "") -> dict[str, int]:
    """{"text", "data", "bss", "total"} bytes of policy.c compiled to an object file (`size`)."""
    with tempfile.TemporaryDirectory(prefix="xc-size-") as tmp:
        obj = _object(c_path, Path(tmp), cc, flags, prefix)
        res = _run([f"{prefix}size", "-B", str(obj)], f"{prefix}size")
    rows = [line.split() for line in res.stdout.strip().splitlines()]
    try:
        text, data, bss, dec = (int(v) for v in rows[-1][:4])
    except (IndexError, ValueError) as e:
        raise XCompileError(f"{prefix}size printed {res.stdout!r:.200}, not sizes") from e
    return {"text": text, "data": data, "bss": bss, "total": dec}


def stack_usage(c_path: Path, cc: str | None = None, flags: Sequence[str] = CFLAGS,
                prefix: str = "") -> dict[str, int]:
    """{function: bytes of stack} from gcc -fstack-usage (the .su file)."""
    with tempfile.TemporaryDirectory(prefix="xc-stack-") as tmp:
        obj = _object(c_path, Path(tmp), cc, flags, prefix, ("-fstack-usage",))
        su = obj.with_suffix(".su")
        if not su.is_file():
            raise ToolUnavailable("the compiler wrote no .su file: -fstack-usage needs gcc")
        out = {}
        for line in su.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1].strip().isdigit():
                out[parts[0].rsplit(":", 1)[-1]] = int(parts[1])
    return out


HARNESS = r"""
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "policy.h"

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv)
{
    long n_obs, n, warm, i;
    float *obs, action[XC_ACT_DIM];
    long long *ns;
    volatile float sink = 0.0f;
    FILE *f;
    if (argc != 6 || atol(argv[3]) != XC_OBS_DIM) return 2;
    n_obs = atol(argv[2]);
    n = atol(argv[4]);
    obs = malloc(sizeof(float) * XC_OBS_DIM * n_obs);
    ns = malloc(sizeof(long long) * n);
    if (!obs || !ns || n_obs < 1 || n < 1) return 3;
    f = fopen(argv[1], "rb");
    if (!f || fread(obs, sizeof(float) * XC_OBS_DIM, n_obs, f) != (size_t)n_obs) return 4;
    fclose(f);
    warm = n / 10 < 1000 ? 1000 : n / 10;
    for (i = 0; i < warm; ++i) {
        xc_policy_step(obs + (i % n_obs) * XC_OBS_DIM, action);
        sink += action[0];
    }
    for (i = 0; i < n; ++i) {
        long long t0 = now_ns(), t1;
        xc_policy_step(obs + (i % n_obs) * XC_OBS_DIM, action);
        t1 = now_ns();
        ns[i] = t1 - t0;
        sink += action[0];
    }
    f = fopen(argv[5], "wb");
    if (!f || fwrite(ns, sizeof(long long), n, f) != (size_t)n) return 5;
    fclose(f);
    free(obs);
    free(ns);
    return 0;
}
"""


def harness_samples(c_path: Path, obs: np.ndarray, n: int = 100_000, cc: str | None = None,
                    flags: Sequence[str] = CFLAGS) -> np.ndarray:
    """Per-call latencies (µs) of `n` xc_policy_step calls, timed call by call in a C harness
    cycling through the observations `obs` (after a warm-up of max(1000, n/10) calls)."""
    c_path = Path(c_path)
    x = np.ascontiguousarray(np.atleast_2d(obs), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="xc-bench-") as tmp:
        t = Path(tmp)
        (t / "xc_harness.c").write_text(HARNESS)
        exe, obs_file, out_file = t / "xc_harness", t / "obs.bin", t / "ns.bin"
        x.tofile(obs_file)
        _run([*_cc(cc), *flags, f"-I{c_path.parent}", "-o", str(exe), str(t / "xc_harness.c"),
              str(c_path), "-lm"], "compiling the latency harness")
        _run([str(exe), str(obs_file), str(len(x)), str(x.shape[1]), str(int(n)), str(out_file)],
             "the latency harness", timeout=TIMEOUT_S + n * 1e-4)
        ns = np.fromfile(out_file, dtype=np.int64)
    if len(ns) != n:
        raise XCompileError(f"the latency harness wrote {len(ns)} timings, not {n}")
    return ns.astype(np.float64) / 1000.0


def latency_stats(us: np.ndarray) -> dict[str, float]:
    """p50, p99, max and mean (µs) and the count of per-call latencies."""
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "max_us": float(us.max()), "mean_us": float(us.mean()), "n": int(len(us))}


def harness_latency(c_path: Path, obs: np.ndarray, n: int = 100_000, cc: str | None = None,
                    flags: Sequence[str] = CFLAGS) -> dict[str, float]:
    """Latency of one xc_policy_step call in the C harness (`harness_samples`): p50, p99, max and
    mean in µs."""
    return latency_stats(harness_samples(c_path, obs, n, cc, flags))
