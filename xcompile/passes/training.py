"""The start of a run of a pass that trains from a torch policy (distill, rl-finetune).

Torch's RNG and thread count for the training itself come from `base.seeded_torch`.
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

from xcompile.artifact import Artifact
from xcompile.models.slim import read_torch_policy
from xcompile.passes.base import BuildContext, PassConfig, with_profile_defaults

C = TypeVar("C", bound=PassConfig)


def start_training(art: Artifact, cfg: PassConfig, cls: type[C], ctx: BuildContext,
                   profile_defaults: dict[str, dict[str, Any]]) -> tuple[C, dict[str, Any], float]:
    """(`cfg` with the build profile's budgets for every field the user did not set (see
    `with_profile_defaults`), the spec of the input torch policy, the start time
    (`time.perf_counter`))."""
    t0 = time.perf_counter()
    assert isinstance(cfg, cls)
    budgeted = with_profile_defaults(cfg, ctx.profile, profile_defaults)
    assert isinstance(budgeted, cls)
    return budgeted, read_torch_policy(art.path)["spec"], t0
