"""C back end: a slim ONNX policy as dependency-free C99 (policy.c, policy.h), and the toolchain
helpers to compile, load (ctypes), size and time it.

`emit_c` folds the ONNX graph into layers (`graph`), prints them as C (`emit`, `header`);
`toolchain` compiles and measures the result.
"""

from xcompile.cgen.emit import EMITTER_VERSION
from xcompile.cgen.source import CSources, emit_c
from xcompile.cgen.toolchain import (
    CFLAGS,
    CPolicy,
    compile_shared,
    find_cc,
    harness_latency,
    harness_samples,
    latency_stats,
    object_sizes,
    stack_usage,
)

__all__ = ["CFLAGS", "EMITTER_VERSION", "CPolicy", "CSources", "compile_shared", "emit_c",
           "find_cc", "harness_latency", "harness_samples", "latency_stats", "object_sizes",
           "stack_usage"]
