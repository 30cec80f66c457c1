"""PPO's environment stepping and DAgger's collection on worker processes give exactly what they give
in this process (issue 18, item 2): the process vector env equals LockstepEnvs VecStep by VecStep,
DAgger's data are the same arrays on the serial and the process executor, and a PPO run under
`use_executor(process)` learns the same curve and weights as in this process."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.conftest import short_robot
from xcompile.executors import use_executor
from xcompile.executors.pools import ProcessExecutor, SerialExecutor
from xcompile.executors.rollouts import PolicyRef
from xcompile.models.slim import MLPPolicy, save_torch_policy
from xcompile.passes import dagger_collect
from xcompile.passes import ppo as ppo_mod
from xcompile.passes import rl_finetune as rl_mod
from xcompile.passes.base import BuildContext, seeded_torch
from xcompile.sim.env import obs_dim
from xcompile.sim.fault_suite import training_schedule
from xcompile.sim.procvec import ProcessVecEnvs
from xcompile.sim.vec import LockstepEnvs
from xcompile.targets import load_hardware, load_robot


def assert_same_step(a, b) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.dtype == y.dtype and x.shape == y.shape, f.name
        np.testing.assert_array_equal(x, y, err_msg=f.name)   # NaN == NaN here; exact otherwise


@pytest.mark.parametrize("name,episode_s,robust", [("a1", 0.3, False), ("panda", 0.3, False),
                                                   ("a1", 0.3, True)])
def test_process_vec_envs_equal_lockstep_envs(name, episode_s, robust):
    robot = short_robot(name, episode_s)
    faults = training_schedule(robot) if robust else None   # a robust build's episodes
    rng = np.random.default_rng(0)
    n, steps = 4, 45
    actions = rng.uniform(-1.5, 1.5, (steps, n, robot.n_joints)).astype(np.float32)
    with LockstepEnvs(robot, n, 3, faults, stream="finetune-train") as ref, \
            ProcessVecEnvs(robot, n, 3, faults, stream="finetune-train", workers=2) as par:
        assert par.slices == [(0, 2), (2, 4)]
        np.testing.assert_array_equal(ref.reset(), par.reset())
        ends = 0
        for t in range(steps):
            a, b = ref.step(actions[t]), par.step(actions[t])
            assert_same_step(a, b)
            ends += int((a.terminated | a.truncated).sum())
        assert ends >= n * 2                        # every env went through episode ends
        assert ref.episodes_started == par.episodes_started == n + ends


def test_process_vec_envs_refuse_a_bad_stream():
    with pytest.raises(Exception, match="stream"):
        ProcessVecEnvs(load_robot("panda"), 2, seed=0, stream="nope")


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory):
    """A tiny MLP teacher and a different tiny MLP student for a short-episode panda, as files."""
    robot = short_robot("panda", 0.2)
    tmp = tmp_path_factory.mktemp("dagger")
    refs = []
    for i, name in enumerate(("teacher", "student")):
        torch.manual_seed(i)
        mlp = MLPPolicy(obs_dim(robot), [16], robot.n_joints).eval()
        path = save_torch_policy(tmp / f"{name}.pt", mlp, mlp.spec())
        refs.append(PolicyRef.of(path, robot))
    return robot, *refs


def test_dagger_collection_is_the_same_on_serial_and_process(mlp_files):
    robot, teacher, student = mlp_files
    with ProcessExecutor(2) as pool:
        for stu, beta, noise in ((None, 0.0, 0.1), (student, 0.5, 0.0)):
            # 12 episodes: chunks of 10 and 2, on two workers
            got = [dagger_collect.collect(teacher, stu, beta, noise, 0, 12, "dagger", 24, ex)
                   for ex in (SerialExecutor(), pool)]
            s, p = got
            assert len(s.obs) == 12 and s.obs[0].dtype == np.float32
            assert sum(map(len, s.obs)) == 12 * robot.episode_steps
            np.testing.assert_array_equal(np.concatenate(s.obs), np.concatenate(p.obs))
            np.testing.assert_array_equal(np.concatenate(s.labels), np.concatenate(p.labels))
            assert s.scores == p.scores


def test_ppo_learns_the_same_under_the_process_executor(tmp_path, monkeypatch):
    monkeypatch.setattr(ppo_mod, "default_workers", lambda: 2)     # whatever cores CI has
    robot = short_robot("panda", 0.3)        # 15-step episodes: each env ends 2 per iteration
    cfg = rl_mod.RLFinetuneConfig(env_steps=2 * 4 * 30, n_envs=4, rollout_steps=30, epochs=2,
                                  minibatch=40, critic_warmup_iters=1, critic_hidden=[16],
                                  eval_episodes=1, lr=3e-4)
    ctx = BuildContext(robot=robot, hardware=load_hardware("cpu"), workdir=tmp_path)
    runs = []
    for ex in (None, ProcessExecutor(2)):
        torch.manual_seed(0)
        policy = MLPPolicy(obs_dim(robot), [16, 16], robot.n_joints, normalize=True)
        with seeded_torch(0):
            if ex is None:
                envs = ppo_mod.vec_envs(robot, 4, 0, None)
                envs.close()
                assert isinstance(envs, LockstepEnvs)
                curve = ppo_mod.train_ppo(policy, cfg, ctx)
            else:
                with ex, use_executor(ex):
                    envs = ppo_mod.vec_envs(robot, 4, 0, None)
                    envs.close()
                    assert isinstance(envs, ProcessVecEnvs) and envs.workers == 2
                    curve = ppo_mod.train_ppo(policy, cfg, ctx)
        runs.append((curve, policy.state_dict()))
    (c0, w0), (c1, w1) = runs
    assert [r["phase"] for r in c0] == ["warmup", "ppo"] and c0[-1]["episodes"] == 8
    assert c0 == c1
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
