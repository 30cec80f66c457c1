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
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from xcompile.artifact import Artifact, file_sha256
from xcompile.errors import CheckpointError, GateError, PlanError, ToolUnavailable, XCompileError
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
CACHE_LAYOUT = 1            # bump when the cache entry layout changes
FILE_KEYS = ("passes", "seed", "profile", "episodes", "pass")

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
    if not isinstance(seed, int) or seed < 0:
        raise PlanError(f"seed must be a non-negative integer, got {seed!r}")
    episodes = merged.get("episodes") or EPISODES_BY_PROFILE[profile]
    if not isinstance(episodes, int) or episodes < 1:
        raise PlanError(f"episodes must be a positive integer, got {episodes!r}")

    validate_plan(passes, input_format=input_format)
    plan = [PlanStep(n, make_config(n, options.get(n))) for n in passes]
    return BuildSettings(plan=plan, seed=seed, profile=profile, episodes=episodes,
                         sources=sources)


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


def _load_entry(entry: Path) -> tuple[Artifact, dict[str, Any]] | None:
    try:
        d = json.loads((entry / "artifact.json").read_text())
        checks = json.loads((entry / "measurements.json").read_text())
        d["path"] = str(entry / d["path"])
        art = Artifact.from_json(d)
        if not art.path.is_file() or file_sha256(art.path) != art.sha256:
            return None                 # damaged entry: run the pass again
        return art, checks
    except (OSError, ValueError, KeyError):
        return None


def _commit_entry(workdir: Path, entry: Path, art: Artifact, checks: dict[str, Any]) -> Artifact:
    """Write the entry's JSON and rename the workdir into place; return the artifact there."""
    rel = art.path.resolve().relative_to(workdir.resolve())
    doc = art.to_json()
    doc["path"] = str(rel)
    (workdir / "artifact.json").write_text(json.dumps(doc, indent=2, default=str))
    (workdir / "measurements.json").write_text(json.dumps(checks, indent=2, default=str))
    if entry.exists():                  # --no-cache: replace the old entry
        old = entry.with_name(f".{entry.name}.old-{os.getpid()}")
        os.rename(entry, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(workdir, entry)
    except OSError:                     # another build committed the same key first: use theirs
        shutil.rmtree(workdir, ignore_errors=True)
        loaded = _load_entry(entry)
        if loaded is None:
            raise
        return loaded[0]
    return dataclasses.replace(art, path=entry / rel)


def _measure_cached(measure: Measure, art: Artifact, robot: RobotTarget, hardware: HardwareTarget,
                    episodes: int, seed: int, latency_n: int, cache_dir: Path,
                    use_cache: bool) -> dict[str, Any]:
    # Keyed by artifact id: artifacts are immutable, so there is nothing to invalidate. The host
    # is in the key because latency belongs to the machine it was measured on.
    key = _sha({"artifact": art.id, "robot": robot.name, "hardware": hardware.name,
                "episodes": episodes, "seed": seed, "latency_n": latency_n,
                "host": platform.node()})
    path = cache_dir / "measure" / f"{key}.json"
    if use_cache and path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    m = dict(measure(art, robot, episodes=episodes, seed=seed, latency_n=latency_n))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(m, default=str))
    os.replace(tmp, path)
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
             extra_manifest: Mapping[str, Any] | None = None) -> BuildResult:
    """Run `plan` on a fat checkpoint (or any artifact) for one robot; write `out_dir`.

    `measure(artifact, robot, episodes=, seed=, latency_n=) -> dict` defaults to
    `xcompile.measure.measure_artifact`; `runtime_floor()` to onnxruntime's empty-graph floor.
    Raises PlanError before running anything when the plan cannot run; PassError (with a
    reproducer) when a pass fails with an XCompileError. Gates are evaluated into the report;
    call `result.raise_for_gates()` to turn a miss into GateError.
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
    fingerprint = target_fingerprint(robot_t, hw)
    fire = _Fire(hooks)
    (cache_dir / "tmp").mkdir(parents=True, exist_ok=True)

    records: list[StageRecord] = []
    total = len(plan) + 1
    fire.before_pass("fat" if inp.format == INPUT_FORMAT else "input", 0, total)
    t0 = time.perf_counter()
    first = StageRecord("fat" if inp.format == INPUT_FORMAT else "input", inp.format,
                        artifact=inp)
    latency_n = LATENCY_N_BY_PROFILE[profile]
    first.measurements = _measure_cached(measure, inp, robot_t, hw, episodes, seed, latency_n,
                                         cache_dir, use_cache)
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
        loaded = _load_entry(entry) if use_cache else None
        if loaded is not None:
            out, checks = loaded
            rec.cached = True
        else:
            workdir = Path(tempfile.mkdtemp(prefix=f"{step.name}-", dir=cache_dir / "tmp"))
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
                shutil.rmtree(workdir, ignore_errors=True)
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
                shutil.rmtree(workdir, ignore_errors=True)
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
                shutil.rmtree(workdir, ignore_errors=True)
                raise
        rec.format, rec.artifact, rec.checks, rec.cache_key = out.format, out, checks, key
        rec.measurements = _measure_cached(measure, out, robot_t, hw, episodes, seed, latency_n,
                                           cache_dir, use_cache)
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
    _write_outputs(out_dir, lambda tmp: report_mod.write_outputs(
        tmp, doc, records, inp, robot_t, hw, plan, seed=seed, profile=profile,
        episodes=episodes, rollout=rollout, extra_manifest=extra_manifest))
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


def _write_outputs(out_dir: Path, write: Callable[[Path], None]) -> None:
    """Build the output folder beside `out_dir`, then swap it in: never a half-written folder."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)       # mkdtemp makes it private; an output folder is not
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def rebuild_from_manifest(manifest_path: str | Path, checkpoint: str | Path | None = None
                          ) -> Rebuild:
    """Read a build's manifest and check that its inputs are still the same files.

    Every input (checkpoint, robot TOML, URDF, hardware TOML) must hash to what the manifest
    recorded, and every pass must be at the recorded version; anything else is refused, since the
    rebuild would silently be another build. `checkpoint` replaces the recorded path (the file
    moved) but must have the same hash. Differing library versions are allowed and noted.
    """
    from xcompile import __version__
    from xcompile.report import VERSIONED, lib_version

    path = Path(manifest_path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"manifest {str(path)!r} does not exist; give the manifest.json of a "
                        "finished build (in its --out folder)") from None
    except (OSError, ValueError) as e:
        raise PlanError(f"{path} is not a readable JSON manifest ({e})") from None
    need = ("robot", "hardware", "inputs", "outputs", "plan", "seed", "profile", "episodes")
    if not isinstance(doc, dict) or any(k not in doc for k in need):
        raise PlanError(f"{path} is not an xcompile build manifest (it needs the keys "
                        f"{', '.join(need)})")
    inputs = doc["inputs"]

    def same_file(kind: str, given: Path, recorded: Mapping[str, Any]) -> None:
        if not given.is_file():
            raise PlanError(f"the {kind} of that build, {str(given)!r}, does not exist here; "
                            + ("give the checkpoint's new path as CHECKPOINT" if kind ==
                               "checkpoint" else "restore it to rebuild"))
        sha = file_sha256(given)
        if sha != recorded["sha256"]:
            raise PlanError(f"the {kind} {str(given)!r} has changed since the build (sha256 "
                            f"{sha[:12]}, manifest {recorded['sha256'][:12]}); a rebuild from it "
                            "would be another build. Restore the original file, or run a new "
                            "build instead of --from.")

    ckpt = Path(checkpoint) if checkpoint is not None else Path(inputs["checkpoint"]["path"])
    same_file("checkpoint", ckpt, inputs["checkpoint"])

    def locate(kind: str, key: str, builtin_dir: Path, name: str) -> Path:
        # A built-in target's recorded path is where xcompile was installed on the build
        # machine; on another machine the same built-in is found by name (its hash must match).
        rec = inputs.get(key)
        if rec is None:
            raise PlanError(f"{path} records no {kind} file; it cannot be rebuilt")
        p = Path(rec["path"])
        if not p.is_file() and (builtin_dir / f"{name}.toml").is_file():
            p = builtin_dir / f"{name}.toml"
        same_file(kind, p, rec)
        return p

    robot_toml = locate("robot TOML", "robot_toml", ROBOTS_DIR, doc["robot"])
    robot = load_robot(robot_toml)
    if "urdf" in inputs:
        same_file("URDF", robot.urdf_path(), inputs["urdf"])
    hw = load_hardware(locate("hardware TOML", "hardware_toml", HARDWARE_DIR, doc["hardware"]))

    plan = []
    for step in doc["plan"]:
        cls = get_pass(step["name"])
        if cls.version != step.get("version"):
            raise PlanError(f"pass '{step['name']}' is version {cls.version} in this xcompile; "
                            f"the manifest was built with version {step.get('version')}. Use "
                            f"xcompile {doc.get('xcompile_version', '?')} to rebuild it.")
        plan.append(PlanStep(step["name"], make_config(step["name"], step.get("config"))))
    validate_plan(plan)
    settings = BuildSettings(plan=plan, seed=int(doc["seed"]), profile=str(doc["profile"]),
                             episodes=int(doc["episodes"]),
                             sources={"passes": "manifest"})
    notes = []
    here = {"xcompile": __version__, **{d: lib_version(d) for d in VERSIONED}}
    for lib, v in here.items():
        was = doc.get("versions", {}).get(lib)
        if was is not None and v is not None and was != v:
            notes.append(f"{lib} is {v} here, {was} in the original build: outputs may differ")
    return Rebuild(ckpt, robot, hw, settings, dict(doc["outputs"]), notes)


def compare_outputs(out_dir: Path, expected: Mapping[str, str],
                    names: Sequence[str] = ("policy.onnx", "policy.plan")) -> dict[str, bool]:
    """{file: identical?} for the compiled policy files the original build recorded."""
    return {n: file_sha256(out_dir / n) == expected[n] for n in names
            if n in expected and (out_dir / n).is_file()}


# --------------------------------------------------------------------------------------------
# reproducers


def reproducer_dir(out_dir: Path) -> Path:
    return out_dir.parent / f"{out_dir.name}.repro"


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
    if repro.exists():
        shutil.rmtree(repro)
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
    """The input artifact and plan document of a reproducer folder."""
    repro = Path(repro)
    try:
        art_doc = json.loads((repro / "artifact.json").read_text())
        plan_doc = json.loads((repro / "plan.json").read_text())
    except (OSError, ValueError) as e:
        raise PlanError(f"{repro} is not a reproducer folder (artifact.json, plan.json): {e}") \
            from None
    path = repro / art_doc["path"]
    art = Artifact.create(art_doc["format"], path, art_doc["robot"], art_doc.get("meta"),
                          tuple(art_doc.get("lineage", ())))
    return art, plan_doc
