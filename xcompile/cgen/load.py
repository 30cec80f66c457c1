"""Running emitted C as a policy, without ever compiling code xcompile did not write.

Loading a policy never runs code from it, and a `.c` file is code. So `xcompile eval policy.c`
accepts a C policy only when it is, byte for byte, what xcompile's emitter makes from an ONNX
policy it can read: `policy.c` names the sha256 of its source ONNX in its header
(`XC_SOURCE_SHA256`); the ONNX with that hash must lie beside it (`policy.onnx`, or the `.c` name
with `.onnx`), and emitting it again must give the same `policy.c` and `policy.h`. Then the code is
compiled into a temporary folder and called through ctypes. An edited file, one from another
emitter version, or one whose ONNX is missing is refused with a message that says which.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from xcompile.artifact import file_sha256
from xcompile.errors import CheckpointError
from xcompile.onnx.model import get_metadata
from xcompile.onnx.session import read_onnx

SHA_LINE = re.compile(rb'#define\s+XC_SOURCE_SHA256\s+"([0-9a-f]{64})"')
MAX_C_BYTES = 64 * 1024**2


def source_sha256(text: bytes) -> str | None:
    m = SHA_LINE.search(text)
    return m.group(1).decode() if m else None


def verified_sources(c_path: Path, onnx_path: Path | None = None):  # -> (CSources, metadata)
    """The emitter's output for the ONNX beside `c_path`, checked equal to the files on disk,
    and that ONNX's metadata (the deployment contract)."""
    from xcompile.cgen import emit_c

    c_path = Path(c_path)
    h_path = c_path.parent / "policy.h"
    for p in (c_path, h_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: no such file (a C policy is policy.c with policy.h "
                                  "beside it, as `xcompile build --emit c` writes them)")
        if p.stat().st_size > MAX_C_BYTES:
            raise CheckpointError(f"{p}: over {MAX_C_BYTES >> 20} MB; not a C policy xcompile "
                                  "emitted")
    c_bytes, h_bytes = c_path.read_bytes(), h_path.read_bytes()
    sha = source_sha256(h_bytes)
    if sha is None:
        raise CheckpointError(f"{h_path}: no XC_SOURCE_SHA256 line; xcompile only runs C it "
                              "emitted itself (`xcompile build ... --emit c`)")
    candidates = [onnx_path] if onnx_path else [c_path.with_suffix(".onnx"),
                                                 c_path.parent / "policy.onnx"]
    found = next((p for p in candidates if p and p.is_file() and file_sha256(p) == sha), None)
    if found is None:
        raise CheckpointError(
            f"{c_path}: the ONNX policy it was emitted from (sha256 {sha[:12]}…) is not beside "
            f"it ({', '.join(p.name for p in candidates if p)}); xcompile runs a C policy only "
            "after emitting it again from its ONNX and finding the same code")
    model = read_onnx(found)
    meta = get_metadata(model)
    src = emit_c(model, contract=meta, header_name=h_path.name,
                 source_sha256=sha)
    if src.c.encode() != c_bytes or src.h.encode() != h_bytes:
        which = " and ".join(n for n, ok in (("policy.c", src.c.encode() == c_bytes),
                                             ("policy.h", src.h.encode() == h_bytes)) if not ok)
        raise CheckpointError(
            f"{c_path.parent}: {which} is not what this xcompile emits from {found.name} "
            "(edited by hand, or emitted by another xcompile version); xcompile only runs C it "
            "emitted itself. Emit it again: xcompile build ... --emit c")
    return src, meta


def load_c_policy(c_path: Path, onnx_path: Path | None = None):
    """(CPolicy, CSources, contract): the verified C policy at `c_path`, compiled into a
    temporary folder and loaded, with its ONNX's deployment contract."""
    from xcompile.cgen import CPolicy, compile_shared, find_cc

    src, meta = verified_sources(c_path, onnx_path)
    cc = find_cc()
    with tempfile.TemporaryDirectory(prefix="xcompile-c-") as tmp:
        c = Path(tmp) / "policy.c"
        c.write_text(src.c)
        (Path(tmp) / "policy.h").write_text(src.h)
        lib = compile_shared(c, Path(tmp) / "libpolicy.so", cc=cc)
        policy = CPolicy(lib, src.obs_dim, src.act_dim)   # loaded: the file may go now
    return policy, src, meta
