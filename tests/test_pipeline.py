"""The pass manager's plumbing, with fake passes registered under test-only names (t-*).

The fakes write tiny files, count their runs and are removed from the registry afterwards, so these
tests check plan validation, settings precedence, caching, reproducers and output swapping without
torch, onnxruntime or PyBullet doing any work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from xcompile.artifact import Artifact
from xcompile.build import run_build
from xcompile.errors import CheckpointError, GateError, PassCheckError, PlanError, ToolUnavailable
from xcompile.manager import settings as settings_mod
from xcompile.manager.plan import validate_plan
from xcompile.manager.reproducer import load_reproducer
from xcompile.manager.run import BuildHooks, PassError
from xcompile.manager.settings import (
    PlanStep,
    file_layer,
    make_config,
    parse_plan,
    read_build_file,
    resolve_settings,
)
from xcompile.passes import DEFAULT_PLAN
from xcompile.passes.base import REGISTRY, Pass, PassConfig, PassResult, all_passes, register_pass
from xcompile.passes.quantize import Quantize
from xcompile.report import Gates

RUNS: dict[str, int] = {}


class _Fake(Pass):
    """Writes input bytes + name + config to `out.bin` (a deterministic function of its inputs)."""

    ext = ".bin"

    def run(self, art: Artifact, cfg: PassConfig, ctx) -> PassResult:
        RUNS[self.name] = RUNS.get(self.name, 0) + 1
        ctx.progress("working", 0.5)
        out = ctx.workdir / f"out{self.ext}"
        out.write_bytes(art.path.read_bytes() + f"|{self.name}:{cfg.model_dump_json()}".encode())
        return PassResult(Artifact.create(self.output_format, out, art.robot,
                                          lineage=(*art.lineage, self.name)),
                          {"wrote": out.name})

    def check(self, inp, result, cfg, ctx):
        assert result.summary == {"wrote": result.artifact.path.name}   # travels with the result
        return {"grew_bytes": result.artifact.n_bytes - inp.n_bytes}


class QuantCfg(PassConfig):
    precision: Literal["int8", "fp16"] = Field("int8", description="target precision")
    samples: int = Field(16, ge=1, description="calibration samples")


FAKES: list[type[Pass]] = [
    type("TPin", (_Fake,), {"name": "t-pin", "input_format": "fat-checkpoint",
                            "output_format": "torch", "ext": ".pt"}),
    type("TTune", (_Fake,), {"name": "t-tune", "input_format": "torch",
                             "output_format": "torch", "ext": ".pt"}),
    type("TDistill", (_Fake,), {"name": "t-distill", "input_format": "torch",
                                "output_format": "torch", "ext": ".pt"}),
    type("TExport", (_Fake,), {"name": "t-export", "input_format": "torch",
                               "output_format": "onnx", "ext": ".onnx"}),
    type("TQuant", (_Fake,), {"name": "t-quant", "input_format": "onnx", "output_format": "onnx",
                              "Config": QuantCfg, "ext": ".onnx"}),
]


class TTrt(_Fake):
    name = "t-trt"
    input_format = "onnx"
    output_format = "tensorrt"

    def run(self, art, cfg, ctx):
        raise ToolUnavailable("TensorRT is not installed (pip install xcompile[tensorrt])")


class TFail(_Fake):
    name = "t-fail"
    input_format = "onnx"
    output_format = "onnx"

    def run(self, art, cfg, ctx):
        (ctx.workdir / "half-written").write_text("x")
        raise PassCheckError("action error 0.9 > 0.1")


class TBug(_Fake):
    name = "t-bug"
    input_format = "onnx"
    output_format = "onnx"

    def run(self, art, cfg, ctx):
        raise ZeroDivisionError("a bug in the pass")


@pytest.fixture(autouse=True)
def fakes():
    all_passes()                              # load the built-in passes first
    added = []
    for cls in [*FAKES, TTrt, TFail, TBug]:
        register_pass(cls)
        added.append(cls.name)
    RUNS.clear()
    yield
    for n in added:
        REGISTRY.pop(n, None)


def fake_measure(art, robot, episodes, seed, latency_n=2000):
    scores = {"fat-checkpoint": 0.8, "torch": 0.8, "onnx": 0.7, "tensorrt": 0.7}
    return {"format": art.format, "params": 10, "bytes": art.n_bytes, "macs": 100,
            "latency_p50_us": 20.0, "latency_p99_us": 30.0, "runtime": "fake",
            "score": scores[art.format], "score_std": 0.0, "episodes": episodes}


def plan_of(*names, **options):
    return [PlanStep(n, make_config(n, options.get(n.replace("-", "_"))))
            for n in names]


@pytest.fixture
def fat(tmp_path) -> Path:
    p = tmp_path / "fat.pt"
    p.write_bytes(b"fat checkpoint bytes")
    return p


def build(fat, tmp_path, plan, **kw):
    kw.setdefault("measure", fake_measure)
    kw.setdefault("runtime_floor", lambda: 11.0)
    kw.setdefault("rollout", False)
    return run_build(fat, "a1", None, plan, tmp_path / "out" / "a1", tmp_path / "cache", **kw)


# ---------------------------------------------------------------------------------------------
# plans


def test_parse_plan():
    assert parse_plan("t-pin, t-export,t-quant") == ["t-pin", "t-export", "t-quant"]
    with pytest.raises(PlanError, match="separated by commas"):
        parse_plan("t-pin,,t-quant")


def test_default_plan_is_one_constant():
    assert DEFAULT_PLAN == ["pin-embodiment", "rl-finetune", "distill", "export-onnx",
                            "quantize", "build-tensorrt"]
    assert settings_mod.DEFAULTS["passes"] == DEFAULT_PLAN


def test_unknown_pass_lists_known_ones():
    with pytest.raises(PlanError) as e:
        validate_plan(["t-pin", "t-exprt"])
    msg = str(e.value)
    assert "unknown pass 't-exprt'" in msg and "Did you mean 't-export'" in msg
    assert "t-quant" in msg and "xcompile passes" in msg


def test_wrong_order_says_what_to_move():
    with pytest.raises(PlanError, match="t-quant takes onnx but gets torch here: move t-export "
                                        "before t-quant"):
        validate_plan(["t-pin", "t-quant", "t-export"])


def test_missing_pass_says_what_to_add():
    with pytest.raises(PlanError, match=r"takes onnx but gets torch here: put (t-)?export(-onnx)? "
                                        "before it"):
        validate_plan(["t-pin", "t-quant"])


def test_first_pass_must_take_the_input():
    with pytest.raises(PlanError, match="t-export takes torch but the build starts from a "
                                        "fat-checkpoint"):
        validate_plan(["t-export"])


def test_duplicates_and_empty():
    with pytest.raises(PlanError, match="appears twice"):
        validate_plan(["t-pin", "t-tune", "t-tune"])
    with pytest.raises(PlanError, match="empty"):
        validate_plan([])
    # torch -> torch passes slot in between pin and export without any change to the manager
    validate_plan(["t-pin", "t-tune", "t-distill", "t-export", "t-quant", "t-trt"])


def test_plan_from_another_input_format():
    validate_plan(["t-quant", "t-trt"], input_format="onnx")


# ---------------------------------------------------------------------------------------------
# settings


DEFAULTS = {"passes": ["t-pin", "t-export", "t-quant"], "seed": 0, "profile": "default",
            "options": {"t-quant": {"samples": 8}}}


def test_precedence_defaults_file_cli():
    s = resolve_settings(DEFAULTS, {}, {})
    assert s.pass_names == ["t-pin", "t-export", "t-quant"] and s.seed == 0
    assert s.plan[2].config.samples == 8 and s.episodes == 10

    f = file_layer({"seed": 3, "profile": "fast", "pass": {"t-quant": {"precision": "fp16"}}})
    s = resolve_settings(DEFAULTS, f, {})
    assert (s.seed, s.profile, s.episodes) == (3, "fast", 3)
    assert s.plan[2].config.precision == "fp16" and s.plan[2].config.samples == 8
    assert s.sources["t-quant.precision"] == "file" and s.sources["t-quant.samples"] == "default"

    cli = {"seed": 7, "profile": None, "episodes": 2, "passes": None,
           "options": {"t-quant": {"samples": 99}}}
    s = resolve_settings(DEFAULTS, f, cli)
    assert (s.seed, s.profile, s.episodes) == (7, "fast", 2)
    assert s.plan[2].config.precision == "fp16" and s.plan[2].config.samples == 99

    s = resolve_settings(DEFAULTS, file_layer({"passes": ["t-pin", "t-export"]}),
                         {"passes": ["t-pin"]})
    assert s.pass_names == ["t-pin"]


def test_precision_flags(monkeypatch):
    # The flags set the pass that declares a precision option, whatever its name.
    monkeypatch.setattr(Quantize, "precision_option", None)
    monkeypatch.setattr(REGISTRY["t-quant"], "precision_option", "precision")
    s = resolve_settings(DEFAULTS, {}, {"precision": "fp16"})
    assert s.plan[2].config.precision == "fp16"
    # --fp32 drops quantize from a default plan, refuses to fight an explicit one
    assert resolve_settings(DEFAULTS, {}, {"precision": "fp32"}).pass_names == ["t-pin",
                                                                                "t-export"]
    with pytest.raises(PlanError, match="--fp32"):
        resolve_settings(DEFAULTS, {}, {"precision": "fp32", "passes": ["t-pin", "t-export",
                                                                        "t-quant"]})
    with pytest.raises(PlanError, match="--int8 needs the t-quant pass"):
        resolve_settings(DEFAULTS, {}, {"precision": "int8", "passes": ["t-pin"]})


def test_file_errors_name_the_key(tmp_path):
    with pytest.raises(PlanError, match="unknown key 'sede'"):
        file_layer({"sede": 1})
    with pytest.raises(PlanError, match="unknown key 'pass.t-qaunt'"):
        file_layer({"pass": {"t-qaunt": {"samples": 1}}})
    with pytest.raises(PlanError, match=r"\[pass.<name>\]"):
        file_layer({"passes": {"t-quant": {"samples": 1}}})
    with pytest.raises(PlanError, match="'seed' must be int"):
        file_layer({"seed": "zero"})
    bad = tmp_path / "b.toml"
    bad.write_text("passes = [\n")
    with pytest.raises(PlanError, match="not valid TOML"):
        read_build_file(bad)
    with pytest.raises(PlanError, match="does not exist"):
        read_build_file(tmp_path / "missing.toml")
    good = tmp_path / "g.toml"
    good.write_text('passes = ["t-pin", "t-export"]\nseed = 4\n[pass.t-quant]\nsamples = 3\n')
    assert read_build_file(good) == {"passes": ["t-pin", "t-export"], "seed": 4,
                                              "options": {"t-quant": {"samples": 3}}}


def test_option_errors_name_pass_and_field():
    with pytest.raises(PlanError) as e:
        resolve_settings(DEFAULTS, file_layer({"pass": {"t-quant": {"precision": "int4"}}}), {})
    assert "t-quant.precision" in str(e.value)
    with pytest.raises(PlanError, match=r"t-quant\.colour"):
        resolve_settings(DEFAULTS, {"options": {"t-quant": {"colour": 1}}}, {})
    with pytest.raises(PlanError, match="unknown profile"):
        resolve_settings(DEFAULTS, {"profile": "quick"}, {})


# ---------------------------------------------------------------------------------------------
# running


class Recorder(BuildHooks):
    def __init__(self):
        self.events = []

    def before_pass(self, name, index, total):
        self.events.append(("before", name))

    def progress(self, name, desc, frac):
        self.events.append(("progress", name, desc))

    def after_pass(self, rec):
        self.events.append(("after", rec.name, rec.cached, rec.skipped))


def test_build_writes_outputs_and_hooks_see_every_stage(fat, tmp_path):
    rec = Recorder()
    res = build(fat, tmp_path, plan_of("t-pin", "t-export", "t-quant"), hooks=[rec])
    out = tmp_path / "out" / "a1"
    assert res.out_dir == out
    assert {p.name for p in out.iterdir()} == {"policy.onnx", "report.json", "report.md",
                                               "stages.png", "manifest.json"}
    assert (out / "policy.onnx").read_bytes() == res.final.path.read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["fat", "t-pin", "t-export", "t-quant"]
    for key in ("xcompile_version", "robot", "hardware", "plan", "stages", "runtime_floor_us",
                "gates", "final"):
        assert key in report
    stage = report["stages"][1]
    assert set(pipeline_stage_keys()) <= set(stage)
    assert stage["checks"]["grew_bytes"] > 0 and stage["cached"] is False
    assert report["plan"][2]["config"] == {"precision": "int8", "samples": 16}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["checkpoint"]["sha256"] == res.stages[0].artifact.sha256
    assert set(manifest["outputs"]) == {"policy.onnx", "report.json", "report.md", "stages.png"}
    assert "onnxruntime" in manifest["versions"] and manifest["seed"] == 0
    assert ("before", "fat") in rec.events and ("after", "t-quant", False, False) in rec.events
    assert ("progress", "t-export", "working") in rec.events
    # no temporary folders left beside the output or in the cache
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a1"]
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def pipeline_stage_keys():
    from xcompile.report import STAGE_KEYS

    return STAGE_KEYS


def test_second_run_is_cached_and_only_the_changed_pass_reruns(fat, tmp_path):
    first = build(fat, tmp_path, plan_of("t-pin", "t-export", "t-quant"))
    assert RUNS == {"t-pin": 1, "t-export": 1, "t-quant": 1}
    second = build(fat, tmp_path, plan_of("t-pin", "t-export", "t-quant"))
    assert RUNS == {"t-pin": 1, "t-export": 1, "t-quant": 1}
    assert [s.cached for s in second.stages[1:]] == [True, True, True]
    assert second.final.id == first.final.id
    assert [s["cached"] for s in second.report["stages"][1:]] == [True, True, True]

    third = build(fat, tmp_path, plan_of("t-pin", "t-export", "t-quant",
                                         t_quant={"precision": "fp16"}))
    assert RUNS == {"t-pin": 1, "t-export": 1, "t-quant": 2}
    assert [s.cached for s in third.stages[1:]] == [True, True, False]

    build(fat, tmp_path, plan_of("t-pin", "t-export", "t-quant"), use_cache=False)
    assert RUNS == {"t-pin": 2, "t-export": 2, "t-quant": 3}

    # a different seed is a different build
    build(fat, tmp_path, plan_of("t-pin", "t-export", "t-quant"), seed=1)
    assert RUNS == {"t-pin": 3, "t-export": 3, "t-quant": 4}


def test_a_valid_entry_is_never_replaced_under_a_reader(fat, tmp_path):
    """Another build of the same key (here: --no-cache) runs the pass but keeps the committed
    entry: a build that is still reading its artifact never sees it vanish or change."""
    first = build(fat, tmp_path, plan_of("t-pin", "t-export"))
    art = first.stages[-1].artifact.path
    inode = art.stat().st_ino
    again = build(fat, tmp_path, plan_of("t-pin", "t-export"), use_cache=False)
    assert RUNS["t-export"] == 2                          # it ran ...
    assert art.stat().st_ino == inode                     # ... and the entry stayed as it was
    assert again.final.id == first.final.id
    assert not list((tmp_path / "cache" / "tmp").iterdir())   # its own work was cleaned up


def test_damaged_cache_entry_runs_again(fat, tmp_path):
    res = build(fat, tmp_path, plan_of("t-pin", "t-export"))
    res.stages[1].artifact.path.write_bytes(b"corrupted")
    again = build(fat, tmp_path, plan_of("t-pin", "t-export"))
    assert RUNS["t-pin"] == 2 and not again.stages[1].cached


def test_cache_entry_layout(fat, tmp_path):
    res = build(fat, tmp_path, plan_of("t-pin"))
    entry = tmp_path / "cache" / res.stages[1].cache_key
    doc = json.loads((entry / "result.json").read_text())
    assert doc["checks"]["grew_bytes"] > 0 and doc["summary"] == {"wrote": "out.pt"}
    assert doc["artifact"]["path"] == "out.pt" and "hmac_sha256" in doc
    assert res.final.path.parent == entry
    # a torch final stage is copied under its own suffix
    assert (tmp_path / "out" / "a1" / "policy.pt").is_file()


def test_failure_writes_reproducer_and_no_output(fat, tmp_path):
    with pytest.raises(PassError) as e:
        build(fat, tmp_path, plan_of("t-pin", "t-export", "t-fail", "t-trt"))
    err = e.value
    repro = tmp_path / "out" / "a1.repro"
    assert err.pass_name == "t-fail" and err.reproducer == repro
    assert "t-fail" in str(err) and str(repro) in str(err) and "action error 0.9" in str(err)
    assert err.exit_code == PassCheckError.exit_code
    assert not (tmp_path / "out" / "a1").exists()
    plan = json.loads((repro / "plan.json").read_text())
    assert [p["name"] for p in plan["plan"]] == ["t-fail", "t-trt"]
    assert plan["failed_pass"] == "t-fail" and plan["robot"] == "a1"
    assert (repro / "input" / "out.onnx").is_file()
    readme = (repro / "README.md").read_text()
    assert f"xcompile build {repro}" in readme and "--config" in readme
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []      # failed workdir removed

    # the reproducer's input and plan run again from where the build stopped
    art, doc = load_reproducer(repro)
    assert art.format == "onnx"
    settings = resolve_settings(None, read_build_file(repro / "build.toml"), {},
                                input_format=art.format)
    assert settings.pass_names == ["t-fail", "t-trt"]


def test_failure_keeps_the_previous_output(fat, tmp_path):
    build(fat, tmp_path, plan_of("t-pin", "t-export"))
    before = (tmp_path / "out" / "a1" / "report.json").read_text()
    with pytest.raises(PassError):
        build(fat, tmp_path, plan_of("t-pin", "t-export", "t-fail"))
    assert (tmp_path / "out" / "a1" / "report.json").read_text() == before


def test_a_bug_keeps_its_traceback_type(fat, tmp_path):
    with pytest.raises(ZeroDivisionError) as e:
        build(fat, tmp_path, plan_of("t-pin", "t-export", "t-bug"))
    assert any("a1.repro" in n for n in getattr(e.value, "__notes__", []))
    assert not (tmp_path / "out" / "a1").exists()


def test_tool_unavailable_skips_unless_required(fat, tmp_path):
    res = build(fat, tmp_path, plan_of("t-pin", "t-export", "t-trt"))
    trt = res.report["stages"][-1]
    assert trt["name"] == "t-trt" and trt["skipped"] and "TensorRT" in trt["skip_reason"]
    assert res.report["final"]["name"] == "t-export" and res.final.format == "onnx"
    assert any("t-trt skipped" in n for n in res.report["notes"])
    assert not (tmp_path / "out" / "a1" / "policy.plan").exists()

    with pytest.raises(PassError, match="t-trt.*required.*TensorRT is not installed") as e:
        build(fat, tmp_path / "2", plan_of("t-pin", "t-export", "t-trt"), required=("t-trt",))
    assert e.value.reproducer is None and e.value.exit_code == ToolUnavailable.exit_code
    assert not (tmp_path / "2" / "out").exists()


def test_gates(fat, tmp_path):
    res = build(fat, tmp_path, plan_of("t-pin", "t-export", "t-quant"),
                gates=Gates(max_latency_us=50, max_size_kb=100, min_score_ratio=0.9))
    gates = {g["name"]: g for g in res.report["gates"]}
    assert gates["max_latency_us"]["passed"] and gates["max_size_kb"]["passed"]
    assert not gates["min_score_ratio"]["passed"]
    assert gates["min_score_ratio"]["value"] == pytest.approx(0.7 / 0.8)
    assert (tmp_path / "out" / "a1" / "report.json").is_file()   # written before the gate bites
    with pytest.raises(GateError, match="score ratio") as e:
        res.raise_for_gates()
    assert e.value.exit_code == 4


def test_missing_checkpoint_and_bad_plan_write_nothing(fat, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        build(tmp_path / "nope.pt", tmp_path, plan_of("t-pin"))
    with pytest.raises(PlanError, match="t-export takes torch"):
        build(fat, tmp_path, [PlanStep("t-export", PassConfig())])
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_paired_score_ratios_and_intervals_reach_the_report(fat, tmp_path):
    """Stages scored on the same episodes are compared episode by episode: the report carries
    final / each earlier stage with a bootstrap interval, in report.json, report.md and a note."""
    per_episode = {"fat-checkpoint": [1.0, 0.8, 0.6, 1.0], "torch": [1.0, 0.8, 0.6, 1.0],
                   "onnx": [0.9, 0.8, 0.5, 1.0]}

    def measure(art, robot, episodes, seed, latency_n=2000):
        row = fake_measure(art, robot, episodes, seed, latency_n)
        scores = per_episode[art.format]
        return {**row, "score": sum(scores) / 4, "scores": scores, "score_ci95": [0.5, 1.0]}

    res = build(fat, tmp_path, plan_of("t-pin", "t-export"), measure=measure)
    ratios = {r["stage"]: r for r in res.report["score_ratios"]}
    assert set(ratios) == {"fat", "t-pin"} and ratios["fat"]["final"] == "t-export"
    r = ratios["t-pin"]
    assert r["ratio"] == pytest.approx(3.2 / 3.4, abs=1e-4) and r["episodes"] == 4
    assert r["ci95"][0] <= r["ratio"] <= r["ci95"][1] < 1.0 + 1e-9   # never better on any episode
    assert any("t-export / t-pin = 0.941" in n for n in res.report["notes"])
    md = (tmp_path / "out" / "a1" / "report.md").read_text()
    assert "Score ratios (paired" in md and "| t-export / fat | 0.941 |" in md
    assert res.report["stages"][1]["score_ci95"] == [0.5, 1.0]


def test_terminal_table_fits_80_columns():
    from rich.console import Console

    from xcompile.render import render_table

    big = {"name": "pin-embodiment", "format": "torch", "params": 4_623_368,
           "bytes": 18_537_765, "macs": 59_602_980, "latency_p50_us": 3723.6,
           "latency_p99_us": 6346.7, "runtime": "onnxruntime", "score": 0.95,
           "score_ci95": [0.912, 0.987], "wall_s": 155.6, "cached": True, "skipped": False}
    report = {"robot": "spot", "hardware": "cpu", "plan": [{"name": "pin-embodiment"}],
              "stages": [big, {**big, "name": "build-tensorrt", "skipped": True,
                               "cached": False}], "runtime_floor_us": 6.6}
    console = Console(width=80, record=True)
    console.print(render_table(report))
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert "4.62M" in text and "18.5M" in text and "0.91–0.99" in text and "cached" in text
