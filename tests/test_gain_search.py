"""rl-finetune's gain search: the gains fold into the network exactly, the search is the same
under the same seed, and the pass keeps a calibrated policy only when its own held-out episodes
say it is clearly better."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
    robot = load_robot("panda")
    pinned = load_torch_policy(_pinned(competent_fat_ckpt, robot, tmp_path).path)
    runs = [search_gains(pinned, robot, generations=2, population=3, episodes=1, sigma=2.0,
                         seed=4) for _ in range(2)]
    (g0, rows0), (g1, rows1) = runs
    np.testing.assert_array_equal(g0, g1)
    assert rows0 == rows1 and len(rows0) == 2
    assert np.all(g0 <= 2.0 + 1e-6) and np.all(g0 >= 0.5 - 1e-6)   # sigma 2 would leave [1/2, 2]
    assert not np.allclose(g0, 1.0)


def test_pass_keeps_a_calibrated_policy_only_when_clearly_better(competent_fat_ckpt, tmp_path):
    robot = load_robot("a1")
    pinned = _pinned(competent_fat_ckpt, robot, tmp_path)
    cls = get_pass("rl-finetune")
    ctx = BuildContext(robot=robot, hardware=load_hardware("cpu"), workdir=tmp_path / "rl")
    ctx.workdir.mkdir()
    cfg = cls.Config(search_generations=2, search_population=3, search_episodes=2, env_steps=0,
                     eval_episodes=4)
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
