"""The run loop: each pass of a plan on the artifact before it, cached, checked and measured.

`run_plan` measures the input, then for each pass: loads its cache entry or runs it in a fresh
work folder (`run` → `check` → commit to the cache), and measures its artifact. What a pass did
travels back in its `PassResult` (artifact, summary, files to ship) and its checks; the manager
reads neither. Instrumentation (progress lines, timing) goes through `BuildHooks`; the manager
prints nothing. A pass that lacks its tool (`ToolUnavailable`) is skipped unless it was required
or a later pass needs its output. A failing pass leaves a reproducer (its input artifact + the
rest of the plan) when the caller says where, and raises `PassError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xcompile.artifact import Artifact
from xcompile.errors import PlanError, ToolUnavailable, XCompileError
from xcompile.frontends.graph import is_recurrent
from xcompile.frontends.measure import measure_any
from xcompile.manager.cache import (
    Measure,
    cache_key,
    commit_entry,
    load_entry,
    measure_cached,
    prepare_cache,
    target_fingerprint,
)
from xcompile.manager.plan import FAT_FORMATS, validate_plan
from xcompile.manager.reproducer import write_reproducer
from xcompile.manager.settings import LATENCY_N_BY_PROFILE, PROFILES, PlanStep
from xcompile.outdir import is_storage_error, remove_tree, storage_error, temp_dir
from xcompile.passes.base import BuildContext, PassResult, get_pass
from xcompile.targets import HardwareTarget, RobotTarget


class BuildHooks:
    """Instrumentation callbacks; subclass and override what you need. Stage "fat" is the input."""

    def before_pass(self, name: str, index: int, total: int) -> None: ...

    def progress(self, name: str, desc: str, frac: float) -> None: ...

    def after_pass(self, record: StageRecord) -> None: ...

    def on_failure(self, name: str, error: BaseException, reproducer: Path | None) -> None: ...


@dataclass
class StageRecord:
    """One stage: the input ("fat") or one pass's output, with what the report needs of it."""

    name: str
    format: str | None = None
    wall_s: float = 0.0
    cached: bool = False
    skipped: bool = False
    skip_reason: str | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    measurements: dict[str, Any] = field(default_factory=dict)
    artifact: Artifact | None = None
    summary: dict[str, Any] = field(default_factory=dict)   # the pass's own account of its run
    files: tuple[str, ...] = ()                               # beside the artifact, to ship
    cache_key: str | None = None


@dataclass
class RunResult:
    stages: list[StageRecord]
    final: Artifact
    notes: list[str]                  # what the manager noticed (discarded cache entries)


class PassError(XCompileError):
    """A pass failed; the message names the pass and the reproducer folder."""

    def __init__(self, message: str, pass_name: str, reproducer: Path | None, exit_code: int):
        super().__init__(message)
        self.pass_name = pass_name
        self.reproducer = reproducer
        self.exit_code = exit_code


def run_plan(inp: Artifact, robot: RobotTarget, hw: HardwareTarget, plan: Sequence[PlanStep], *,
             cache_dir: Path, use_cache: bool = True, seed: int = 0, profile: str = "default",
             episodes: int = 10, hooks: Sequence[BuildHooks] = (),
             required: Collection[str] = (), measure: Measure | None = None,
             reproducer: Path | None = None) -> RunResult:
    """Run `plan` on `inp` for one robot.

    `measure(artifact, robot, episodes=, seed=, latency_n=) -> dict` defaults to
    `xcompile.frontends.measure.measure_any` (`xcompile.measure.measure_artifact`, and the row
    of a foreign fat graph). `required`: passes that may not be skipped for a missing
    tool. Raises PlanError before running anything when the plan cannot run; PassError when a
    pass fails (with a reproducer folder at `reproducer`, when given, for a failure that is not
    the machine's).
    """
    validate_plan(list(plan), input_format=inp.format)
    if profile not in PROFILES:
        raise PlanError(f"unknown profile '{profile}': choose one of {', '.join(PROFILES)}")
    measure = measure or measure_any
    cache_dir = Path(cache_dir)
    prepare_cache(cache_dir)
    fingerprint = target_fingerprint(robot, hw)
    fire = _Fire(hooks)
    notes: list[str] = []
    latency_n = LATENCY_N_BY_PROFILE[profile]

    def measured(art: Artifact) -> dict[str, Any]:
        return measure_cached(measure, art, robot, hw, episodes, seed, latency_n, cache_dir,
                              use_cache, notes)

    first_name = "fat" if inp.format in FAT_FORMATS else "input"
    fire.before_pass(first_name, 0, len(plan) + 1)
    t0 = time.perf_counter()
    first = StageRecord(first_name, inp.format, artifact=inp)
    first.measurements = measured(inp)
    first.wall_s = time.perf_counter() - t0
    records = [first]
    fire.after_pass(first)

    history: list[str] = []
    current = inp
    for i, step in enumerate(plan):
        fire.before_pass(step.name, i + 1, len(plan) + 1)
        rec = StageRecord(step.name)
        t0 = time.perf_counter()
        key = cache_key(current, step, fingerprint, seed, profile)
        loaded = load_entry(cache_dir / key, notes) if use_cache else None
        if loaded is None:
            def context(workdir: Path, _n: str = step.name) -> BuildContext:
                return BuildContext(
                    robot=robot, hardware=hw, workdir=workdir, seed=seed, profile=profile,
                    source_sha256=inp.sha256, history=list(history),
                    progress=lambda desc, frac: fire.progress(_n, desc, frac))
            try:
                loaded = _run_pass(step, current, context, cache_dir, key)
            except ToolUnavailable as e:
                later_ok = all(current.format in get_pass(s.name).takes()
                               for s in plan[i + 1:i + 2])
                if step.name in required or not later_ok:
                    # No reproducer: the input is fine, the machine lacks the tool.
                    fire.on_failure(step.name, e, None)
                    why = ("it was required" if step.name in required else
                           f"{plan[i + 1].name} needs its output")
                    raise PassError(f"pass '{step.name}' cannot run here and {why}: {e}",
                                    step.name, None, e.exit_code) from e
                rec.skipped, rec.skip_reason = True, str(e)
                rec.wall_s = time.perf_counter() - t0
                records.append(rec)
                fire.after_pass(rec)
                continue
            except Exception as e:
                if is_storage_error(e):     # the disk, not the pass: no reproducer to write
                    fire.on_failure(step.name, e, None)
                    raise storage_error(e, f"pass '{step.name}''s work in the cache "
                                           f"{cache_dir}") from None
                repro = (write_reproducer(reproducer, e, step, plan[i:], current, robot, hw,
                                          seed, profile) if reproducer is not None else None)
                fire.on_failure(step.name, e, repro)
                where = f"\nreproducer: {repro} (see {repro / 'README.md'})" if repro else ""
                if isinstance(e, XCompileError):
                    raise PassError(f"pass '{step.name}' failed: {e}{where}", step.name, repro,
                                    e.exit_code) from e
                # A bug, not a user error: keep its traceback, but say where the reproducer is.
                e.add_note(f"xcompile: pass '{step.name}' crashed{where}")
                raise
        else:
            rec.cached = True
        result, checks = loaded
        out = result.artifact
        rec.format, rec.artifact, rec.checks, rec.cache_key = out.format, out, checks, key
        rec.summary, rec.files = dict(result.summary), tuple(result.files)
        rec.measurements = measured(out)
        rec.wall_s = time.perf_counter() - t0
        records.append(rec)
        fire.after_pass(rec)
        history.append(step.name)
        current = out
    return RunResult(records, current, notes)


def _run_pass(step: PlanStep, inp: Artifact, context: Callable[[Path], BuildContext],
              cache_dir: Path, key: str) -> tuple[PassResult, dict[str, Any]]:
    """Run one pass in a fresh work folder, check it, and commit it to the cache."""
    try:
        workdir = temp_dir(cache_dir / "tmp", step.name)
    except OSError as e:
        raise storage_error(e, f"in the cache {cache_dir}") from None
    try:
        ctx = context(workdir)
        p = step.pass_cls()
        if p.refuses_recurrent and is_recurrent(inp):     # made recurrent by an earlier pass
            raise PlanError(p.refuses_recurrent)
        result = p.run(inp, step.config, ctx)
        _check_result(step, result, workdir, inp.format)
        checks = dict(p.check(inp, result, step.config, ctx) or {})
        return commit_entry(workdir, cache_dir / key, result, checks), checks
    except BaseException:       # a failure, Ctrl-C or SIGTERM: leave no partial work
        remove_tree(workdir)
        raise


class _Fire:
    def __init__(self, hooks: Sequence[BuildHooks]):
        self.hooks = list(hooks)

    def __getattr__(self, name: str) -> Callable[..., None]:
        def call(*args: Any) -> None:
            for h in self.hooks:
                getattr(h, name)(*args)
        return call


def _check_result(step: PlanStep, result: Any, workdir: Path, fmt: str) -> None:
    cls = step.pass_cls
    if not isinstance(result, PassResult) or result.artifact.format != cls.output_for(fmt):
        raise RuntimeError(f"pass {step.name} returned {result!r}, not a PassResult with a "
                           f"{cls.output_for(fmt)} artifact")
    for path in (result.artifact.path, *(result.artifact.path.parent / f for f in result.files)):
        if not path.resolve().is_relative_to(workdir.resolve()):
            raise RuntimeError(f"pass {step.name} wrote {path} outside its workdir {workdir}")
