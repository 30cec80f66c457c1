"""The command line: help, version, listings, a real thin build, and refusals that write nothing."""

from __future__ import annotations

import importlib.util
import json

import pytest
import typer
from typer.testing import CliRunner

from xcompile import __version__
from xcompile.cli import app

runner = CliRunner()
HAVE_PASSES = all(importlib.util.find_spec(f"xcompile.passes.{m}") is not None
                  for m in ("pin_embodiment", "export_onnx", "quantize"))


def _out(res) -> str:
    """stdout and stderr with rich's line wrapping undone."""
    return " ".join((res.output + (getattr(res, "stderr", "") or "")).split())


def test_help_and_version():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "build" in res.output and "passes" in res.output
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output


def test_build_help_states_the_default_plan():
    from xcompile.passes import DEFAULT_PLAN

    res = runner.invoke(app, ["build", "--help"], env={"COLUMNS": "200"})
    assert ", ".join(DEFAULT_PLAN) in " ".join(res.output.replace("│", " ").split())


def test_every_command_has_an_example():
    commands = typer.main.get_command(app).commands
    assert {"build", "passes", "report", "targets", "inspect", "eval", "convert"} <= set(commands)
    for name in commands:
        res = runner.invoke(app, [name, "--help"])
        assert res.exit_code == 0, name
        assert "Example" in res.output, f"`xcompile {name} --help` shows no example"


def test_targets_json():
    res = runner.invoke(app, ["targets", "--json"])
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert "spot" in {r["name"] for r in doc["robots"]}
    assert "cpu" in {h["name"] for h in doc["hardware"]}


def test_passes_lists_registry_with_options():
    res = runner.invoke(app, ["passes", "--json"])
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    from xcompile.passes.base import all_passes

    assert {p["name"] for p in doc["passes"]} == set(all_passes())
    assert doc["default_plan"][0] == "pin-embodiment"
    for p in doc["passes"]:
        assert {"summary", "input_format", "output_format", "version", "options"} <= set(p)
        for o in p["options"]:
            assert set(o) == {"name", "type", "default", "description"}
    if HAVE_PASSES:
        q = next(p for p in doc["passes"] if p["name"] == "quantize")
        prec = next(o for o in q["options"] if o["name"] == "precision")
        assert prec["default"] == "int8" and "int8" in prec["type"]
    res = runner.invoke(app, ["passes"])
    assert res.exit_code == 0 and "pin-embodiment" in res.output


@pytest.mark.parametrize("args, message", [
    (["--target", "no_such_robot"], "unknown robot target 'no_such_robot'"),
    (["--target", "a1", "--passes", "pin-embodiment,frobnicate"], "unknown pass 'frobnicate'"),
    (["--target", "a1", "--passes", "export-onnx,pin-embodiment"],
     "export-onnx takes torch but the build starts from a fat-checkpoint"),
    (["--target", "a1", "--passes", "pin-embodiment,quantize"],
     "quantize takes onnx but gets torch here: put export-onnx before it"),
    (["--target", "a1", "--passes", "pin-embodiment", "--int8"], "--int8 needs the quantize"),
    (["--target", "a1", "--int8", "--fp16"], "choose one precision"),
    (["--target", "a1", "--hardware", "toaster"], "unknown hardware target 'toaster'"),
])
def test_build_refusals_write_nothing(tiny_fat_ckpt, tmp_path, args, message):
    out, cache = tmp_path / "out", tmp_path / "cache"
    res = runner.invoke(app, ["build", tiny_fat_ckpt, *args, "--out", str(out),
                              "--cache-dir", str(cache)])
    assert res.exit_code == 2, _out(res)
    assert message in _out(res)
    assert "Traceback" not in _out(res)
    assert not out.exists() and not cache.exists()


def test_build_missing_file_and_bad_config(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    common = ["--target", "a1", "--out", str(out), "--cache-dir", str(cache)]
    res = runner.invoke(app, ["build", str(tmp_path / "missing.pt"), *common])
    assert res.exit_code == 2 and "does not exist" in _out(res)
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"x")
    cfg = tmp_path / "build.toml"
    cfg.write_text('passes = ["pin-embodiment"]\nsede = 3\n')
    res = runner.invoke(app, ["build", str(ckpt), *common, "--config", str(cfg)])
    assert res.exit_code == 2 and "unknown key 'sede'" in _out(res)
    if HAVE_PASSES:
        cfg.write_text('[pass.quantize]\nprecision = "int3"\n')
        res = runner.invoke(app, ["build", str(ckpt), *common, "--config", str(cfg),
                                  "--passes", "pin-embodiment,export-onnx,quantize"])
        assert res.exit_code == 2 and "quantize.precision" in _out(res)
    assert not out.exists() and not cache.exists()


def test_report_of_a_missing_build(tmp_path):
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "report.json" in _out(res)


@pytest.mark.skipif(not HAVE_PASSES, reason="xcompile.passes.pin_embodiment/export_onnx/quantize "
                                            "are not written yet")
def test_thin_build_end_to_end(tiny_fat_ckpt, short_toml, tmp_path):
    out, cache = tmp_path / "build" / "a1", tmp_path / "cache"
    cfg = tmp_path / "build.toml"
    # Light checks keep the test in seconds; the passes' own tests cover their defaults.
    cfg.write_text('profile = "fast"\n[pass.pin-embodiment]\nn_check_obs = 256\n'
                   'check_episodes = 0\n[pass.quantize]\ncalibration_episodes = 1\n')
    args = ["build", tiny_fat_ckpt, "--target", short_toml["a1"], "--passes",
            "pin-embodiment,export-onnx,quantize", "--episodes", "2", "--config", str(cfg),
            "--out", str(out), "--cache-dir", str(cache), "--max-size-kb", "1000"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, _out(res)
    for f in ("policy.onnx", "report.json", "report.md", "stages.png", "rollout.gif",
              "manifest.json"):
        assert (out / f).is_file(), f
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["fat", "pin-embodiment", "export-onnx",
                                                     "quantize"]
    assert report["plan"][2]["config"]["precision"] == "int8"
    assert report["plan"][0]["config"]["n_check_obs"] == 256
    q = report["stages"][-1]
    assert q["bytes"] < report["stages"][2]["bytes"]          # int8 is smaller than fp32
    assert report["gates"][0]["passed"]
    assert "quantize" in res.output and "p50" in res.output

    # Second run: every pass comes from the cache; a gate the policy cannot meet exits 4.
    res = runner.invoke(app, [*args, "--json", "--max-latency-us", "0.001"])
    assert res.exit_code == 4, _out(res)
    doc = json.loads(res.stdout)
    assert [s["cached"] for s in doc["stages"][1:]] == [True, True, True]
    assert "max_latency_us" in _out(res)

    res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 0 and "quantize" in res.output and "floor" in res.output
