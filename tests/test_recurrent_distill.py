"""Distilling a recurrent teacher: the students with memory use it, and a GRU or history-MLP student
of a stateful teacher (the competent fixture pinned to a1, with a leaky integral of its velocity error
as hidden state, examples/recurrent_teacher.py) is distilled, exported with its state and
quantized, each form equal to the one before it, and scores near its teacher."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_rl_distill import SUMMARIES, run_pass

from tests.conftest import short_robot
from xcompile.artifact import Artifact
from xcompile.evaluate import evaluate
from xcompile.frontends.graph import is_recurrent
from xcompile.models.fat import pin
from xcompile.models.recurrent import GRUStudent, HistoryMLP, sequence_actions, windows
from xcompile.models.slim import load_torch_policy
from xcompile.onnx.contract import deployment_contract
from xcompile.onnx.model import set_metadata
from xcompile.onnx.recurrent import CONTRACT_KEY, StateSpec, contract_value
from xcompile.passes.students import action_error, fit_student, new_student
from xcompile.policy import body_descriptors, load_fat_checkpoint, load_policy, torch_act
from xcompile.sim.env import obs_dim, obs_layout

REPO = Path(__file__).resolve().parent.parent


def _example():
    spec = importlib.util.spec_from_file_location("recurrent_teacher",
                                                  REPO / "examples" / "recurrent_teacher.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------ memory


def test_students_with_memory_learn_a_delay_a_plain_mlp_cannot():
    """Labels that are the observation of 2 steps ago: a history MLP over 3 observations and a
    GRU fit them; an MLP over one observation cannot (its error stays near the labels' own)."""
    rng = np.random.default_rng(0)
    obs = [rng.standard_normal((60, 6)).astype(np.float32) for _ in range(24)]
    act = [np.concatenate([np.zeros((2, 2), np.float32), x[:-2, :2]]) for x in obs]
    gen = torch.Generator().manual_seed(0)
    err = {}
    for kind, hidden, epochs in (("mlp", [64], 60), ("history_mlp", [64], 60),
                                 ("gru", [32], 60)):
        s = new_student(kind, 6, 2, hidden, "elu", 3, obs[:4], 0.05)
        fit_student(s, obs[:20], act[:20], epochs, 3e-3, 128, gen)
        err[kind] = action_error(s, obs[20:], act[20:])     # held-out episodes
    base = float(np.abs(np.concatenate(act[20:])).mean())   # predicting 0
    assert err["mlp"] > 0.7 * base, err
    assert err["history_mlp"] < 0.25 * base and err["gru"] < 0.4 * base, (err, base)


def test_weighted_fit_follows_the_weighted_labels():
    """The same observations labelled +1 in half the episodes and -1 in the other half: unweighted,
    every student answers about 0; with weight 0 on the -1 episodes, about +1."""
    rng = np.random.default_rng(2)
    base = [rng.standard_normal((20, 4)).astype(np.float32) for _ in range(4)]
    obs = base + base
    act = [np.ones((20, 1), np.float32)] * 4 + [-np.ones((20, 1), np.float32)] * 4
    weights = [np.ones(20, np.float32)] * 4 + [np.zeros(20, np.float32)] * 4
    for kind in ("mlp", "history_mlp", "gru"):
        got = {}
        for name, w in (("plain", None), ("weighted", weights)):
            gen = torch.Generator().manual_seed(0)
            torch.manual_seed(0)
            s = new_student(kind, 4, 1, [16], "elu", 2, obs[:2], 0.05)
            fit_student(s, obs, act, 80, 1e-2, 32, gen, weights=w)
            with torch.inference_mode():
                got[name] = float(torch.cat(sequence_actions(
                    s, [torch.as_tensor(x) for x in base])).mean())
        assert abs(got["plain"]) < 0.2 and got["weighted"] > 0.8, (kind, got)


def test_history_windows_and_sequences_match_step_by_step_calls():
    rng = np.random.default_rng(1)
    eps = [rng.standard_normal((n, 5)).astype(np.float32) for n in (7, 3)]
    w = windows(eps, 3)
    assert w.shape == (10, 15)
    np.testing.assert_array_equal(w[2], np.concatenate([eps[0][2], eps[0][1], eps[0][0]]))
    np.testing.assert_array_equal(w[8], np.concatenate([eps[1][1], eps[1][0], np.zeros(5)]))
    for m in (HistoryMLP(5, [8], 2, history=3), GRUStudent(5, [8, 4], 2)):
        want = sequence_actions(m, [torch.as_tensor(x) for x in eps])
        for x, a in zip(eps, want):
            (s,) = m.states()
            state = torch.zeros(1, *s.shape)
            steps = []
            for t in range(len(x)):
                out, state = m(torch.as_tensor(x[t:t + 1]), state)
                steps.append(out)
            torch.testing.assert_close(torch.cat(steps), a, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def teacher(competent_fat_ckpt, tmp_path_factory):
    """The competent fixture pinned to a1 with the example's integral state, as the ONNX policy
    that pin-embodiment makes of a recurrent foreign fat policy (contract and state recorded)."""
    import onnx

    robot = short_robot("a1", 4.0)
    tmp = tmp_path_factory.mktemp("recurrent-teacher")
    ckpt = load_fat_checkpoint(competent_fat_ckpt, robot)
    pinned = pin(ckpt.model, body_descriptors(ckpt, robot)[0], robot.family).eval()
    example = _example()
    module = example.IntegralTeacher(pinned, obs_layout(robot), 1.0, 0.9).eval()
    prog = example.to_onnx(module, obs_dim(robot))
    model = onnx.load_from_string(prog.model_proto.SerializeToString())
    set_metadata(model, {**deployment_contract(robot, "ab" * 32, ["pin-embodiment"]),
                         CONTRACT_KEY: contract_value([StateSpec("i_in", "i_out", (3,))])})
    path = tmp / "teacher.onnx"
    onnx.save(model, str(path))
    return robot, Artifact.create("onnx", path, robot.name), module, tmp


def test_the_teachers_state_matters(teacher):
    robot, art, module, _ = teacher
    obs = torch.as_tensor(evaluate(load_policy(art.path, robot).act, robot, episodes=1,
                                   record_obs=True, stream="report").observations[40])
    with torch.inference_mode():
        a0, _ = module(obs, torch.zeros(len(obs), 3))
        a1, _ = module(obs, torch.full((len(obs), 3), 0.3))
    assert float((a0 - a1).abs().max()) > 0.05


@pytest.mark.parametrize("student,kind,cls", [("auto", "gru", GRUStudent),
                                               ("history_mlp", "history_mlp", HistoryMLP)])
def test_distill_a_recurrent_teacher_export_and_quantize(teacher, student, kind, cls):
    robot, art, _, tmp = teacher
    tmp = tmp / kind
    budget = dict(rounds=4, episodes_per_round=6, fit_epochs=30, final_fit_epochs=100,
                  eval_episodes=6, heldout_episodes=2, hidden=[64, 64], student=student)
    student, m = run_pass("distill", art, robot, tmp / "distill", profile="fast", **budget)
    s = SUMMARIES[student.path]
    assert s["teacher_recurrent"] and s["student"] == kind and is_recurrent(student)
    assert isinstance(load_torch_policy(student.path), cls)
    assert m["fold_max_abs_err"] <= 1e-5
    # The student does the task nearly as well as its teacher, on the same episodes...
    assert m["teacher_score"] > 0.3 and m["student_score"] >= 0.8 * m["teacher_score"], (
        m["teacher_score"], m["student_score"])
    # ... and far better than a student that ignores what it sees (a sabotaged one: 0.2 x).
    act = load_policy(student.path, robot).act

    def weak(obs):
        return 0.2 * act(obs)

    weak.reset_states, weak.set_rows = act.reset_states, act.set_rows
    weak_score = evaluate(weak, robot, episodes=6, stream="distill-score").score
    assert weak_score < 0.7 * m["student_score"], (weak_score, m)

    # export-onnx: the state is a graph input/output pair, recorded in the contract
    onnx_art, e = run_pass("export-onnx", student, robot, tmp / "export",
                           history=["pin-embodiment", "distill"])
    assert e["max_abs_err_b1"] <= 1e-4
    pol = load_policy(onnx_art.path, robot)
    meta = pol.info["metadata"]
    (state,) = json.loads(meta[CONTRACT_KEY])["states"]
    want = (("h_in", "h_out", [64]) if kind == "gru" else
            ("hist_in", "hist_out", [3 * obs_dim(robot)]))
    assert (state["input"], state["output"], state["shape"]) == want
    # the same closed-loop episodes from torch and onnxruntime, each carrying its own state
    torch_res = evaluate(torch_act(load_torch_policy(student.path)), robot, episodes=2,
                         stream="report")
    onnx_res = evaluate(pol.act, robot, episodes=2, stream="report")
    np.testing.assert_allclose(onnx_res.scores, torch_res.scores, atol=2e-3)
    # quantize (int8) checks the quantized student in closed loop with its state carried
    q_art, q = run_pass("quantize", onnx_art, robot, tmp / "quantize",
                        history=["pin-embodiment", "distill", "export-onnx"])
    assert is_recurrent(q_art) and q_art.n_bytes < onnx_art.n_bytes


def test_a_recurrent_student_is_refused_by_emit_c_before_anything_runs(tiny_fat_ckpt, tmp_path):
    """A feed-forward fat policy that distill is asked to turn into a GRU: emit-c after it is
    refused when the plan is checked; one line, exit 2, nothing written. (The pass manager also
    refuses before running emit-c on whatever recurrent artifact reaches it.)"""
    from typer.testing import CliRunner

    from xcompile.cli import app

    config = tmp_path / "build.toml"
    config.write_text('passes = ["pin-embodiment", "distill", "export-onnx", "emit-c"]\n'
                      '[pass.distill]\nstudent = "gru"\n')
    res = CliRunner().invoke(app, ["build", tiny_fat_ckpt, "--target", "panda", "--config",
                                   str(config), "--out", str(tmp_path / "out"), "--cache-dir",
                                   str(tmp_path / "cache")])
    assert res.exit_code == 2, res.output
    assert "emit-c does not take a recurrent policy yet" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build.toml"]
