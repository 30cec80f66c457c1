"""Worlds: gymnasium contract on every robot, determinism, scores, experts, rendering."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from xcompile.evaluate import evaluate
from xcompile.sim.env import Faults, RobotEnv, obs_dim, obs_layout
from xcompile.targets import list_robots, load_robot


@pytest.mark.parametrize("name", list_robots())
def test_env_checker(name):
    env = RobotEnv(name)
    try:
        check_env(env, skip_render_check=True)
        assert env.observation_space.shape == (obs_dim(env.robot),)
        assert sum(n for _, n in obs_layout(env.robot)) == obs_dim(env.robot)
    finally:
        env.close()


def _rollout(name, seed, steps=30):
    env = RobotEnv(name)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(0)
    trace = [obs]
    for _ in range(steps):
        obs, *_ = env.step(rng.uniform(-0.5, 0.5, env.n))
        trace.append(obs)
    env.close()
    return np.stack(trace)


@pytest.mark.parametrize("name", ["a1", "panda"])
def test_rollout_is_deterministic(name):
    a, b = _rollout(name, seed=3), _rollout(name, seed=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, _rollout(name, seed=4))


def test_nan_action_ends_episode_and_is_reported():
    robot = load_robot("xarm6")
    res = evaluate(lambda o: np.full((len(o), 6), np.nan), robot, episodes=2)
    assert res.invalid_actions == 2 and res.score == 0.0 and res.nonfinite_action_episodes == 2


def test_faults_weaken_the_robot():
    robot = load_robot("a1")
    env = RobotEnv(robot, faults=Faults(torque_scale=0.3, payload_kg=5.0))
    assert np.allclose(env.tau_max, 0.3 * np.asarray(robot.joints.torque_limit))
    env.close()


def test_gif(tmp_path):
    from PIL import Image

    from xcompile.evaluate import rollout_gif

    path = tmp_path / "r.gif"
    rollout_gif(lambda o: np.zeros((len(o), 12)), load_robot("a1"), path, every=50)
    img = Image.open(path)
    assert img.n_frames >= 2 and img.size == (320, 240)


def test_gif_renders_the_episode_evaluate_runs(tmp_path, monkeypatch):
    from xcompile.errors import XCompileError
    from xcompile.evaluate import rollout_gif
    from xcompile.seeds import episode_seed

    seeds = []
    orig = RobotEnv.reset

    def reset(self, *, seed=None, options=None):
        seeds.append(seed)
        return orig(self, seed=seed, options=options)

    monkeypatch.setattr(RobotEnv, "reset", reset)
    rollout_gif(lambda o: np.zeros((len(o), 7)), load_robot("panda"), tmp_path / "r.gif",
                seed=2, stream="bench", every=75)
    assert seeds == [episode_seed("bench", 2, 0)]      # what evaluate(seed=2, stream="bench")
    with pytest.raises(XCompileError, match="unknown seed stream"):   # runs as its episode 0
        rollout_gif(lambda o: np.zeros((len(o), 7)), load_robot("panda"), tmp_path / "s.gif",
                       stream="nope")
    assert not (tmp_path / "s.gif").exists()
