"""The C back end inside a build: `--emit c` in the plan, the emit-c pass's checks, the report,
`xcompile eval policy.c`, and what happens without a compiler or with an edited file.

(The emitter itself — ops, precisions, byte-identical output, -Werror — is tested in
test_cgen.py.)"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xcompile.artifact import Artifact
from xcompile.build import run_build
from xcompile.cli import app
from xcompile.errors import CheckpointError, PlanError
from xcompile.manager.settings import DEFAULTS, resolve_settings
from xcompile.models.slim import MLPPolicy, save_torch_policy
from xcompile.policy import load_policy
from xcompile.sim.env import obs_dim
from xcompile.sim.observations import random_obs
from xcompile.targets import load_robot

runner = CliRunner()


def _plan(**cli):
    return [s.name for s in resolve_settings(DEFAULTS, {}, cli).plan]


def test_emit_c_ends_the_plan():
    default = _plan()
    assert _plan(emit="onnx") == default
    # After the last pass that makes ONNX; build-tensorrt (which takes ONNX) leaves the default
    # plan with a note.
    got = resolve_settings(DEFAULTS, {}, {"emit": "c"})
    names = [s.name for s in got.plan]
    assert names == [n for n in default if n != "build-tensorrt"] + ["emit-c"]
    assert any("build-tensorrt left out" in n for n in got.notes)
    assert _plan(emit="c", passes=["pin-embodiment", "export-onnx"]) == [
        "pin-embodiment", "export-onnx", "emit-c"]
    with pytest.raises(PlanError, match="remove it or drop --emit"):
        _plan(emit="c", passes=["pin-embodiment", "export-onnx", "build-tensorrt"])
    with pytest.raises(PlanError, match="needs a pass that makes onnx"):
        _plan(emit="c", passes=["pin-embodiment"])
    with pytest.raises(PlanError, match="unknown back end"):
        _plan(emit="verilog")


@pytest.fixture(scope="module")
def mlp_a1(tmp_path_factory):
    """A torch MLP policy for a1 (random weights, normalisation that export folds)."""
    robot = load_robot("a1")
    tmp = tmp_path_factory.mktemp("emitc")
    torch.manual_seed(3)
    mlp = MLPPolicy(obs_dim(robot), [64, 64], robot.n_joints, "elu", normalize=True)
    mlp.obs_mean.copy_(torch.as_tensor(random_obs(robot, 256).mean(0)))
    mlp.obs_std.fill_(0.5)
    path = save_torch_policy(tmp / "mlp.pt", mlp, {**mlp.spec(), "robot": "a1",
                                                   "joint_order": list(robot.joints.names)})
    return Artifact.create("torch", path, "a1", meta={"kind": "mlp"}), tmp


@pytest.fixture(scope="module")
def c_build(mlp_a1):
    art, tmp = mlp_a1
    # Smaller checks than the defaults keep the test quick; builds use the defaults.
    opts = {"quantize": {"calibration_episodes": 1, "heldout_episodes": 1},
            "emit-c": {"check_random": 2000, "timing_calls": 2000}}
    plan = resolve_settings(DEFAULTS, {"passes": ["export-onnx", "quantize"], "options": opts},
                            {"emit": "c"}, input_format="torch").plan
    res = run_build(art, "a1", None, plan, tmp / "out", cache_dir=tmp / "cache", episodes=2,
                    rollout=False, runtime_floor=lambda: 5.0)
    return res, tmp


def test_build_emits_checked_c(c_build):
    res, tmp = c_build
    out = res.out_dir
    for name in ("policy.c", "policy.h", "policy.onnx", "report.json", "manifest.json"):
        assert (out / name).is_file(), name
    rep = res.report
    assert rep["final"]["policy"] == "policy.c" and rep["final"]["format"] == "c"
    stage = rep["stages"][-1]
    assert stage["name"] == "emit-c" and not stage["skipped"]
    c = stage["checks"]
    # Weight-only int8 activations stay float: C matches onnxruntime to 1e-5 (max, not mean).
    assert c["error_measure"] == "max" and c["max_abs_err"] <= 1e-5
    assert c["n_check_obs"] > 2000                 # random + one closed-loop episode
    # Bytes are the object's text + data, and smaller than the float ONNX file.
    assert stage["bytes"] == c["object"]["text"] + c["object"]["data"]
    assert 0 < c["stack_bytes"] < 4096 and stage["runtime"] == "c"
    assert 0 < c["c_p50_us"] <= c["c_p99_us"] <= c["c_max_us"]
    # Scored through ctypes on the same report episodes as the int8 ONNX stage: the same scores.
    onnx_stage = rep["stages"][-2]
    assert stage["scores"] == pytest.approx(onnx_stage["scores"], abs=1e-3)
    assert any(n.startswith("emit-c: policy.c") for n in rep["notes"])
    # The emitted files are what a rebuild would compare.
    assert {"policy.c", "policy.h"} <= set(json.loads((out / "manifest.json").read_text())
                                           ["outputs"])


def test_eval_runs_only_c_it_emitted(c_build, tmp_path):
    res, _ = c_build
    robot = load_robot("a1")
    c_pol = load_policy(res.out_dir / "policy.c", robot)
    o_pol = load_policy(res.out_dir / "policy.onnx", robot)
    obs = random_obs(robot, 500, seed=9)
    assert c_pol.kind == "c"
    np.testing.assert_allclose(c_pol.act(obs), o_pol.act(obs), atol=1e-5)
    r = runner.invoke(app, ["eval", str(res.out_dir / "policy.c"), "--target", "a1",
                            "--episodes", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["kind"] == "c"
    # An edited file is refused before anything is compiled; so is one whose ONNX is missing,
    # and one for another robot.
    edited = tmp_path / "edited"
    shutil.copytree(res.out_dir, edited)
    text = (edited / "policy.c").read_text()
    (edited / "policy.c").write_text(text.replace("xc_policy_step(", "xc_policy_step (", 1))
    with pytest.raises(CheckpointError, match="not what this xcompile emits"):
        load_policy(edited / "policy.c", robot)
    (edited / "policy.c").write_text(text)
    load_policy(edited / "policy.c", robot)            # restored: accepted again
    (edited / "policy.onnx").unlink()
    with pytest.raises(CheckpointError, match="is not beside it"):
        load_policy(edited / "policy.c", robot)
    r = runner.invoke(app, ["eval", str(res.out_dir / "policy.c"), "--target", "spot"])
    assert r.exit_code != 0 and "Traceback" not in r.output


def test_no_compiler_skips_emit_c(mlp_a1, monkeypatch):
    art, tmp = mlp_a1
    monkeypatch.setenv("CC", str(tmp / "no-such-compiler"))
    plan = resolve_settings(DEFAULTS, {"passes": ["export-onnx"]}, {"emit": "c"},
                            input_format="torch").plan
    res = run_build(art, "a1", None, plan, tmp / "out-nocc", cache_dir=tmp / "cache",
                    episodes=1, rollout=False, runtime_floor=lambda: 5.0)
    stage = res.report["stages"][-1]
    assert stage["name"] == "emit-c" and stage["skipped"]
    assert "C compiler" in stage["skip_reason"]
    assert res.report["final"]["policy"] == "policy.onnx"
    assert not (res.out_dir / "policy.c").exists()


def test_readme_control_loop_compiles(c_build, tmp_path):
    """The README's C example compiles against a real emitted header, warnings as errors."""
    import re
    import subprocess
    from pathlib import Path

    from xcompile.cgen import find_cc

    res, _ = c_build
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```c\n(.*?)```", readme, re.S)
    assert block, "README has no ```c example"
    (tmp_path / "loop.c").write_text(block.group(1))
    shutil.copyfile(res.out_dir / "policy.h", tmp_path / "policy.h")
    r = subprocess.run([find_cc(), "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-c",
                        "loop.c"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
