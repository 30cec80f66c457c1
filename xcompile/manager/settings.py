"""Build settings: the plan and every pass's options, seed, profile, score episodes.

A plan is an ordered list of passes, each with its validated config. Its text form is the pass
names joined by commas (`pin-embodiment,export-onnx,quantize`), as in LLVM's `-passes=`; the
default plan is `xcompile.passes.DEFAULT_PLAN`.

Settings come from three layers, merged by `resolve_settings` (the one precedence function):
built-in defaults < a TOML build file (`--config build.toml`) < the command line. The build file:

    passes = ["pin-embodiment", "export-onnx", "quantize"]   # the plan (optional)
    seed = 0
    profile = "default"                                        # fast | default | thorough
    episodes = 10                                              # score episodes per stage

    [pass.quantize]                                            # options of one pass
    precision = "fp16"

(Options live under `[pass.<name>]`, not `[passes.<name>]`: TOML cannot make `passes` both the
list and a table.) `--int8`/`--fp16`/`--fp32` talk to the one pass that declares a
`precision_option`; the manager knows no pass by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from xcompile.errors import PlanError
from xcompile.manager.plan import INPUT_FORMAT, format_plan, validate_plan
from xcompile.passes import DEFAULT_PLAN
from xcompile.passes.base import Pass, PassConfig, all_passes, get_pass
from xcompile.targets.loader import tomllib

PROFILES = ("fast", "default", "thorough")
# Score episodes per stage when neither the build file nor the command line says.
EPISODES_BY_PROFILE = {"fast": 3, "default": 10, "thorough": 30}
# Batch-1 calls per latency measurement.
LATENCY_N_BY_PROFILE = {"fast": 300, "default": 2000, "thorough": 10000}
FILE_KEYS = ("passes", "seed", "profile", "episodes", "pass")
MAX_SEED = 2**31 - 1        # seeds reach torch, numpy and PyBullet; all take 31 bits
MAX_EPISODES = 10_000

DEFAULTS: dict[str, Any] = {"passes": list(DEFAULT_PLAN), "seed": 0, "profile": "default",
                            "episodes": None, "options": {}}


@dataclass(frozen=True)
class PlanStep:
    """One pass of a plan with its validated config."""

    name: str
    config: PassConfig

    @property
    def pass_cls(self) -> type[Pass]:
        return get_pass(self.name)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.pass_cls.version,
                "config": self.config.model_dump(mode="json")}


def parse_plan(text: str) -> list[str]:
    """`"pin-embodiment, export-onnx"` -> `["pin-embodiment", "export-onnx"]`."""
    names = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise PlanError(f"cannot read the pass list {text!r}: give pass names separated by "
                        "commas, e.g. pin-embodiment,export-onnx,quantize")
    return names


def make_config(name: str, options: Mapping[str, Any] | None = None) -> PassConfig:
    """Validate `options` with the pass's pydantic Config; errors name the pass and the field."""
    cls = get_pass(name)
    try:
        return cls.Config.model_validate(dict(options or {}))
    except ValidationError as e:
        lines = [f"invalid options for pass '{name}':"]
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(options)"
            lines.append(f"  {name}.{loc}: {err['msg']}")
        fields = ", ".join(cls.Config.model_fields) or "none"
        lines.append(f"  ({name} options: {fields}; see `xcompile passes`)")
        raise PlanError("\n".join(lines)) from None


@dataclass(frozen=True)
class BuildSettings:
    """Resolved settings: the plan with every pass's config, seed, profile, score episodes."""

    plan: list[PlanStep]
    seed: int = 0
    profile: str = "default"
    episodes: int = 10
    sources: dict[str, str] = field(default_factory=dict)   # setting -> "default"|"file"|"cli"
    notes: list[str] = field(default_factory=list)          # what the user should know

    @property
    def pass_names(self) -> list[str]:
        return [s.name for s in self.plan]

def read_build_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML build file into the layer shape `resolve_settings` takes."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise PlanError(f"build file {str(path)!r} does not exist; check the --config path") \
            from None
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{path}: not valid TOML ({e})") from None
    return file_layer(data, where=str(path))


def file_layer(data: Mapping[str, Any], where: str = "the build file") -> dict[str, Any]:
    """Turn a parsed build file into a settings layer; unknown keys are refused by name."""
    unknown = [k for k in data if k not in FILE_KEYS]
    if unknown:
        raise PlanError(f"{where}: unknown key '{unknown[0]}'. Allowed top-level keys: "
                        f"{', '.join(FILE_KEYS)} (pass options go under [pass.<name>])")
    layer: dict[str, Any] = {}
    if "passes" in data:
        passes = data["passes"]
        if isinstance(passes, str):
            passes = parse_plan(passes)
        if isinstance(passes, dict):
            raise PlanError(f"{where}: 'passes' must be a list of pass names; put pass options "
                            "under [pass.<name>] (e.g. [pass.quantize])")
        if not isinstance(passes, list) or not all(isinstance(p, str) for p in passes):
            raise PlanError(f"{where}: 'passes' must be a list of pass names")
        layer["passes"] = list(passes)
    for key, typ in (("seed", int), ("profile", str), ("episodes", int)):
        if key in data:
            if not isinstance(data[key], typ) or isinstance(data[key], bool):
                raise PlanError(f"{where}: '{key}' must be {typ.__name__}, got {data[key]!r}")
            layer[key] = data[key]
    if "pass" in data:
        opts = data["pass"]
        if not isinstance(opts, dict) or not all(isinstance(v, dict) for v in opts.values()):
            raise PlanError(f"{where}: [pass.<name>] must be tables of options")
        known = all_passes()
        for name in opts:
            if name not in known:
                raise PlanError(f"{where}: unknown key 'pass.{name}': no pass is called '{name}'. "
                                f"Known passes: {', '.join(known)}")
        layer["options"] = {k: dict(v) for k, v in opts.items()}
    return layer


def resolve_settings(defaults: Mapping[str, Any] | None = None,
                     file_cfg: Mapping[str, Any] | None = None,
                     cli_cfg: Mapping[str, Any] | None = None,
                     input_format: str = INPUT_FORMAT, recurrent: bool = False) -> BuildSettings:
    """Merge settings layers: defaults < build file < command line.

    Each layer is a dict with optional keys `passes` (list of names), `seed`, `profile`,
    `episodes` and `options` ({pass name: {field: value}}); a key that is absent or None leaves the
    lower layer's value. Options merge field by field. The command line may also carry
    `precision`: "int8"/"fp16" set `quantize.precision`; "fp32" drops quantize from the plan;
    and `robust`: True sets `faults = "suite"` on every pass of the plan that has that option.
    Pass options are validated by each pass's Config (only for passes in the plan).
    `recurrent`: the input is a recurrent policy (`validate_plan`).
    """
    layers = [("default", dict(defaults if defaults is not None else DEFAULTS)),
              ("file", dict(file_cfg or {})), ("cli", dict(cli_cfg or {}))]
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    options: dict[str, dict[str, Any]] = {}
    for origin, layer in layers:
        for key in ("passes", "seed", "profile", "episodes"):
            if layer.get(key) is not None:
                merged[key] = layer[key]
                sources[key] = origin
        for name, opts in (layer.get("options") or {}).items():
            for k, v in opts.items():
                if v is not None:
                    options.setdefault(name, {})[k] = v
                    sources[f"{name}.{k}"] = origin

    passes = list(merged.get("passes") or DEFAULT_PLAN)
    precision = (cli_cfg or {}).get("precision")
    q = precision_pass()
    if precision == "fp32":
        if q in passes and sources.get("passes") != "default":
            raise PlanError(f"--fp32 asks for no quantization but the plan (from the "
                            f"{sources['passes']}) lists {q}: drop one of them")
        passes = [p for p in passes if p != q]
    elif precision is not None:
        if q not in passes:
            raise PlanError(f"--{precision} needs the {q} pass but the plan is "
                            f"{format_plan(passes)}: add {q} after export-onnx")
        opt = get_pass(q).precision_option
        options.setdefault(q, {})[opt] = precision
        sources[f"{q}.{opt}"] = "cli"

    if (cli_cfg or {}).get("robust"):
        robust = [n for n in passes if n in all_passes()
                  and "faults" in get_pass(n).Config.model_fields]
        if not robust:
            raise PlanError(f"--robust trains under the fault suite, and no pass of the plan "
                            f"{format_plan(passes)} trains (add rl-finetune or distill)")
        for n in robust:
            options.setdefault(n, {})["faults"] = "suite"
            sources[f"{n}.faults"] = "cli"

    emit_notes: list[str] = []
    emit = (cli_cfg or {}).get("emit")
    if emit not in (None, "onnx"):
        passes = with_emitter(passes, emit, sources.get("passes", "default"), emit_notes)

    profile = merged.get("profile", "default")
    if profile not in PROFILES:
        raise PlanError(f"unknown profile '{profile}': choose one of {', '.join(PROFILES)}")
    seed = merged.get("seed", 0)
    if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise PlanError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    episodes = merged.get("episodes") or EPISODES_BY_PROFILE[profile]
    if not isinstance(episodes, int) or not 1 <= episodes <= MAX_EPISODES:
        raise PlanError(f"episodes must be an integer from 1 to {MAX_EPISODES}, got {episodes!r}")

    validate_plan(passes, input_format=input_format)
    # Defaults may carry options for every pass; a user's option for a pass that will not run
    # is a mistake worth saying (a typo in the plan, or a plan that dropped it).
    # A build file whose own plan leaves out a pass it sets options for is refused; options in
    # a build file shared by several plans (the plan from --passes) are noted as unused.
    notes = emit_notes
    stray = {k.split(".", 1)[0]: origin for k, origin in sources.items()
             if "." in k and origin != "default" and k.split(".", 1)[0] not in passes}
    for name, origin in sorted(stray.items()):
        msg = (f"options are given for pass '{name}', which is not in the plan "
               f"{format_plan(passes)}")
        if origin == sources.get("passes"):
            raise PlanError(f"{msg}: remove [pass.{name}] or add {name} to the plan")
        notes.append(f"{msg} (from the {sources.get('passes', 'default')}); they are unused")
    plan = [PlanStep(n, make_config(n, options.get(n))) for n in passes]
    # With the configs known: which passes make (or end) a recurrent policy, e.g. distill into
    # an MLP student ends one, so emit-c after it takes a recurrent input's student.
    validate_plan(plan, input_format=input_format, recurrent=recurrent)
    return BuildSettings(plan=plan, seed=seed, profile=profile, episodes=episodes,
                         sources=sources, notes=notes)


EMIT_CHOICES = ("onnx", "c")


def with_emitter(passes: list[str], emit: str, origin: str, notes: list[str]) -> list[str]:
    """`passes` ending with the pass whose `emit_option` is `emit` (`--emit c`): it goes right
    after the last pass that makes what it takes; passes that would follow it and take that same
    format (build-tensorrt) are left out of a default plan, refused in a user's."""
    found = [n for n, cls in all_passes().items() if cls.emit_option == emit]
    if not found:
        raise PlanError(f"--emit {emit}: unknown back end; choose one of "
                        f"{', '.join(EMIT_CHOICES)}")
    name = found[0]
    if name in passes:
        return passes
    takes = get_pass(name).input_format
    makers = [i for i, n in enumerate(passes) if get_pass(n).output_format == takes]
    if not makers:
        raise PlanError(f"--emit {emit} needs a pass that makes {takes} (e.g. export-onnx) but "
                        f"the plan is {format_plan(passes)}")
    head, tail = passes[:makers[-1] + 1], passes[makers[-1] + 1:]
    if tail and origin != "default":
        raise PlanError(f"--emit {emit} ends the plan with {name}, but the plan (from the "
                        f"{origin}) lists {', '.join(tail)} after {head[-1]}: remove "
                        f"{'it' if len(tail) == 1 else 'them'} or drop --emit")
    if tail:
        notes.append(f"--emit {emit}: the plan ends with {name}; {', '.join(tail)} left out "
                     f"(the C policy is the deployable, not an engine)")
    return [*head, name]


def precision_pass() -> str:
    """The pass that --int8/--fp16/--fp32 set (the one declaring a `precision_option`)."""
    found = [n for n, cls in all_passes().items() if cls.precision_option]
    if len(found) != 1:
        raise PlanError(f"--int8/--fp16/--fp32 need exactly one pass with a precision option; "
                        f"found {', '.join(found) or 'none'}")
    return found[0]
