"""Running a benchmark script the way the tests do: --quick, on a1, into a work folder shared by
the scripts of one test worker (the `bench_work` fixture of conftest.py), so later ones reuse the
builds of earlier ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from xcompile.passes.base import all_passes

REPO = Path(__file__).resolve().parent.parent
HAVE_STUDENT = "distill" in all_passes()


def run_script(name: str, ckpt: str | None, work: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(REPO / "bench" / f"{name}.py"), "--quick", "--robots", "a1",
           "--out", str(out), "--work-dir", str(work), *extra]
    if ckpt:
        cmd += ["--checkpoint", ckpt]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["script"] == name and doc["quick"] is True
    assert doc["markdown"].strip() in proc.stdout        # the table is printed as written
    assert "| " in proc.stdout and doc["machine"]["nproc"] >= 1
    return doc
