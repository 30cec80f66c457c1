"""The build report: one document (report.json, stable keys) made from the stage records.

`build_report` turns the run's stage records into the report: per stage its measurements, checks
and timing; the gates (`Gates`, deployment thresholds on the final stage) and their verdicts; and
notes in words, each pass contributing its own (`Pass.notes`). It knows no pass by name.
`read_report` reads a report.json back and checks that it is one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from xcompile import __version__
from xcompile.artifact import Artifact
from xcompile.errors import PlanError, XCompileError
from xcompile.manager.run import StageRecord
from xcompile.manager.settings import PlanStep
from xcompile.passes.base import get_pass
from xcompile.render import _num, render_markdown, render_table
from xcompile.stats import ratio_ci95
from xcompile.targets import HardwareTarget, RobotTarget

REPORT_VERSION = 1
MEASURE_KEYS = ("params", "bytes", "macs", "latency_p50_us", "latency_p99_us", "runtime", "score",
                "score_std", "score_ci95", "scores")
STAGE_KEYS = ("name", "format", *MEASURE_KEYS, "wall_s", "cached", "skipped", "skip_reason",
              "checks")


@dataclass(frozen=True)
class Gates:
    """Deployment thresholds on the final stage; None = not asked."""

    max_latency_us: float | None = None      # on p99
    max_size_kb: float | None = None         # 1 kB = 1000 bytes
    min_score_ratio: float | None = None     # final score / fat (or pinned) score

    def __post_init__(self) -> None:
        limits = {"max_latency_us": (0.0, 1e9, "--max-latency-us", "µs"),
                  "max_size_kb": (0.0, 1e9, "--max-size-kb", "kB"),
                  "min_score_ratio": (0.0, 2.0, "--min-score-ratio", "(final / fat score)")}
        for name, (lo, hi, flag, unit) in limits.items():
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or not lo < v <= hi:
                raise PlanError(f"{flag} must be a number above {lo:g} and at most {hi:g} "
                                f"{unit}, got {v!r}: a gate that cannot fail (or cannot pass) "
                                "gates nothing")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def stage_doc(rec: StageRecord) -> dict[str, Any]:
    m = rec.measurements
    doc: dict[str, Any] = {"name": rec.name, "format": rec.format}
    for k in MEASURE_KEYS:
        doc[k] = m.get(k)
    doc.update(wall_s=round(rec.wall_s, 3), cached=rec.cached, skipped=rec.skipped,
               skip_reason=rec.skip_reason, checks=dict(rec.checks))
    return doc


def _final_index(stages: list[dict[str, Any]]) -> int:
    return max(i for i, s in enumerate(stages) if not s["skipped"])


def score_ratios(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last scored stage's score over each earlier stage's, with a paired 95% interval: every
    stage is scored on the same report episodes, so the comparison is paired episode by
    episode."""
    scored = [s for s in stages if not s["skipped"] and s.get("scores")]
    if len(scored) < 2:
        return []
    final = scored[-1]
    out = []
    for s in scored[:-1]:
        ratio, ci = ratio_ci95(final["scores"], s["scores"])
        if ratio is not None:
            out.append({"final": final["name"], "stage": s["name"], "ratio": ratio, "ci95": ci,
                        "episodes": len(s["scores"])})
    return out


def evaluate_gates(stages: list[dict[str, Any]], gates: Gates) -> list[dict[str, Any]]:
    final = stages[_final_index(stages)]
    out = []

    def gate(name: str, limit: float, value: float | None, ok: bool, msg: str) -> None:
        out.append({"name": name, "limit": limit, "value": value, "passed": ok, "message": msg})

    if gates.max_latency_us is not None:
        v = final["latency_p99_us"]
        ok = v is not None and v <= gates.max_latency_us
        gate("max_latency_us", gates.max_latency_us, v, ok,
             f"p99 latency {_num(v)} µs vs limit {gates.max_latency_us:g} µs")
    if gates.max_size_kb is not None:
        v = None if final["bytes"] is None else final["bytes"] / 1000
        ok = v is not None and v <= gates.max_size_kb
        gate("max_size_kb", gates.max_size_kb, v, ok,
             f"size {_num(v)} kB vs limit {gates.max_size_kb:g} kB")
    if gates.min_score_ratio is not None:
        ref = next((s for s in stages if s["score"] is not None and not s["skipped"]), None)
        v = None
        if ref is not None and final["score"] is not None and ref["score"] > 0:
            v = final["score"] / ref["score"]
        ok = v is not None and v >= gates.min_score_ratio
        gate("min_score_ratio", gates.min_score_ratio, v, ok,
             f"score ratio {_num(v)} (final {_num(final['score'])} / "
             f"{ref['name'] if ref else '?'} {_num(ref['score'] if ref else None)}) vs minimum "
             f"{gates.min_score_ratio:g}")
    return out


def build_report(robot: RobotTarget, hardware: HardwareTarget, plan: Sequence[PlanStep],
                 records: Sequence[StageRecord], *, seed: int, profile: str, episodes: int,
                 gates: Gates, runtime_floor_us: float | None) -> dict[str, Any]:
    stages = [stage_doc(r) for r in records]
    fi = _final_index(stages)
    final = dict(stages[fi])
    final["policy"] = policy_file_name(records[fi].artifact) if records[fi].artifact else None
    notes = []
    for s in stages:
        if s["skipped"]:
            notes.append(f"{s['name']} skipped: {s['skip_reason']}")
    for r in records:
        bad = r.measurements.get("nonfinite_action_episodes")
        if bad:
            notes.append(f"{r.name}: the policy emitted NaN/Inf actions in {bad} of {episodes} "
                         "score episodes (those episodes score 0)")
    by_name = {s.name: s for s in plan}
    for s in stages:
        if s["name"] in by_name and not s["skipped"]:
            notes += get_pass(s["name"]).notes(s, stages, by_name[s["name"]].config, hardware)
    p50 = final["latency_p50_us"]
    if p50 is not None and p50 > hardware.latency_budget_us:
        notes.append(f"final p50 latency {p50:.1f} µs is over {hardware.name}'s budget of "
                     f"{hardware.latency_budget_us:g} µs")
    ratios = score_ratios(stages)
    if ratios:
        notes.append(f"paired score ratios over the same {ratios[0]['episodes']} report episodes "
                     "(95% bootstrap intervals): " + "; ".join(
                         f"{r['final']} / {r['stage']} = {r['ratio']:.3f} "
                         f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" for r in ratios))
    if runtime_floor_us is not None:
        notes.append(f"latency includes the runtime's per-call overhead: onnxruntime runs an "
                     f"empty graph in {runtime_floor_us:.1f} µs (p50) on this machine")
    return {
        "report_version": REPORT_VERSION,
        "xcompile_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "robot": robot.name,
        "hardware": hardware.name,
        "plan": [s.to_json() for s in plan],
        "seed": seed,
        "profile": profile,
        "episodes": episodes,
        "stages": stages,
        "runtime_floor_us": runtime_floor_us,
        "gates": evaluate_gates(stages, gates),
        "score_ratios": ratios,
        "final": final,
        "notes": notes,
        "files": {f: r.name for r in records if not r.skipped for f in r.files},
    }


def policy_file_name(art: Artifact) -> str:
    return {"onnx": "policy.onnx", "tensorrt": "policy.plan", "c": "policy.c"}.get(
        art.format, "policy" + "".join(art.path.suffixes))


def read_report(build_dir: Path) -> dict[str, Any]:
    """A build folder's report.json, checked to be one that `render_table` can show."""
    path = Path(build_dir) / "report.json"
    try:
        if path.stat().st_size > 50_000_000:
            raise XCompileError(f"{path} is over 50 MB: not an xcompile build report")
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise XCompileError(f"{path} does not exist: give the --out folder of a build") from None
    except (OSError, ValueError) as e:
        raise XCompileError(f"{path} is not valid JSON ({e})") from None
    problem = _report_problem(doc)
    if problem is None:
        try:
            render_table(doc)
            render_markdown(doc)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            problem = f"{type(e).__name__}: {e}"
    if problem:
        raise XCompileError(f"{path} is not an xcompile build report ({problem}); give the "
                            "--out folder of a build")
    return doc


def _report_problem(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return "not a JSON object"
    for key, typ in (("robot", str), ("hardware", str), ("plan", list), ("stages", list),
                     ("notes", list), ("gates", list), ("final", dict)):
        if not isinstance(doc.get(key), typ):
            return f"'{key}' is missing or not a {typ.__name__}"
    if not doc["stages"] or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                    for s in doc["stages"]):
        return "'stages' must be a non-empty list of stages with names"
    if not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in doc["plan"]):
        return "'plan' must list passes with names"
    if not all(isinstance(g, dict) and {"name", "passed", "message"} <= set(g)
               for g in doc["gates"]):
        return "'gates' entries need name, passed and message"
    return None
