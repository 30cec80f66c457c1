"""rl-finetune's gain search: the gains fold into the network exactly, the search is the same
under the same seed, and the pass keeps a calibrated policy only when its own held-out episodes
say it is clearly better."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import short_robot
from xcompile.artifact import Artifact
from xcompile.models.slim import MLPPolicy, load_torch_policy
from xcompile.passes.base import BuildContext, get_pass
from xcompile.passes.gain_search import (
    can_fold,
    fold_input_gains,
    gain_indices,
    search_gains,
)
from xcompile.sim.env import obs_dim
from xcompile.sim.observations import random_obs
from xcompile.sim.tasks import obs_layout
from xcompile.targets import load_hardware, load_robot

# Episodes of the searches below: two reach goals, a few locomotion commands (not the task's
# 10-12 s): what they check is plumbing and determinism, not what the gains are worth.
SHORT_S = 3.0


def _pinned(ckpt: str, robot, tmp_path):
    cls = get_pass("pin-embodiment")
    ctx = BuildContext(robot=robot, hardware=load_hardware("cpu"), workdir=tmp_path / "pin")
    ctx.workdir.mkdir(parents=True)
    art = Artifact.create("fat-checkpoint", ckpt, robot.name)
    return cls().run(art, cls.Config(n_check_obs=16, check_episodes=0), ctx).artifact


def _gain_vector(robot, gains) -> np.ndarray:
    g = np.ones(obs_dim(robot), dtype=np.float32)
    g[gain_indices(robot)] = gains
    return g


def test_gain_entries_are_the_task_inputs():
    def names(robot):
        at, out = 0, {}
        for name, width in obs_layout(robot):
            for i in range(at, at + width):
                out[i] = name
            at += width
        return {out[i] for i in gain_indices(robot)}

    assert names(load_robot("a1")) == {"cmd_vx_vy_yaw", "lin_vel_b"}
    assert len(gain_indices(load_robot("a1"))) == 6
    assert names(load_robot("panda")) == {"goal_minus_ee_b"}


@pytest.mark.parametrize("name", ["a1", "panda"])
def test_folded_gains_equal_scaled_inputs(name, tiny_fat_ckpt, tmp_path):
    robot = load_robot(name)
    pinned = load_torch_policy(_pinned(tiny_fat_ckpt, robot, tmp_path).path)
    idx = gain_indices(robot)
    gains = np.linspace(0.6, 1.7, len(idx)).astype(np.float32)
    obs = torch.as_tensor(random_obs(robot, 64, seed=1))
    scaled = obs * torch.as_tensor(_gain_vector(robot, gains))
    torch.manual_seed(0)
    mlps = [MLPPolicy(obs_dim(robot), [16], robot.n_joints, normalize=norm) for norm in (0, 1)]
    with torch.no_grad():
        mlps[1].obs_mean.uniform_(-1, 1)
        mlps[1].obs_std.uniform_(0.5, 2)
    for module in (pinned, *mlps):
        assert can_fold(module, idx)
        folded = fold_input_gains(module, idx, gains)
        with torch.no_grad():
            torch.testing.assert_close(folded(obs), module(scaled), atol=1e-5, rtol=1e-5)
            assert not torch.allclose(folded(obs), module(obs), atol=1e-3)   # it did something
            torch.testing.assert_close(fold_input_gains(module, idx, np.ones(len(idx)))(obs),
                                       module(obs))


def test_search_is_deterministic_and_bounded(competent_fat_ckpt, tmp_path):
    robot = short_robot("panda", SHORT_S)
    pinned = load_torch_policy(_pinned(competent_fat_ckpt, robot, tmp_path).path)
    runs = [search_gains(pinned, robot, iterations=2, episodes=1, step=0.69, seed=4)
            for _ in range(2)]
    (g0, rows0), (g1, rows1) = runs
    np.testing.assert_array_equal(g0, g1)
    assert rows0 == rows1 and [r["step"] for r in rows0] == [0.69, 0.414]
    assert np.all(g0 <= 2.0 + 1e-6) and np.all(g0 >= 0.5 - 1e-6)   # two steps could leave [1/2, 2]
    for r in rows0:                        # the current gains were among the candidates
        assert r["score_best"] >= r["score_center"]


def test_search_on_a_process_pool_finds_the_same_gains(competent_fat_ckpt, tmp_path):
    """Under a pool executor the candidates run as tasks in worker processes (the network as a
    torch-policy file): the same episodes in the same batches, so the same scores and gains."""
    from xcompile.executors import make_executor, use_executor

    robot = short_robot("panda", SHORT_S)
    pinned = load_torch_policy(_pinned(competent_fat_ckpt, robot, tmp_path).path)
    kw = dict(iterations=2, episodes=1, step=0.69, seed=4)
    here = search_gains(pinned, robot, **kw)
    ticks: list[int] = []
    with make_executor("process", 2) as ex, use_executor(ex):
        pooled = search_gains(pinned, robot, progress=lambda i, n: ticks.append(i), **kw)
    np.testing.assert_array_equal(here[0], pooled[0])
    assert here[1] == pooled[1]
    assert ticks == list(range(1, 2 * (1 + 2 * 3) + 1))   # every candidate reported, in order


def test_search_climbs_a_known_slope(monkeypatch):
    """On a score that is a known function of the gains, the search moves each gain the right
    way: to the top of a parabola, up a slope, and not at all on a flat one."""
    import xcompile.passes.gain_search as gs

    robot = load_robot("panda")
    idx = gain_indices(robot)
    best = np.log([1.2, 1.0, 0.8])           # gain 0 peaks at 1.2, gain 2 at 0.8; gain 1 flat

    class Res:
        def __init__(self, score):
            self.scores = [score]

    def fake_score(act, robot, episodes, seed, **kw):
        # The candidate scales the observation before the network: a ones observation shows
        # the network its gains.
        act(np.ones((1, obs_dim(robot)), dtype=np.float32))
        logg = np.log(recorded[-1][0, idx])
        return Res(1.0 - float(((logg - best)[[0, 2]] ** 2).sum()))

    recorded: list[np.ndarray] = []

    class Net(torch.nn.Module):
        def forward(self, obs):
            recorded.append(obs.numpy().copy())
            return torch.zeros(len(obs), robot.n_joints)

    monkeypatch.setattr(gs, "score_policy", fake_score)
    gains, rows = gs.search_gains(Net(), robot, iterations=3, episodes=1, step=0.25, seed=0)
    np.testing.assert_allclose(gains, [1.2, 1.0, 0.8], rtol=1e-3)   # a parabola: exact
    assert rows[0]["gains"][1] == 1.0


def test_pass_keeps_a_calibrated_policy_only_when_clearly_better(competent_fat_ckpt, tmp_path):
    robot = short_robot("a1", SHORT_S)
    pinned = _pinned(competent_fat_ckpt, robot, tmp_path)
    cls = get_pass("rl-finetune")
    ctx = BuildContext(robot=robot, hardware=load_hardware("cpu"), workdir=tmp_path / "rl")
    ctx.workdir.mkdir()
    cfg = cls.Config(search_iterations=1, search_episodes=2, env_steps=0, eval_episodes=4)
    res = cls().run(pinned, cfg, ctx)
    s = cls().check(pinned, res, cfg, ctx)
    assert set(res.summary["candidates"]) == {"calibrated"}        # no PPO at env_steps 0
    assert (s["kept"] == "calibrated") == (s["tuned_minus_start_ci95"][0] > 0)
    start = load_torch_policy(pinned.path)
    want = (fold_input_gains(start, gain_indices(robot), np.asarray(res.summary["gains"]))
            if s["kept"] == "calibrated" else start)
    x = torch.as_tensor(random_obs(robot, 32))
    with torch.no_grad():
        torch.testing.assert_close(load_torch_policy(res.artifact.path)(x), want(x),
                                   atol=1e-5, rtol=1e-5)
    assert (ctx.workdir / "learning_curve.png").stat().st_size > 1000


def test_search_and_keep_returns_the_gains_only_when_clearly_better():
    """distill's use: an MLP student searched and kept-or-not on held-out episodes; kept means
    the returned module is the student with exactly the reported gains."""
    from xcompile.passes.gain_search import search_and_keep

    robot = load_robot("panda")
    torch.manual_seed(0)
    student = MLPPolicy(obs_dim(robot), [16], robot.n_joints, normalize=True).eval()
    out, rec = search_and_keep(student, robot, iterations=1, episodes=1, keep_episodes=2,
                               seed=0, faults=None, streams=("distill-search", "distill-keep"))
    assert set(rec) >= {"gains", "kept", "search", "score_with", "score_without"}
    assert rec["kept"] == (rec["with_minus_without_ci95"][0] > 0)
    x = torch.as_tensor(random_obs(robot, 16))
    want = (fold_input_gains(student, gain_indices(robot), np.asarray(rec["gains"]))
            if rec["kept"] else student)
    with torch.no_grad():
        torch.testing.assert_close(out(x), want(x))
    gru = torch.nn.GRU(4, 4)                  # cannot be folded: handed back, no search
    assert search_and_keep(gru, robot, iterations=1, episodes=1, keep_episodes=1, seed=0,
                           faults=None, streams=("distill-search", "distill-keep")) == (gru, {})
