"""Running a fleet: each target a task (`build_target`) on an executor, and the fleet report.

`build_target` runs in whatever process the executor chose: it loads and checks the robot,
hardware and checkpoint files itself, runs `xcompile.build.run_build` into its folder, and returns
its row of the report (plain data). It never raises for a failing build: one target's failure is
its row, never the end of the others. `run_fleet` maps it over the jobs inside the fleet folder's
atomic write and writes `report.json` and `report.md` (target x final score with its 95%
interval, bytes, p50 latency, build time, gates, error).
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from xcompile import __version__
from xcompile.build import run_build
from xcompile.errors import XCompileError
from xcompile.executors.pools import Executor, TaskError
from xcompile.fleet.folder import FLEET_VERSION, write_fleet_dir
from xcompile.fleet.spec import FleetJob, failed_row
from xcompile.manager.settings import PlanStep, make_config
from xcompile.report import Gates
from xcompile.targets import load_hardware, load_robot

# --------------------------------------------------------------------------------------------
# one target: the task


def build_target(job: FleetJob) -> dict[str, Any]:
    """Build one target into `job.out_dir` (run in a worker); its fleet-report row. Never raises
    for a failing build: the error is the row's."""
    t0 = time.perf_counter()
    try:
        robot, hw = load_robot(job.robot_toml), load_hardware(job.hardware_toml)
        plan = [PlanStep(d["name"], make_config(d["name"], d["config"])) for d in job.plan]
        res = run_build(job.checkpoint, robot, hw, plan, job.out_dir, job.cache_on_this_host(),
                        use_cache=job.use_cache, seed=job.seed, profile=job.profile,
                        episodes=job.episodes, required=job.required, gates=Gates(**job.gates),
                        rollout=job.rollout, extra_manifest={"command": job.command})
    except XCompileError as e:
        return failed_row(job.target, job, TaskError.of(e), time.perf_counter() - t0,
                          full=str(e))
    except Exception as e:      # noqa: BLE001 (a crash in one target: keep the others)
        return failed_row(job.target, job, TaskError.of(e), time.perf_counter() - t0,
                          full=traceback.format_exc())
    final, gates = res.report["final"], res.report["gates"]
    missed = [g["name"] for g in gates if not g["passed"]]
    return {"target": job.target, "robot": job.name, "hardware": res.report["hardware"],
            "folder": job.name, "ok": True, "final": final["name"], "policy": final["policy"],
            "score": final["score"], "score_ci95": final["score_ci95"],
            "scores": final["scores"], "bytes": final["bytes"],
            "latency_p50_us": final["latency_p50_us"], "build_s": round(time.perf_counter() - t0, 2),
            "cached": [s["name"] for s in res.report["stages"] if s.get("cached")],
            "gates": gates, "gates_passed": not missed, "error": None,
            "exit_code": 4 if missed else 0, "notes": list(job.notes)}


def exit_code(rows: Sequence[Mapping[str, Any]]) -> int:
    """0 when every target built and passed its gates; a failed target's code (the first) when
    any failed; 4 when all built but some missed a gate."""
    failed = [r["exit_code"] for r in rows if not r["ok"]]
    if failed:
        return failed[0] or 1
    return 4 if any(not r["gates_passed"] for r in rows) else 0



# --------------------------------------------------------------------------------------------
# the whole fleet


def run_fleet(jobs: Sequence[FleetJob], failed: Sequence[dict[str, Any]], out: Path,
              executor: Executor, *, force: bool = False,
              on_done: Callable[[dict[str, Any]], None] | None = None,
              meta: Mapping[str, Any] | None = None, order: Sequence[str] = ()
              ) -> dict[str, Any]:
    """Build every job on `executor` into the fleet folder `out` and write its report; return
    the report document (rows in the order `order` gives the targets; failed ones included)."""
    t0 = time.perf_counter()
    doc: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        mine = [FleetJob(**{**asdict(j), "out_dir": str(tmp / j.name)}) for j in jobs]
        rows = executor.map(build_target, mine, errors=True,
                            on_done=(lambda i, r: on_done(_row(mine[i], r))) if on_done else None)
        rows = [*(_row(j, r) for j, r in zip(mine, rows)), *failed]
        rank = {t: i for i, t in enumerate(order)}
        rows.sort(key=lambda r: rank.get(r["target"], len(rank)))
        doc.update(fleet_report(rows, executor, time.perf_counter() - t0, meta))
        (tmp / "report.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(render_fleet_markdown(doc))

    write_fleet_dir(out, write, force=force)
    return doc


def _row(job: FleetJob, r: Any) -> dict[str, Any]:
    return failed_row(job.target, job, r, 0.0) if isinstance(r, TaskError) else r


def fleet_report(rows: Sequence[dict[str, Any]], executor: Executor, wall_s: float,
                 meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"kind": "xcompile-fleet-report", "fleet_version": FLEET_VERSION,
            "xcompile_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **dict(meta or {}), "executor": executor.name, "workers": executor.workers,
            "wall_s": round(wall_s, 2), "targets": list(rows),
            "built": sum(r["ok"] for r in rows), "failed": sum(not r["ok"] for r in rows),
            "missed_gates": sum(r["ok"] and not r["gates_passed"] for r in rows),
            "exit_code": exit_code(rows)}


def _num(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def fleet_table(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the fleet table, as text cells."""
    headers = ["target", "final", "score [95% CI]", "bytes", "p50 µs", "build s", "gates",
               "error"]
    body = []
    for r in doc["targets"]:
        ci = r["score_ci95"]
        score = (_num(r["score"], ".3f") + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
                 if r["score"] is not None else "–")
        gates = ("–" if r["gates_passed"] is None else
                 "pass" if r["gates_passed"] else "MISSED " + ", ".join(
                     g["name"] for g in r["gates"] if not g["passed"]))
        body.append([str(r["target"]), str(r["final"] or "–"), score,
                     _num(r["bytes"], ","), _num(r["latency_p50_us"], ".1f"),
                     _num(r["build_s"], ".1f"), gates, str(r["error"] or "")])
    return headers, body


def render_fleet_markdown(doc: Mapping[str, Any]) -> str:
    headers, body = fleet_table(doc)
    lines = [f"# Fleet build: {len(doc['targets'])} targets", "",
             f"{doc['built']} built, {doc['failed']} failed, {doc['missed_gates']} missed a "
             f"gate; executor {doc['executor']} ({doc['workers']} workers), wall "
             f"{doc['wall_s']:.1f} s. Each built target's folder holds its own report.md.", "",
             "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"
