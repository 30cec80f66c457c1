"""The pass interface and its registry.

A pass is a class with a kebab-case `name`, a `version` (part of every cache key: bump it when the
pass's output changes for the same input), the artifact format it takes and the one it makes, a
frozen pydantic `Config`, `run` (input artifact -> output artifact, written under `ctx.workdir`) and
`check` (verifies its own result, returns measurements for the report, raises `PassCheckError`).
Passes keep no state between runs. One decorator registers them; lookups that fail list what exists.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from xcompile.artifact import Artifact
from xcompile.errors import PlanError
from xcompile.targets import HardwareTarget, RobotTarget


class PassConfig(BaseModel):
    """Base of every pass config: strict, frozen, every field described."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class BuildContext:
    robot: RobotTarget
    hardware: HardwareTarget
    workdir: Path                         # where this pass writes its output (fresh, empty)
    seed: int = 0
    profile: str = "default"
    source_sha256: str = ""               # of the fat checkpoint the build started from
    history: list[str] = field(default_factory=list)   # pass names run so far
    progress: Callable[[str, float], None] = lambda desc, frac: None
    # Artifacts by pass name made earlier in this build (a pass may need an earlier stage,
    # e.g. quantize calibrates against the float model it was given, distill reads the teacher).
    stages: dict[str, Artifact] = field(default_factory=dict)


class Pass(ABC):
    name: ClassVar[str]
    version: ClassVar[int] = 1
    input_format: ClassVar[str]
    output_format: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    requires: ClassVar[tuple[str, ...]] = ()   # passes that must have run earlier in the plan
    summary: ClassVar[str] = ""

    @abstractmethod
    def run(self, art: Artifact, cfg: PassConfig, ctx: BuildContext) -> Artifact: ...

    def check(self, inp: Artifact, out: Artifact, cfg: PassConfig,
              ctx: BuildContext) -> dict[str, Any]:
        """Verify the result; return measurements for the report. Raise PassCheckError."""
        return {}


def with_profile_defaults(cfg: PassConfig, profile: str,
                          table: dict[str, dict[str, Any]]) -> PassConfig:
    """`cfg` with the build profile's budgets for every field the user did not set.

    "Set" means given explicitly (build file, command line, `Config(field=...)`): pydantic records
    those in `model_fields_set`, even when the given value equals the field's default. A field left
    out takes `table[profile][field]` when the table has it, else its class default. The result is
    validated again, so a bad table entry fails like a bad option would.
    """
    budget = {k: v for k, v in table.get(profile, {}).items()
              if k in type(cfg).model_fields and k not in cfg.model_fields_set}
    if not budget:
        return cfg
    given = {k: getattr(cfg, k) for k in cfg.model_fields_set}
    return type(cfg).model_validate({**budget, **given})


REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if cls.name in REGISTRY:
        raise RuntimeError(f"pass {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    _load_builtin_passes()
    if name not in REGISTRY:
        raise PlanError(f"unknown pass '{name}'. Known passes: {', '.join(REGISTRY)} "
                        "(see `xcompile passes`)")
    return REGISTRY[name]


def all_passes() -> dict[str, type[Pass]]:
    _load_builtin_passes()
    return dict(REGISTRY)


def _load_builtin_passes() -> None:
    # Importing the modules runs their @register_pass decorators.
    import importlib
    import pkgutil

    import xcompile.passes as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name != "base":
            importlib.import_module(f"xcompile.passes.{mod.name}")
