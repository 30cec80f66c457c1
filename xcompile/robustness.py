"""Does compilation keep the fat policy's fault tolerance? Stages scored under the fault suite.

`fault_table` scores policies (a build's fat network, tuned policy and final policy) nominally and
under each fault of `xcompile.sim.fault_suite` on the same episodes, and gives per fault each
policy's score with its bootstrap 95% interval and final / fat as a paired ratio with its interval;
over all faulted episodes of every fault that applies, "final / fat under faults" (the final
policy's score over the fat one's on the same episodes). `xcompile build --robustness` (and every
`--robust` build) puts it in the report, on the report's episodes; bench/robustness.py runs it on
the bench stream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np

from xcompile.evaluate import BatchPolicy, score_policy
from xcompile.sim.fault_suite import fault_suite
from xcompile.stats import mean_ci95, ratio_ci95
from xcompile.targets import RobotTarget

NOMINAL = "none (nominal)"


def fault_table(policies: Mapping[str, BatchPolicy], robot: RobotTarget, episodes: int,
                seed: int, stream: str = "report",
                progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """`policies` (keys "fat" and "final" required, any others scored beside them) nominally and
    under each fault, on episodes 0..episodes-1 of `stream`. A fault that does not apply to the
    body (a payload on a fixed-base arm) gets a row with `applies: False`."""
    if "fat" not in policies or "final" not in policies:
        raise ValueError("fault_table needs a 'fat' and a 'final' policy")
    conditions = [None, *fault_suite(robot)]
    rows: list[dict[str, Any]] = []
    faulted: dict[str, list[float]] = {k: [] for k in policies}
    for n, fault in enumerate(conditions):
        name = NOMINAL if fault is None else fault.name
        detail = "" if fault is None else fault.detail
        if fault is not None and fault.faults is None:
            rows.append({"fault": name, "detail": detail, "applies": False})
            continue
        faults = None if fault is None else fault.faults
        got = {k: score_policy(act, robot, episodes, seed, stream=stream, faults=faults).scores
               for k, act in policies.items()}
        if fault is not None:
            for k, s in got.items():
                faulted[k] += s
        row: dict[str, Any] = {"fault": name, "detail": detail, "applies": True,
                               "faults": asdict(faults) if faults else None}
        for k, s in got.items():
            row[k], row[f"{k}_ci95"] = round(float(np.mean(s)), 4), mean_ci95(s)
            row[f"{k}_scores"] = [round(x, 4) for x in s]
        row["final_over_fat"], row["final_over_fat_ci95"] = ratio_ci95(got["final"], got["fat"])
        rows.append(row)
        if progress:
            progress(n + 1, len(conditions))
    under, under_ci = ratio_ci95(faulted["final"], faulted["fat"])
    return {"stream": stream, "seed": seed, "episodes": episodes, "policies": list(policies),
            "faults": rows, "final_over_fat_under_faults": under,
            "final_over_fat_under_faults_ci95": under_ci}


def build_policies(records: list[Any], robot: RobotTarget) -> dict[str, BatchPolicy]:
    """A build's fat network, its tuned policy (rl-finetune's output, when its guard kept a
    changed policy) and its final policy, each loaded once (`records`: the build's stages)."""
    from xcompile.policy import load_policy

    done = [r for r in records if r.artifact is not None and not r.skipped]
    paths = {"fat": done[0].artifact.path}
    tuned = next((r for r in done if r.name == "rl-finetune"), None)
    if tuned is not None and tuned.checks.get("kept", "start") != "start":
        paths["tuned"] = tuned.artifact.path
    paths["final"] = done[-1].artifact.path
    return {k: load_policy(p, robot).act for k, p in paths.items()}
