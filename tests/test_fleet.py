"""Fleet builds: several targets from one command, on any executor, with the same scores; a failing
target is reported while the others finish; the fleet folder obeys the output-folder rule; the
fleet file is validated field by field. The Ray test (marked `ray`) starts a local instance."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from xcompile.cli import app
from xcompile.errors import XCompileError
from xcompile.fleet import check_fleet_dir, parse_targets, read_fleet_file
from xcompile.outdir import OutputError

runner = CliRunner()
THIN = ["--passes", "pin-embodiment,export-onnx", "--episodes", "1", "--profile", "fast"]
BUILD_FILES = {"manifest.json", "policy.onnx", "report.json", "report.md", "stages.png",
               "rollout.gif"}


def _out(res) -> str:
    return " ".join((res.output + (getattr(res, "stderr", "") or "")).split())


@pytest.fixture(scope="module")
def light_config(tmp_path_factory) -> str:
    """Light pass checks keep a thin build in seconds (the passes' own tests cover defaults)."""
    cfg = tmp_path_factory.mktemp("cfg") / "build.toml"
    cfg.write_text("[pass.pin-embodiment]\nn_check_obs = 64\ncheck_episodes = 0\n"
                   "[pass.export-onnx]\nn_check_obs = 64\n")
    return str(cfg)


def _short_fleet(short_toml: dict[str, str]) -> str:
    """The `--target` list of a1 and panda with 3 s episodes."""
    return f"{short_toml['a1']},{short_toml['panda']}"


@pytest.fixture(scope="module")
def serial_fleet(tiny_fat_ckpt, short_toml, light_config, tmp_path_factory):
    """a1 and panda as TOML files with 3 s episodes (`short_toml`): each target's folder is
    still named after its robot."""
    base = tmp_path_factory.mktemp("fleet")
    args = ["build", tiny_fat_ckpt, "--target", _short_fleet(short_toml), *THIN, "--config",
            light_config, "--out", str(base / "fleet"), "--cache-dir", str(base / "cache")]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, _out(res)
    return json.loads(res.stdout), base / "fleet", args


def _by_target(doc) -> dict[str, tuple]:
    return {r["target"]: (r["scores"], r["score_ci95"], r["bytes"]) for r in doc["targets"]}


def test_a_serial_fleet_writes_one_build_folder_per_target_and_a_report(serial_fleet):
    doc, out, args = serial_fleet
    assert [r["robot"] for r in doc["targets"]] == ["a1", "panda"]
    assert doc["executor"] == "serial" and doc["built"] == 2 and doc["exit_code"] == 0
    assert all(r["ok"] and r["gates_passed"] and r["final"] == "export-onnx"
               for r in doc["targets"])
    assert sorted(p.name for p in out.iterdir()) == ["a1", "fleet.json", "panda", "report.json",
                                                     "report.md"]
    for name in ("a1", "panda"):
        assert {p.name for p in (out / name).iterdir()} == BUILD_FILES
        assert json.loads((out / name / "report.json").read_text())["robot"] == name
    assert json.loads((out / "report.json").read_text())["targets"] == doc["targets"]
    md = (out / "report.md").read_text()
    assert "| target | final | score [95% CI] | bytes | p50 µs | build s | gates |" in md
    assert json.loads((out / "fleet.json").read_text())["outputs"] == [
        "a1", "panda", "report.json", "report.md"]
    res = runner.invoke(app, ["report", str(out / "panda")])       # a normal build folder
    assert res.exit_code == 0, _out(res)

    # the same command again replaces the fleet it wrote; every pass comes from the cache
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, _out(res)
    again = json.loads(res.stdout)
    assert _by_target(again) == _by_target(doc)
    assert all(r["cached"] == ["pin-embodiment", "export-onnx"] for r in again["targets"])


def test_a_process_pool_fleet_from_a_fleet_file_has_the_same_scores(serial_fleet, tiny_fat_ckpt,
                                                                   short_toml, light_config,
                                                                   tmp_path):
    doc, _, _ = serial_fleet
    fleet = tmp_path / "fleet.toml"
    a1, panda = short_toml["a1"], short_toml["panda"]
    fleet.write_text(f'targets = ["{a1}", "{panda}"]\n[target."{a1}"]\nepisodes = 1\n'
                     'profile = "fast"\n')
    res = runner.invoke(app, ["build", tiny_fat_ckpt, "--fleet", str(fleet), *THIN, "--config",
                              light_config, "--out", str(tmp_path / "out"), "--cache-dir",
                              str(tmp_path / "cache"), "--executor", "process", "--workers", "2",
                              "--json"])
    assert res.exit_code == 0, _out(res)
    got = json.loads(res.stdout)
    assert got["executor"] == "process" and got["workers"] == 2
    assert _by_target(got) == _by_target(doc)          # a fresh cache: built and scored anew
    assert not any(r["cached"] for r in got["targets"])


def test_a_failing_target_is_reported_and_the_others_finish(light_config, tmp_path):
    from tests.conftest import TINY
    from xcompile.models.checkpoint import save_checkpoint
    from xcompile.models.descriptors import joint_descriptors
    from xcompile.models.fat import FatConfig, FatPolicy
    from xcompile.targets import load_robot

    torch.manual_seed(0)        # a fat policy that serves locomotion only: panda (reach) fails
    model = FatPolicy(FatConfig(**{**TINY.model_dump(), "global_dims": {"locomotion": 14}}))
    a1 = load_robot("a1")
    ckpt = tmp_path / "loco.pt"
    save_checkpoint(ckpt, model, [{"name": "a1", "family": "locomotion", "urdf": a1.urdf,
                                   "joints": list(a1.joints.names),
                                   "descriptors": joint_descriptors(a1).tolist()}])
    out = tmp_path / "fleet"
    res = runner.invoke(app, ["build", str(ckpt), "--target", "panda,nowhere/robot.toml,a1",
                              *THIN, "--config", light_config, "--out", str(out),
                              "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 2, _out(res)
    assert "2 of 3 targets failed (panda, nowhere/robot.toml)" in _out(res)
    doc = json.loads((out / "report.json").read_text())
    rows = {r["target"]: r for r in doc["targets"]}
    assert [r["target"] for r in doc["targets"]] == ["panda", "nowhere/robot.toml", "a1"]
    assert rows["a1"]["ok"] and (out / "a1" / "policy.onnx").is_file()
    assert "does not serve" in rows["panda"]["error"] and not (out / "panda").exists()
    assert "TargetError" in rows["nowhere/robot.toml"]["error"]
    assert "Traceback" not in _out(res)


def test_the_fleet_folder_is_replaced_only_when_xcompile_wrote_it(serial_fleet, tiny_fat_ckpt,
                                                                  tmp_path, monkeypatch):
    _, built, _ = serial_fleet
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    res = runner.invoke(app, ["build", tiny_fat_ckpt, "--target", "a1,panda", *THIN,
                              "--out", str(mine), "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 2 and "does not hold an xcompile fleet build" in _out(res)
    assert (mine / "notes.txt").read_text() == "keep me" and not (tmp_path / "cache").exists()
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    check_fleet_dir(copy)                                   # an earlier fleet: replaceable
    (copy / "extra.txt").write_text("x")
    with pytest.raises(OutputError, match=r"files it did not write \(extra.txt\)"):
        check_fleet_dir(copy)
    check_fleet_dir(copy, force=True)
    (copy / "extra.txt").unlink()
    (copy / "a1" / "mine.txt").write_text("x")              # inside a target's build folder
    with pytest.raises(OutputError, match="mine.txt"):
        check_fleet_dir(copy)
    with pytest.raises(OutputError, match="holds a single build, not a fleet"):
        check_fleet_dir(built / "panda")
    monkeypatch.chdir(copy)
    with pytest.raises(OutputError, match="current folder"):
        check_fleet_dir(Path("."))


@pytest.mark.parametrize("text, message", [
    ('targets = ["a1"]\n[target.a1]\nepisdes = 3\n', "target.a1: unknown key 'episdes'"),
    ('targets = ["a1"]\n[target.a1]\nepisodes = 0\n', "target.a1.episodes: must be an integer"),
    ('targets = ["a1"]\n[target.a1]\nprofile = "slow"\n', "target.a1.profile: choose one of"),
    ('targets = ["a1"]\n[target.spot]\nseed = 1\n', "target.spot: 'spot' is not in targets"),
    ('targets = []\n', "targets: give a non-empty list"),
    ('targets = ["a1", "a1"]\n', "'a1' is listed more than once"),
    ('target = ["a1"]\n', "targets: give a non-empty list"),
    ('robots = ["a1"]\n', "unknown key 'robots'"),
    ('targets = [\n', "cannot read it"),
])
def test_fleet_file_errors_name_the_field(tmp_path, text, message):
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(XCompileError, match=message.replace("[", r"\[")):
        read_fleet_file(path)


def test_fleet_file_settings_and_paths(tmp_path):
    (tmp_path / "robots").mkdir()
    path = tmp_path / "fleet.toml"
    path.write_text('targets = ["a1", "robots/arm.toml"]\n[target.a1]\nhardware = "cpu"\n'
                    'seed = 3\nepisodes = 2\nprofile = "fast"\n')
    a1, arm = read_fleet_file(path)
    assert (a1.load, a1.hardware, a1.seed, a1.episodes, a1.profile) == ("a1", "cpu", 3, 2, "fast")
    assert arm.target == "robots/arm.toml" and arm.load == str(tmp_path / "robots/arm.toml")
    assert [t.target for t in parse_targets("a1, spot ,panda")] == ["a1", "spot", "panda"]
    with pytest.raises(XCompileError, match="empty name between commas"):
        parse_targets("a1,,spot")


@pytest.mark.ray
def test_ray_local_instance_builds_the_fleet_with_the_same_scores(serial_fleet, tiny_fat_ckpt,
                                                                 short_toml, light_config,
                                                                 tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'xcompile[ray]')")
    from xcompile.executors import evaluate_file, make_executor
    from xcompile.fleet import prepare_jobs, run_fleet
    from xcompile.manager.settings import parse_plan
    from xcompile.targets import load_robot

    doc, _, _ = serial_fleet
    cli = {"passes": parse_plan("pin-embodiment,export-onnx"), "profile": "fast", "episodes": 1,
           "emit": "onnx"}
    jobs, failed = prepare_jobs(Path(tiny_fat_ckpt), parse_targets(_short_fleet(short_toml)),
                                hardware=None, config=Path(light_config), cli=cli,
                                cache_dir=tmp_path / "cache", rollout=False)
    with make_executor("ray", 2) as ex:
        assert ex.started and ex.workers == 2
        # Its workers run at this process's priority, not Ray's default nice 15.
        assert ex.map(lambda _: os.nice(0), [0, 1]) == [os.nice(0)] * 2
        got = run_fleet(jobs, failed, tmp_path / "out", ex)
        panda = load_robot(short_toml["panda"])
        on_ray = evaluate_file(tiny_fat_ckpt, panda, 2, 0, chunk=1, executor=ex)
    assert got["executor"] == "ray" and got["exit_code"] == 0
    assert _by_target(got) == _by_target(doc)
    assert on_ray.returns == evaluate_file(tiny_fat_ckpt, panda, 2, 0, chunk=1).returns
    assert not ex.ray.is_initialized()                     # it shut down what it started
