"""The fleet folder: `DIR/<robot>/` per target (each a single build's folder), reproducers of failed
passes (`DIR/<robot>.repro`), the fleet report and `fleet.json`, the marker listing what the fleet
wrote.

It obeys the rule of `xcompile.outdir`: it is assembled in a temporary folder beside DIR and
swapped in when every target has finished; DIR is replaced only when it is empty or holds an
earlier fleet and nothing that fleet did not write (`--force` also replaces extra files), and
every earlier target folder in it must be one xcompile may replace. Temporary folders of killed
runs are removed by the next run (`clean_orphans`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xcompile import __version__
from xcompile.outdir import (
    MANIFEST,
    REPRO_MARKERS,
    REPRO_NAMES,
    OutputError,
    check_replaceable,
    folder_entries,
    refuse_unlisted,
    write_folder,
)

FLEET_MARKER = "fleet.json"
FLEET_VERSION = 1


def _marker(folder: Path) -> dict[str, Any] | None:
    p = folder / FLEET_MARKER
    try:
        if not p.is_file() or p.is_symlink() or p.stat().st_size > 10_000_000:
            return None
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(doc, dict) and doc.get("kind") == "xcompile-fleet"
          and isinstance(doc.get("outputs"), list)
          and all(isinstance(n, str) and n and "/" not in n and n not in (".", "..")
                  for n in doc["outputs"]))
    return doc if ok else None


def check_fleet_dir(out: Path, *, force: bool = False, flag: str = "--out") -> None:
    """Raise OutputError unless the fleet folder `out` may be (re)written; see the module doc."""
    out = Path(os.path.abspath(out))
    entries = folder_entries(out, flag, "build/fleet")
    if not entries:
        return
    doc = _marker(out)
    if doc is None:
        what = ("holds a single build, not a fleet" if (out / MANIFEST).is_file() else
                f"does not hold an xcompile fleet build (no {FLEET_MARKER})")
        raise OutputError(f"{flag} {out} exists and {what}; xcompile will not replace a folder "
                          f"it did not write as a fleet. Give another {flag}, or empty that "
                          "folder yourself")
    listed = set(doc["outputs"]) | {FLEET_MARKER}
    refuse_unlisted(out, [p for p in entries if p.name not in listed or p.is_symlink()],
                    "a previous fleet build", force, flag)
    for p in entries:
        if p.name in listed and p.is_dir() and not p.is_symlink():
            if ".repro" in p.name:
                check_replaceable(p, markers=REPRO_MARKERS, allowed=REPRO_NAMES, flag="folder")
            else:
                check_replaceable(p, force=force, flag=f"{flag} target folder")


def write_fleet_dir(out: Path, write: Callable[[Path], None], *, force: bool = False) -> None:
    """Assemble the fleet folder in a temporary folder beside `out` and swap it in
    (`xcompile.outdir.write_folder`, with the fleet folder's own rule), `fleet.json` last."""

    def write_marked(tmp: Path) -> None:
        write(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        (tmp / FLEET_MARKER).write_text(json.dumps(
            {"kind": "xcompile-fleet", "fleet_version": FLEET_VERSION,
             "xcompile_version": __version__, "outputs": names}, indent=2) + "\n")

    write_folder(out, write_marked, check=lambda folder: check_fleet_dir(folder, force=force),
                 what="the fleet folder")
