"""The start of a run of a pass that trains from a torch policy (distill, rl-finetune), and the
fault schedule of a robust build's training (`faults = "suite"`).

Torch's RNG and thread count for the training itself come from `base.seeded_torch`.
"""

from __future__ import annotations

import json
import time
from typing import Any, TypeVar

from xcompile.artifact import Artifact
from xcompile.models.slim import read_torch_policy
from xcompile.onnx.contract import check_contract
from xcompile.onnx.model import get_metadata
from xcompile.onnx.session import read_onnx
from xcompile.passes.base import BuildContext, PassConfig, with_profile_defaults
from xcompile.sim.fault_suite import FaultSchedule, training_schedule

C = TypeVar("C", bound=PassConfig)


def start_training(art: Artifact, cfg: PassConfig, cls: type[C], ctx: BuildContext,
                   profile_defaults: dict[str, dict[str, Any]]) -> tuple[C, dict[str, Any], float]:
    """(`cfg` with the build profile's budgets for every field the user did not set (see
    `with_profile_defaults`), the spec of the input torch policy (of an ONNX policy: robot, joint
    order and source hash from its deployment contract), the start time (`time.perf_counter`))."""
    t0 = time.perf_counter()
    assert isinstance(cfg, cls)
    budgeted = with_profile_defaults(cfg, ctx.profile, profile_defaults)
    assert isinstance(budgeted, cls)
    if art.format == "onnx":
        meta = get_metadata(read_onnx(art.path))
        check_contract(meta, ctx.robot, art.path)
        spec = {"robot": meta["robot"], "joint_order": json.loads(meta["joint_order"]),
                "source_checkpoint_sha256": meta.get("source_checkpoint_sha256", "")}
        return budgeted, spec, t0
    return budgeted, read_torch_policy(art.path)["spec"], t0


FAULTS_HELP = ("'suite': train with the fault suite in the distribution (every other episode "
               "under one of xcompile.sim.fault_suite's faults in turn; `xcompile build "
               "--robust`), so that the result keeps the fault tolerance it started with; "
               "'none': the nominal world only")


def fault_schedule(cfg: Any, ctx: BuildContext) -> FaultSchedule | None:
    """The episodes' faults of a pass whose config has `faults` ("none" or "suite")."""
    return training_schedule(ctx.robot) if getattr(cfg, "faults", "none") == "suite" else None
