"""The pass manager: resolve settings, check a plan, run it with a cache, write the build.

A plan is an ordered list of passes, each with its validated config. Its text form is the pass
names joined by commas (`pin-embodiment,export-onnx,quantize`), as in LLVM's `-passes=`. The
default plan is `DEFAULT_PLAN`, the one place that lists it.

Settings come from three layers, merged by `resolve_settings` (the one precedence function):
built-in defaults < a TOML build file (`--config build.toml`) < the command line. The build file:

    passes = ["pin-embodiment", "export-onnx", "quantize"]   # the plan (optional)
    seed = 0
    profile = "default"                                        # fast | default | thorough
    episodes = 10                                              # score episodes per stage

    [pass.quantize]                                            # options of one pass
    precision = "fp16"

(Options live under `[pass.<name>]`, not `[passes.<name>]`: TOML cannot make `passes` both the
list and a table.)

`validate_plan` refuses a bad plan before anything runs: unknown passes, formats that do not chain
(with the pass to add or move), unmet `requires`, duplicates. `run_plan` runs the passes in order.
Each pass runs in a fresh temporary folder inside the cache and, on success, that folder is renamed
atomically to `cache_dir/<key>/`, where key = sha256(input artifact id, pass name, pass version,
the sha256 of the pass's own source file, config, robot TOML + URDF hashes, hardware, seed,
profile). The source hash means an edited pass (its method, or the profile budgets it defines)
never reuses an entry made by its old code, bumped version or not; code a pass imports from
elsewhere (the simulator, the evaluator) is not in the key. A later run with the same key loads the
entry instead of running the pass. Measurements (size, latency, score) are cached per artifact id.
Instrumentation (progress lines, timing) goes through `BuildHooks`; the manager itself prints
nothing. A failing pass leaves a reproducer folder (its input artifact + the remaining plan) and
no output folder. Outputs are assembled in a temporary folder beside `out_dir` and renamed into
place only when complete.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xcompile import integrity
from xcompile.artifact import FORMATS, Artifact, file_sha256
from xcompile.errors import CheckpointError, GateError, PlanError, ToolUnavailable, XCompileError
from xcompile.outdir import (
    REPRO_MARKERS,
    REPRO_NAMES,
    OutputError,
    atomic_write,
    check_replaceable,
    check_writable_parent,
    clean_orphans,
    is_storage_error,
    remove_tree,
    replace_marked_folder,
    storage_error,
    temp_dir,
    write_folder,
)
from xcompile.passes.base import BuildContext, Pass, PassConfig, all_passes, get_pass
from xcompile.targets import HardwareTarget, RobotTarget, load_hardware, load_robot
from xcompile.targets.loader import HARDWARE_DIR, ROBOTS_DIR, tomllib

DEFAULT_PLAN: list[str] = ["pin-embodiment", "rl-finetune", "distill", "export-onnx", "quantize",
                           "build-tensorrt"]
PROFILES = ("fast", "default", "thorough")
# Score episodes per stage when neither the build file nor the command line says.
EPISODES_BY_PROFILE = {"fast": 3, "default": 10, "thorough": 30}
# Batch-1 calls per latency measurement.
LATENCY_N_BY_PROFILE = {"fast": 300, "default": 2000, "thorough": 10000}
INPUT_FORMAT = "fat-checkpoint"
QUANTIZE_PASS = "quantize"  # the pass that --int8/--fp16/--fp32 talk to (field `precision`)
CACHE_LAYOUT = 2            # bump when the cache entry layout changes (2: signed records)
FILE_KEYS = ("passes", "seed", "profile", "episodes", "pass")
MAX_SEED = 2**31 - 1        # seeds reach torch, numpy and PyBullet; all take 31 bits
MAX_EPISODES = 10_000

DEFAULTS: dict[str, Any] = {"passes": list(DEFAULT_PLAN), "seed": 0, "profile": "default",
                            "episodes": None, "options": {}}


# --------------------------------------------------------------------------------------------
# plans and settings


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


def format_plan(plan: Sequence[str | PlanStep]) -> str:
    return ",".join(_step_name(s) for s in plan)


def _step_name(s: str | PlanStep | tuple[str, Any]) -> str:
    if isinstance(s, PlanStep):
        return s.name
    if isinstance(s, tuple):
        return s[0]
    return s


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

    def to_json(self) -> dict[str, Any]:
        return {"plan": [s.to_json() for s in self.plan], "seed": self.seed,
                "profile": self.profile, "episodes": self.episodes}


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
                     input_format: str = INPUT_FORMAT) -> BuildSettings:
    """Merge settings layers: defaults < build file < command line.

    Each layer is a dict with optional keys `passes` (list of names), `seed`, `profile`,
    `episodes` and `options` ({pass name: {field: value}}); a key that is absent or None leaves the
    lower layer's value. Options merge field by field. The command line may also carry
    `precision`: "int8"/"fp16" set `quantize.precision`; "fp32" drops quantize from the plan.
    Pass options are validated by each pass's Config (only for passes in the plan).
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
    q = QUANTIZE_PASS
    if precision == "fp32":
        if q in passes and sources.get("passes") != "default":
            raise PlanError(f"--fp32 asks for no quantization but the plan (from the "
                            f"{sources['passes']}) lists {q}: drop one of them")
        passes = [p for p in passes if p != q]
    elif precision is not None:
        if q not in passes:
            raise PlanError(f"--{precision} needs the {q} pass but the plan is "
                            f"{format_plan(passes)}: add {q} after export-onnx")
        options.setdefault(q, {})["precision"] = precision
        sources[f"{q}.precision"] = "cli"

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
    notes = []
    stray = {k.split(".", 1)[0]: origin for k, origin in sources.items()
             if "." in k and origin != "default" and k.split(".", 1)[0] not in passes}
    for name, origin in sorted(stray.items()):
        msg = (f"options are given for pass '{name}', which is not in the plan "
               f"{format_plan(passes)}")
        if origin == sources.get("passes"):
            raise PlanError(f"{msg}: remove [pass.{name}] or add {name} to the plan")
        notes.append(f"{msg} (from the {sources.get('passes', 'default')}); they are unused")
    plan = [PlanStep(n, make_config(n, options.get(n))) for n in passes]
    return BuildSettings(plan=plan, seed=seed, profile=profile, episodes=episodes,
                         sources=sources, notes=notes)


def validate_plan(plan: Sequence[str | PlanStep | tuple[str, Any]],
                  input_format: str = INPUT_FORMAT) -> None:
    """Refuse a plan that cannot run, before anything runs; the message says how to fix it."""
    names = [_step_name(s) for s in plan]
    if not names:
        raise PlanError("the plan is empty: give at least one pass, e.g. --passes pin-embodiment")
    known = all_passes()
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(n, list(known), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise PlanError(f"unknown pass '{n}'.{hint} Known passes: {', '.join(known)} "
                            "(see `xcompile passes`)")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise PlanError(f"pass '{n}' appears twice in the plan (positions {seen[n] + 1} and "
                            f"{i + 1}): each pass runs once; remove one")
        seen[n] = i

    fmt = input_format
    for i, n in enumerate(names):
        cls = known[n]
        if cls.input_format != fmt:
            raise PlanError(_format_fix(n, cls.input_format, fmt, names, i, known))
        for req in cls.requires:
            if req not in names[:i]:
                verb = "move" if req in names[i:] else "add"
                raise PlanError(f"{n} requires {req} earlier in the plan: {verb} {req} "
                                f"before {n}")
        fmt = cls.output_format


def _format_fix(name: str, wants: str, gets: str, names: list[str], i: int,
                known: Mapping[str, type[Pass]]) -> str:
    msg = f"{name} takes {wants} but gets {gets} here"
    if i == 0:
        msg = f"{name} takes {wants} but the build starts from a {gets}"
    bridges = [p for p, c in known.items() if c.input_format == gets and c.output_format == wants]
    later = [b for b in bridges if b in names[i + 1:]]
    if later:
        return f"{msg}: move {later[0]} before {name}"
    if bridges and bridges[0] not in names:
        return f"{msg}: put {bridges[0]} before it"
    earlier_makers = [p for p in names[:i] if known[p].output_format == wants]
    if earlier_makers:
        return (f"{msg}: move {name} right after {earlier_makers[-1]} "
                f"(the plan order is {','.join(names)})")
    makers = [p for p, c in known.items() if c.output_format == wants]
    if makers:
        return (f"{msg}: {name} needs {wants}, made by {', '.join(makers)}; reorder the plan "
                f"({','.join(names)}) so that one of them runs first")
    return f"{msg}: nothing makes {wants}; remove {name} from the plan"


# --------------------------------------------------------------------------------------------
# hooks, records, results


class BuildHooks:
    """Instrumentation callbacks; subclass and override what you need. Stage "fat" is the input."""

    def before_pass(self, name: str, index: int, total: int) -> None: ...

    def progress(self, name: str, desc: str, frac: float) -> None: ...

    def after_pass(self, record: StageRecord) -> None: ...

    def on_failure(self, name: str, error: BaseException, reproducer: Path | None) -> None: ...


@dataclass
class StageRecord:
    """What the report says about one stage: the input ("fat") or one pass's output."""

    name: str
    format: str | None = None
    wall_s: float = 0.0
    cached: bool = False
    skipped: bool = False
    skip_reason: str | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    measurements: dict[str, Any] = field(default_factory=dict)
    artifact: Artifact | None = None
    cache_key: str | None = None


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


@dataclass
class BuildResult:
    out_dir: Path
    report: dict[str, Any]
    stages: list[StageRecord]
    final: Artifact

    @property
    def missed_gates(self) -> list[dict[str, Any]]:
        return [g for g in self.report.get("gates", []) if not g["passed"]]

    def raise_for_gates(self) -> None:
        missed = self.missed_gates
        if missed:
            raise GateError("missed deployment gate(s): " + "; ".join(g["message"] for g in missed)
                            + f" (report in {self.out_dir})")


Measure = Callable[..., dict[str, Any]]


class PassError(XCompileError):
    """A pass failed; the message names the pass and the reproducer folder."""

    def __init__(self, message: str, pass_name: str, reproducer: Path | None, exit_code: int):
        super().__init__(message)
        self.pass_name = pass_name
        self.reproducer = reproducer
        self.exit_code = exit_code


# --------------------------------------------------------------------------------------------
# hashing and the cache


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def target_fingerprint(robot: RobotTarget, hardware: HardwareTarget) -> dict[str, str]:
    fp = {"robot": robot.name, "hardware": hardware.name,
          "robot_toml": _file_or_model_hash(robot.source, robot),
          "hardware_toml": _file_or_model_hash(hardware.source, hardware)}
    urdf = robot.urdf_path()
    fp["urdf"] = file_sha256(urdf) if urdf.is_file() else robot.urdf
    return fp


def _file_or_model_hash(source: str, model: Any) -> str:
    if source and Path(source).is_file():
        return file_sha256(source)
    return _sha(model.model_dump())


@functools.cache
def _source_sha256(cls: type) -> str:
    """sha256 of the file that defines the pass class `cls`."""
    return file_sha256(Path(inspect.getfile(cls)))


def cache_key(inp: Artifact, step: PlanStep, fingerprint: Mapping[str, str], seed: int,
              profile: str) -> str:
    cls = step.pass_cls
    return _sha({"layout": CACHE_LAYOUT, "input": inp.id, "pass": step.name,
                 "version": cls.version, "code": _source_sha256(cls),
                 "config": step.config.model_dump(mode="json"),
                 "target": dict(fingerprint), "seed": seed, "profile": profile})


def _load_entry(entry: Path, notes: list[str] | None = None
                ) -> tuple[Artifact, dict[str, Any]] | None:
    """A committed cache entry, or None when there is none or it does not verify (redo the pass)."""
    if not entry.is_dir():
        return None
    try:
        d = integrity.verify(json.loads((entry / "artifact.json").read_text()))
        checks = integrity.verify(json.loads((entry / "measurements.json").read_text()))
        if d is None or checks is None:
            raise ValueError("signature does not verify")
        rel = Path(d["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError("artifact path leaves the entry")
        d["path"] = str(entry / rel)
        art = Artifact.from_json(d)
        if (not art.path.is_file() or art.path.is_symlink()
                or file_sha256(art.path) != art.sha256):
            raise ValueError("artifact file changed")
        return art, checks
    except (OSError, ValueError, KeyError, TypeError) as e:
        if notes is not None:
            notes.append(f"cache entry {entry.name[:12]} was discarded and its pass run again "
                         f"({e})")
        return None


def _commit_entry(workdir: Path, entry: Path, art: Artifact, checks: dict[str, Any]) -> Artifact:
    """Write the entry's signed JSON and rename the workdir into place; return the artifact there."""
    rel = art.path.resolve().relative_to(workdir.resolve())
    doc = art.to_json()
    doc["path"] = str(rel)
    (workdir / "artifact.json").write_text(json.dumps(integrity.sign(doc), indent=2, default=str))
    (workdir / "measurements.json").write_text(
        json.dumps(integrity.sign(checks), indent=2, default=str))
    if entry.exists():                  # --no-cache, or a discarded entry: replace it
        old = temp_dir(entry.parent / "tmp", f"old-{entry.name[:12]}")
        os.rmdir(old)
        os.rename(entry, old)
        remove_tree(old)
    try:
        os.rename(workdir, entry)
    except OSError:                     # another build committed the same key first: use theirs
        remove_tree(workdir)
        loaded = _load_entry(entry)
        if loaded is None:
            raise
        return loaded[0]
    return dataclasses.replace(art, path=entry / rel)


def _measure_cached(measure: Measure, art: Artifact, robot: RobotTarget, hardware: HardwareTarget,
                    episodes: int, seed: int, latency_n: int, cache_dir: Path,
                    use_cache: bool, notes: list[str] | None = None) -> dict[str, Any]:
    # Keyed by artifact id: artifacts are immutable, so there is nothing to invalidate. The host
    # is in the key because latency belongs to the machine it was measured on. The record is
    # signed (xcompile.integrity) and names the artifact it describes: an edited number, or a
    # record moved to another key, is discarded and measured again.
    key = _sha({"artifact": art.id, "robot": robot.name, "hardware": hardware.name,
                "episodes": episodes, "seed": seed, "latency_n": latency_n,
                "host": platform.node()})
    path = cache_dir / "measure" / f"{key}.json"
    if use_cache and path.is_file():
        try:
            rec = integrity.verify(json.loads(path.read_text()))
            if rec is None or rec.get("key") != key or rec.get("artifact") != art.id \
                    or not isinstance(rec.get("measurements"), dict):
                raise ValueError("its signature or its artifact does not match")
            return dict(rec["measurements"])
        except (OSError, ValueError) as e:
            if notes is not None:
                notes.append(f"cached measurement {key[:12]} of stage artifact {art.id} was "
                             f"discarded and measured again ({e})")
    m = dict(measure(art, robot, episodes=episodes, seed=seed, latency_n=latency_n))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(integrity.sign(
            {"key": key, "artifact": art.id, "measurements": m}), default=str))
    except OSError as e:
        if not is_storage_error(e):
            raise
        if notes is not None:
            notes.append(f"could not cache a measurement in {path.parent} ({e.strerror})")
    return m


# --------------------------------------------------------------------------------------------
# running


def _as_targets(robot: str | Path | RobotTarget, hardware: str | Path | HardwareTarget | None
                ) -> tuple[RobotTarget, HardwareTarget]:
    r = robot if isinstance(robot, RobotTarget) else load_robot(robot)
    if hardware is None:
        hardware = r.hardware
    h = hardware if isinstance(hardware, HardwareTarget) else load_hardware(hardware)
    return r, h


def prepare_cache(cache_dir: Path) -> None:
    """Make the cache's folders (or say why not) and remove what killed runs left in tmp/."""
    try:
        (cache_dir / "tmp").mkdir(parents=True, exist_ok=True)
        (cache_dir / "measure").mkdir(exist_ok=True)
        probe = temp_dir(cache_dir / "tmp", "probe")
        os.rmdir(probe)
    except OSError as e:
        raise OutputError(f"the cache folder {cache_dir} cannot be written ({e.strerror}); give "
                          "a writable --cache-dir") from None
    clean_orphans(cache_dir / "tmp", "")
    clean_orphans(cache_dir / "measure", "")


def input_artifact(ckpt_path: str | Path, robot: RobotTarget) -> Artifact:
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (or is not a file); "
                              "check the path")
    return Artifact.create(INPUT_FORMAT, path, robot.name)


def run_plan(ckpt_path: str | Path | Artifact, robot: str | Path | RobotTarget,
             hardware: str | Path | HardwareTarget | None, plan: Sequence[PlanStep],
             out_dir: str | Path, cache_dir: str | Path = ".xcompile/cache",
             use_cache: bool = True, seed: int = 0, profile: str = "default",
             hooks: Sequence[BuildHooks] = (), tensorrt_required: bool = False,
             episodes: int = 10, gates: Gates | None = None, measure: Measure | None = None,
             runtime_floor: Callable[[], float] | None = None, rollout: bool = True,
             extra_manifest: Mapping[str, Any] | None = None, force: bool = False
             ) -> BuildResult:
    """Run `plan` on a fat checkpoint (or any artifact) for one robot; write `out_dir`.

    `measure(artifact, robot, episodes=, seed=, latency_n=) -> dict` defaults to
    `xcompile.measure.measure_artifact`; `runtime_floor()` to onnxruntime's empty-graph floor.
    Raises PlanError before running anything when the plan cannot run; PassError (with a
    reproducer) when a pass fails with an XCompileError. Gates are evaluated into the report;
    call `result.raise_for_gates()` to turn a miss into GateError. `out_dir` is replaced only
    when it is xcompile's to replace (`xcompile.outdir`); `force` also replaces a previous build
    that holds files it did not write. Both are checked before any work.
    """
    robot_t, hw = _as_targets(robot, hardware)
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir)
    if isinstance(ckpt_path, Artifact):
        inp = ckpt_path
    else:
        inp = input_artifact(ckpt_path, robot_t)
    validate_plan(list(plan), input_format=inp.format)
    if profile not in PROFILES:
        raise PlanError(f"unknown profile '{profile}': choose one of {', '.join(PROFILES)}")
    if measure is None:
        from xcompile.measure import measure_artifact as measure
    check_replaceable(out_dir, force=force)
    check_writable_parent(out_dir)
    prepare_cache(cache_dir)
    fingerprint = target_fingerprint(robot_t, hw)
    fire = _Fire(hooks)
    notes: list[str] = []

    records: list[StageRecord] = []
    total = len(plan) + 1
    fire.before_pass("fat" if inp.format == INPUT_FORMAT else "input", 0, total)
    t0 = time.perf_counter()
    first = StageRecord("fat" if inp.format == INPUT_FORMAT else "input", inp.format,
                        artifact=inp)
    latency_n = LATENCY_N_BY_PROFILE[profile]
    first.measurements = _measure_cached(measure, inp, robot_t, hw, episodes, seed, latency_n,
                                         cache_dir, use_cache, notes)
    first.wall_s = time.perf_counter() - t0
    records.append(first)
    fire.after_pass(first)

    ctx_stages: dict[str, Artifact] = {}
    history: list[str] = []
    current = inp
    for i, step in enumerate(plan):
        cls = step.pass_cls
        fire.before_pass(step.name, i + 1, total)
        rec = StageRecord(step.name)
        t0 = time.perf_counter()
        key = cache_key(current, step, fingerprint, seed, profile)
        entry = cache_dir / key
        loaded = _load_entry(entry, notes) if use_cache else None
        if loaded is not None:
            out, checks = loaded
            rec.cached = True
        else:
            try:
                workdir = temp_dir(cache_dir / "tmp", step.name)
            except OSError as e:
                raise storage_error(e, f"in the cache {cache_dir}") from None
            ctx = BuildContext(
                robot=robot_t, hardware=hw, workdir=workdir, seed=seed, profile=profile,
                source_sha256=inp.sha256, history=list(history),
                progress=lambda desc, frac, _n=step.name: fire.progress(_n, desc, frac),
                stages=dict(ctx_stages))
            try:
                p = cls()
                out = p.run(current, step.config, ctx)
                checks = dict(p.check(current, out, step.config, ctx) or {})
                _check_output(step, out, workdir)
                out = _commit_entry(workdir, entry, out, checks)
            except ToolUnavailable as e:
                remove_tree(workdir)
                required = tensorrt_required and cls.output_format == "tensorrt"
                later_ok = all(get_pass(s.name).input_format == current.format
                               for s in plan[i + 1:i + 2])
                if required or not later_ok:
                    # No reproducer: the input is fine, the machine lacks the tool.
                    fire.on_failure(step.name, e, None)
                    why = ("it was required (--tensorrt)" if required else
                           f"{plan[i + 1].name} needs its output")
                    raise PassError(f"pass '{step.name}' cannot run here and {why}: {e}",
                                    step.name, None, e.exit_code) from e
                rec.skipped, rec.skip_reason = True, str(e)
                rec.wall_s = time.perf_counter() - t0
                records.append(rec)
                fire.after_pass(rec)
                continue
            except Exception as e:
                remove_tree(workdir)
                if is_storage_error(e):     # the disk, not the pass: no reproducer to write
                    fire.on_failure(step.name, e, None)
                    raise storage_error(e, f"pass '{step.name}''s work in the cache "
                                           f"{cache_dir}") from None
                repro = _fail(e, step, plan[i:], current, robot_t, hw, seed, profile, out_dir,
                              cache_dir, fire)
                if isinstance(e, XCompileError):
                    raise PassError(f"pass '{step.name}' failed: {e}\nreproducer: {repro} "
                                    f"(see {repro / 'README.md'})", step.name, repro,
                                    e.exit_code) from e
                # A bug, not a user error: keep its traceback, but say where the reproducer is.
                if hasattr(e, "add_note"):
                    e.add_note(f"xcompile: pass '{step.name}' crashed; reproducer: {repro}")
                raise
            except BaseException:       # interrupted (Ctrl-C, SIGTERM): leave no partial work
                remove_tree(workdir)
                raise
        rec.format, rec.artifact, rec.checks, rec.cache_key = out.format, out, checks, key
        rec.measurements = _measure_cached(measure, out, robot_t, hw, episodes, seed, latency_n,
                                           cache_dir, use_cache, notes)
        rec.wall_s = time.perf_counter() - t0
        records.append(rec)
        fire.after_pass(rec)
        ctx_stages[step.name] = out
        history.append(step.name)
        current = out

    if runtime_floor is None:
        def runtime_floor() -> float:
            from xcompile.measure import ort_floor_us
            from xcompile.sim.env import obs_dim

            return float(ort_floor_us(obs_dim(robot_t)))

    from xcompile import report as report_mod

    doc = report_mod.build_report(
        robot_t, hw, plan, records, seed=seed, profile=profile, episodes=episodes,
        gates=gates or Gates(), runtime_floor_us=runtime_floor())
    doc["notes"] = list(doc["notes"]) + notes
    write_folder(out_dir, lambda tmp: report_mod.write_outputs(
        tmp, doc, records, inp, robot_t, hw, plan, seed=seed, profile=profile,
        episodes=episodes, rollout=rollout, extra_manifest=extra_manifest), force=force)
    return BuildResult(out_dir=out_dir, report=doc, stages=records, final=current)


class _Fire:
    def __init__(self, hooks: Sequence[BuildHooks]):
        self.hooks = list(hooks)

    def __getattr__(self, name: str) -> Callable[..., None]:
        def call(*args: Any) -> None:
            for h in self.hooks:
                getattr(h, name)(*args)
        return call


def _check_output(step: PlanStep, out: Artifact, workdir: Path) -> None:
    cls = step.pass_cls
    if not isinstance(out, Artifact) or out.format != cls.output_format:
        raise RuntimeError(f"pass {step.name} returned {out!r}, not a {cls.output_format} "
                           "artifact")
    if not out.path.resolve().is_relative_to(workdir.resolve()):
        raise RuntimeError(f"pass {step.name} wrote {out.path} outside its workdir {workdir}")


# --------------------------------------------------------------------------------------------
# rebuilding from a manifest


@dataclass(frozen=True)
class Rebuild:
    """What `xcompile build --from manifest.json` runs, checked against the manifest's hashes."""

    checkpoint: Path
    robot: RobotTarget
    hardware: HardwareTarget
    settings: BuildSettings
    expected_outputs: dict[str, str]        # file name -> sha256 recorded by the original build
    notes: list[str]


_SHA256 = r"^[0-9a-f]{64}$"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _ManifestFile(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    path: str = Field(max_length=4096)
    sha256: str = Field(pattern=_SHA256)


class _ManifestStep(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(max_length=64)
    version: int
    config: dict[str, Any] = Field(default_factory=dict)


class _Manifest(BaseModel):
    """The part of manifest.json a rebuild reads; anything else in it is ignored."""

    model_config = ConfigDict(extra="allow", strict=True)
    robot: str = Field(pattern=_NAME)
    hardware: str = Field(pattern=_NAME)
    inputs: dict[str, _ManifestFile]
    outputs: dict[str, Annotated[str, Field(pattern=_SHA256)]]
    plan: list[_ManifestStep] = Field(min_length=1, max_length=64)
    seed: int = Field(ge=0, le=MAX_SEED)
    profile: Literal["fast", "default", "thorough"]
    episodes: int = Field(ge=1, le=MAX_EPISODES)
    versions: dict[str, str | None] = Field(default_factory=dict)
    xcompile_version: str = "?"


def read_manifest(path: str | Path) -> _Manifest:
    """Parse and validate a manifest.json; every defect is one PlanError naming the field."""
    path = Path(path)
    try:
        if path.is_dir():
            raise PlanError(f"{path} is a folder; give the manifest.json inside it")
        if path.stat().st_size > 10_000_000:
            raise PlanError(f"{path} is over 10 MB: not an xcompile build manifest")
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"manifest {str(path)!r} does not exist; give the manifest.json of a "
                        "finished build (in its --out folder)") from None
    except (OSError, ValueError) as e:
        raise PlanError(f"{path} is not a readable JSON manifest ({e})") from None
    if not isinstance(doc, dict):
        raise PlanError(f"{path} is not an xcompile build manifest (not a JSON object)")
    try:
        return _Manifest.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "(top level)"
        raise PlanError(f"{path} is not a valid xcompile build manifest: {loc}: {first['msg']}"
                        f" ({e.error_count()} problem(s))") from None


def rebuild_from_manifest(manifest_path: str | Path, checkpoint: str | Path | None = None,
                          robot_toml: str | Path | None = None,
                          hardware_toml: str | Path | None = None) -> Rebuild:
    """Read a build's manifest and check that its inputs are still the same files.

    A manifest is untrusted: it may name only files inside its own folder, xcompile's built-in
    targets (found by name), or files given here (the checkpoint, `robot_toml`, `hardware_toml`:
    the command line). Each is checked by hash before it is read. Every pass must be at the
    recorded version; anything else is refused, since the rebuild would silently be another
    build. Differing library versions are allowed and noted.
    """
    from xcompile import __version__
    from xcompile.report import VERSIONED, lib_version

    path = Path(manifest_path)
    doc = read_manifest(path)
    home = path.resolve().parent
    inputs = doc.inputs

    def same_file(kind: str, given: Path, recorded: _ManifestFile) -> None:
        if not given.is_file():
            raise PlanError(f"the {kind} of that build, {str(given)!r}, does not exist here; "
                            + ("give the checkpoint's new path as CHECKPOINT" if kind ==
                               "checkpoint" else "restore it to rebuild"))
        if file_sha256(given) != recorded.sha256:
            raise PlanError(f"the {kind} {str(given)!r} has changed since the build (the "
                            f"manifest records sha256 {recorded.sha256[:12]}); a rebuild from it "
                            "would be another build. Restore the original file, or run a new "
                            "build instead of --from.")

    def recorded_inside(kind: str, rec: _ManifestFile, flag: str) -> Path:
        p = Path(rec.path)
        p = (p if p.is_absolute() else home / p).resolve()
        if not p.is_relative_to(home):
            raise PlanError(f"the manifest's {kind} lies outside its folder ({rec.path}); "
                            f"xcompile reads only files a manifest's folder holds or that you "
                            f"name: give it with {flag}")
        return p

    if "checkpoint" not in inputs:
        raise PlanError(f"{path} records no checkpoint; it cannot be rebuilt")
    ckpt = (Path(checkpoint) if checkpoint is not None else
            recorded_inside("checkpoint", inputs["checkpoint"], "CHECKPOINT (e.g. xcompile "
                            f"build {inputs['checkpoint'].path} --from {path})"))
    same_file("checkpoint", ckpt, inputs["checkpoint"])

    def locate(kind: str, key: str, builtin_dir: Path, name: str, given: str | Path | None,
               flag: str) -> Path:
        rec = inputs.get(key)
        if rec is None:
            raise PlanError(f"{path} records no {kind} file; it cannot be rebuilt")
        if given is not None:
            p = Path(given)
        elif (builtin_dir / f"{name}.toml").is_file() and \
                file_sha256(builtin_dir / f"{name}.toml") == rec.sha256:
            p = builtin_dir / f"{name}.toml"    # a built-in target, found by name
        else:
            p = recorded_inside(kind, rec, f"{flag} PATH")
        same_file(kind, p, rec)
        return p

    robot = load_robot(locate("robot TOML", "robot_toml", ROBOTS_DIR, doc.robot, robot_toml,
                              "--target"))
    if robot.name != doc.robot:
        raise PlanError(f"the robot TOML describes '{robot.name}', the manifest '{doc.robot}'")
    if "urdf" in inputs:
        same_file("URDF", robot.urdf_path(), inputs["urdf"])
    hw = load_hardware(locate("hardware TOML", "hardware_toml", HARDWARE_DIR, doc.hardware,
                              hardware_toml, "--hardware"))

    plan = []
    known = all_passes()
    for step in doc.plan:
        if step.name not in known:
            raise PlanError(f"the manifest's plan names pass '{step.name}', which this xcompile "
                            f"does not have (known: {', '.join(known)})")
        cls = known[step.name]
        if cls.version != step.version:
            raise PlanError(f"pass '{step.name}' is version {cls.version} in this xcompile; "
                            f"the manifest was built with version {step.version}. Use "
                            f"xcompile {doc.xcompile_version} to rebuild it.")
        plan.append(PlanStep(step.name, make_config(step.name, step.config)))
    validate_plan(plan)
    settings = BuildSettings(plan=plan, seed=doc.seed, profile=doc.profile,
                             episodes=doc.episodes, sources={"passes": "manifest"})
    notes = []
    here = {"xcompile": __version__, **{d: lib_version(d) for d in VERSIONED}}
    for lib, v in here.items():
        was = doc.versions.get(lib)
        if was is not None and v is not None and was != v:
            notes.append(f"{lib} is {v} here, {was} in the original build: outputs may differ")
    return Rebuild(ckpt, robot, hw, settings, dict(doc.outputs), notes)


def compare_outputs(out_dir: Path, expected: Mapping[str, str],
                    names: Sequence[str] = ("policy.onnx", "policy.plan")) -> dict[str, bool]:
    """{file: identical?} for the compiled policy files the original build recorded."""
    return {n: file_sha256(out_dir / n) == expected[n] for n in names
            if n in expected and (out_dir / n).is_file()}


# --------------------------------------------------------------------------------------------
# reproducers


def reproducer_dir(out_dir: Path) -> Path:
    """`OUT.repro` beside the output folder; `OUT.repro-2`, … when that name holds something
    that is not an earlier reproducer (xcompile replaces only its own folders)."""
    out_dir = Path(os.path.abspath(out_dir))
    for n in range(1, 100):
        repro = out_dir.parent / (f"{out_dir.name}.repro" + (f"-{n}" if n > 1 else ""))
        try:
            check_replaceable(repro, markers=REPRO_MARKERS, allowed=REPRO_NAMES,
                              flag="reproducer folder")
            return repro
        except OutputError:
            continue
    raise OutputError(f"no free reproducer folder name beside {out_dir}")


def _fail(error: BaseException, step: PlanStep, remaining: Sequence[PlanStep], inp: Artifact,
          robot: RobotTarget, hw: HardwareTarget, seed: int, profile: str, out_dir: Path,
          cache_dir: Path, fire: _Fire) -> Path:
    repro = write_reproducer(reproducer_dir(Path(out_dir)), error, step, remaining, inp, robot, hw,
                             seed, profile)
    fire.on_failure(step.name, error, repro)
    return repro


def write_reproducer(repro: Path, error: BaseException, step: PlanStep,
                     remaining: Sequence[PlanStep], inp: Artifact, robot: RobotTarget,
                     hw: HardwareTarget, seed: int, profile: str) -> Path:
    """Folder with the failing pass's input artifact and the rest of the plan, and how to re-run."""
    replace_marked_folder(repro, REPRO_MARKERS, REPRO_NAMES)
    (repro / "input").mkdir(parents=True)
    # A cache entry's artifact may have sidecar files (ONNX beside a .plan): copy its folder.
    src_dir = inp.path.parent
    if inp.format != INPUT_FORMAT and (src_dir / "artifact.json").is_file():
        for f in src_dir.iterdir():
            if f.is_file() and f.name not in ("artifact.json", "measurements.json"):
                shutil.copy2(f, repro / "input" / f.name)
    else:
        shutil.copy2(inp.path, repro / "input" / inp.path.name)
    art_doc = inp.to_json()
    art_doc["path"] = f"input/{inp.path.name}"
    (repro / "artifact.json").write_text(json.dumps(art_doc, indent=2, default=str))
    builtin = robot.source and Path(robot.source).parent == ROBOTS_DIR
    target = robot.name if builtin or not robot.source else robot.source
    hw_arg = hw.name if Path(hw.source or "").parent == HARDWARE_DIR else (hw.source or hw.name)
    repro = repro.resolve()
    plan_doc = {"failed_pass": step.name, "error": f"{type(error).__name__}: {error}",
                "robot": robot.name, "robot_toml": target, "hardware": hw.name,
                "hardware_toml": hw.source, "seed": seed, "profile": profile,
                "input": art_doc, "plan": [s.to_json() for s in remaining]}
    (repro / "plan.json").write_text(json.dumps(plan_doc, indent=2, default=str))
    lines = [f'passes = {json.dumps([s.name for s in remaining])}', f"seed = {seed}",
             f'profile = "{profile}"']
    for s in remaining:
        opts = s.config.model_dump(mode="json")
        if opts:
            lines.append(f"\n[pass.{s.name}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in opts.items() if v is not None]
    (repro / "build.toml").write_text("\n".join(lines) + "\n")
    cmd = (f"xcompile build {repro} --target {target} --hardware {hw_arg} "
           f"--config {repro / 'build.toml'}")
    (repro / "README.md").write_text(
        f"# Reproducer: pass `{step.name}` failed\n\n"
        f"{type(error).__name__}: {error}\n\n"
        f"Re-run the failing pass and the rest of the plan on its input artifact:\n\n"
        f"    {cmd}\n")
    return repro


def load_reproducer(repro: str | Path) -> tuple[Artifact, dict[str, Any]]:
    """The input artifact and plan document of a reproducer folder.

    A reproducer is untrusted: its artifact must be a file inside the folder, and must hash to
    the sha256 its artifact.json records before anything reads it.
    """
    repro = Path(repro)
    try:
        art_doc = json.loads((repro / "artifact.json").read_text())
        plan_doc = json.loads((repro / "plan.json").read_text())
    except (OSError, ValueError) as e:
        raise PlanError(f"{repro} is not a reproducer folder (artifact.json, plan.json): {e}") \
            from None
    try:
        rel, fmt, robot = Path(art_doc["path"]), art_doc["format"], art_doc["robot"]
        sha, meta = art_doc["sha256"], art_doc.get("meta") or {}
        lineage = tuple(art_doc.get("lineage") or ())
        if not (isinstance(fmt, str) and isinstance(robot, str) and isinstance(sha, str)
                and isinstance(meta, dict) and isinstance(plan_doc, dict)
                and all(isinstance(x, str) for x in lineage)):
            raise TypeError("a field has the wrong type")
    except (KeyError, TypeError) as e:
        raise PlanError(f"{repro / 'artifact.json'} is not a reproducer's artifact record ({e})") \
            from None
    if fmt not in FORMATS:
        raise PlanError(f"{repro / 'artifact.json'}: unknown format {fmt!r}")
    root = repro.resolve()
    path = (root / rel).resolve()
    if rel.is_absolute() or not path.is_relative_to(root) or not path.is_file():
        raise PlanError(f"{repro / 'artifact.json'} names {str(rel)!r}, which is not a file inside "
                        "the reproducer folder; a reproducer may only refer to its own files")
    if file_sha256(path) != sha:
        raise PlanError(f"{path} does not match the sha256 its artifact.json records; the "
                        "reproducer was changed since it was written")
    return Artifact(fmt, path, robot, dict(meta), lineage, sha), plan_doc
