"""The pass interface and its registry.

A pass is a class with a kebab-case `name`, a `version` (part of every cache key: bump it when the
pass's output changes for the same input), the artifact format it takes and the one it makes (a
pass that takes several formats lists them in `input_formats`, the first its `input_format`, and
says in `output_for` what it makes from each), a frozen pydantic `Config`, and three methods:

- `run(art, cfg, ctx) -> PassResult`: the output artifact (written under `ctx.workdir`), the pass's
  own account of the run (`summary`, JSON-able) and the files beside the artifact that the build
  ships in its output folder (e.g. a learning-curve plot);
- `check(inp, result, cfg, ctx) -> dict`: verifies its own result (raises `PassCheckError`) and
  returns the checks the report lists;
- `notes(stage, stages, cfg, hardware) -> list[str]` (a classmethod): what the report should say
  about this pass's stage, in words, from the report's stage documents.

The summary travels with the result (and the cache entry), never through a side file or the
artifact's metadata. Passes keep no state between runs. One decorator registers them; lookups that
fail list what exists.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from xcompile.artifact import Artifact
from xcompile.errors import PlanError
from xcompile.evaluate import torch_single_thread
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


@dataclass(frozen=True)
class PassResult:
    """What a pass made: its artifact, its account of the run, and files to ship beside it."""

    artifact: Artifact
    summary: Mapping[str, Any] = field(default_factory=dict)   # JSON-able
    files: tuple[str, ...] = ()           # names of files in the artifact's folder


class Pass(ABC):
    name: ClassVar[str]
    version: ClassVar[int] = 1
    input_format: ClassVar[str]
    output_format: ClassVar[str]
    # Every format the pass takes, when more than `input_format` (which comes first).
    input_formats: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[PassConfig]] = PassConfig
    summary: ClassVar[str] = ""
    # The Config field that --int8/--fp16/--fp32 set, for the one pass that has such a field.
    precision_option: ClassVar[str | None] = None
    # The value of `xcompile build --emit` that ends the plan with this pass (e.g. "c").
    emit_option: ClassVar[str | None] = None
    # A pass that does not take a recurrent policy (`xcompile.onnx.recurrent`) says why, in one
    # line; a plan that would give it one is refused before anything runs.
    refuses_recurrent: ClassVar[str] = ""

    @classmethod
    def makes_recurrent(cls, cfg: Any) -> bool | None:
        """Whether, with config `cfg` (None: not known), the pass's output is recurrent: True (it
        makes a recurrent policy), False (a feed-forward one, whatever it was given), None (as
        its input). Plan checking follows it to apply later passes' refusals."""
        return None

    @classmethod
    def takes(cls) -> tuple[str, ...]:
        """The artifact formats this pass takes."""
        return cls.input_formats or (cls.input_format,)

    @classmethod
    def output_for(cls, fmt: str) -> str:
        """The format the pass makes from an input of format `fmt` (one it takes)."""
        return cls.output_format

    @abstractmethod
    def run(self, art: Artifact, cfg: PassConfig, ctx: BuildContext) -> PassResult: ...

    def check(self, inp: Artifact, result: PassResult, cfg: PassConfig,
              ctx: BuildContext) -> dict[str, Any]:
        """Verify the result; return the checks for the report. Raise PassCheckError."""
        return {}

    @classmethod
    def notes(cls, stage: Mapping[str, Any], stages: list[Mapping[str, Any]], cfg: PassConfig,
              hardware: HardwareTarget) -> list[str]:
        """What the report says about this pass's stage (a report stage document), in words."""
        return []


@contextlib.contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Torch's global RNG seeded for a pass and restored after it, on one intra-op thread.

    One thread: small policy steps gain nothing from a second, and on a shared 2-core machine a
    second intra-op thread that waits for a core makes each step many times slower (measured: a
    128x128 MLP step went from about 1 ms to 500 ms under load).
    """
    import torch  # heavy: imported by the passes that train, when they run

    with torch.random.fork_rng(devices=[]), torch_single_thread():
        torch.manual_seed(seed)
        yield


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
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if mod.name != "base":
            importlib.import_module(f"xcompile.passes.{mod.name}")
