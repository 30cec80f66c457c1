"""The tasks and their score: continuous, bounded, unsaturated, and able to tell good from bad.

The worlds of `xcompile.sim.env`: locomotion tracks a command (vx, vy, yaw rate) that changes every
`command_period_s` in a randomised world with pushes; reach follows a new goal every
`goal_period_s`, drawn over the joint limits. Each test here checks what the score means, on real
PyBullet episodes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from xcompile.evaluate import evaluate
from xcompile.seeds import episode_seed
from xcompile.sim.env import REACH_SCALE_M, Randomization, RobotEnv
from xcompile.sim.experts import evaluate_expert, expert_action
from xcompile.sim.observations import random_obs
from xcompile.sim.tasks import REACH_WEIGHT_FLOOR, step_weights
from xcompile.targets import load_robot


def _episode(env: RobotEnv, seed: int, act) -> tuple[float, int]:
    obs, _ = env.reset(seed=seed)
    while True:
        obs, _, term, trunc, info = env.step(act(env, obs))
        if term or trunc:
            return info["score"], env.t


def test_commands_change_during_the_episode_and_cover_the_ranges():
    robot = load_robot("a1")
    env = RobotEnv(robot)
    task = robot.task
    seen = []
    try:
        for i in range(6):
            env.reset(seed=episode_seed("report", 0, i))
            cmds = [env.cmd.copy()]
            for _ in range(env.max_steps - 1):
                env.step(np.zeros(env.n))
                if not np.array_equal(env.cmd, cmds[-1]):
                    assert env.t % env.cmd_steps == 0        # only at a period's end
                    cmds.append(env.cmd.copy())
            assert len(cmds) >= 2                            # 12 s episode, 4 s commands
            seen += cmds
    finally:
        env.close()
    seen = np.array(seen)
    for k, (lo, hi) in enumerate((task.command_vx_mps, task.command_vy_mps, task.command_yaw_rps)):
        assert seen[:, k].min() >= lo and seen[:, k].max() <= hi
    assert (seen[:, 0] < 0).any() and (seen[:, 0] > 0).any()          # backward and forward
    assert (np.abs(seen[:, 1]) > 0.1).any() and (np.abs(seen[:, 2]) > 0.3).any()


def test_score_is_bounded_and_ignoring_the_command_costs():
    """The expert beats the same expert told to stand still (it ignores the command), which
    beats doing nothing at all only where standing is what was asked: the score is per step and
    unsaturated, below 1 even for the expert."""
    robot = load_robot("a1")
    env = RobotEnv(robot)

    def deaf(env, obs):
        obs = obs.copy()
        obs[9:12] = 0.0
        return expert_action(env, obs)

    try:
        seeds = [episode_seed("report", 0, i) for i in range(4)]
        expert = [_episode(env, s, expert_action)[0] for s in seeds]
        ignoring = [_episode(env, s, deaf)[0] for s in seeds]
    finally:
        env.close()
    assert all(0.0 <= v <= 1.0 for v in expert + ignoring)
    assert max(expert) < 0.99                                       # not saturated
    assert np.mean(expert) > np.mean(ignoring) + 0.1


def test_a_fall_ends_the_episode_and_its_remaining_steps_count_zero():
    env = RobotEnv("a1")
    try:
        env.reset(seed=episode_seed("report", 0, 0))
        for _ in range(100):
            env.step(expert_action(env, env._obs()))
        before = env.score_sum
        p = env.p
        # Turn the robot over: the next step is a fall.
        p.resetBasePositionAndOrientation(env.body, [0, 0, 0.3], p.getQuaternionFromEuler(
            [math.pi, 0, 0]), physicsClientId=env.cid)
        _, reward, term, trunc, info = env.step(np.zeros(env.n))
        assert term and not trunc and env.fell and reward < 0
        assert info["score"] == pytest.approx(before / env.max_steps)
        assert info["score"] < 101 / env.max_steps
    finally:
        env.close()
    res = evaluate(lambda o: np.full((len(o), 12), 4.0), load_robot("a1"), episodes=2)
    assert res.falls == 2 and res.score < 0.2


def test_reach_goals_move_over_the_workspace_and_score_per_step():
    robot = load_robot("panda")
    env = RobotEnv(robot)
    try:
        env.reset(seed=episode_seed("report", 0, 0))
        ee0 = env._ee_pos()
        goals, scores = [env.goal.copy()], []
        for _ in range(env.max_steps):
            d = float(np.linalg.norm(env._ee_pos() - env.goal))
            _, reward, term, trunc, info = env.step(expert_action(env, env._obs()))
            d_after = float(np.linalg.norm(env._ee_pos() - goals[-1]))
            scores.append(math.exp(-d_after / REACH_SCALE_M))
            if not np.array_equal(env.goal, goals[-1]):
                goals.append(env.goal.copy())
            assert d >= 0
            if term or trunc:
                break
        m = env.episode_metrics()
    finally:
        env.close()
    assert len(goals) == round(robot.task.episode_s / robot.task.goal_period_s) == m["goals"]
    # Goals far from the default pose's hand: the task is the workspace, not a neighbourhood.
    assert max(np.linalg.norm(g - ee0) for g in goals) > 0.3
    assert info["score"] == pytest.approx(np.mean(scores), abs=1e-9)
    assert 0.0 < info["score"] < 0.95


def test_step_weights_follow_the_reach_scores_sensitivity_to_distance():
    """distill's weight of a step: a hand at its goal counts 1 + floor, one 10 cm off about the
    floor, the weights fall with the distance; locomotion has none (every step alike)."""
    robot = load_robot("panda")
    obs = random_obs(robot, 4, seed=0)
    obs[:, :3] = [[0, 0, 0], [0.01, 0, 0], [0, 0.02, 0], [0, 0, 0.1]]   # goal_minus_ee_b
    w = step_weights(robot, obs)
    want = REACH_WEIGHT_FLOOR + np.exp(-2 * np.array([0, 0.01, 0.02, 0.1]) / REACH_SCALE_M)
    np.testing.assert_allclose(w, want, rtol=1e-6)
    assert list(np.argsort(-w)) == [0, 1, 2, 3]
    assert step_weights(load_robot("a1"), random_obs(load_robot("a1"), 4, seed=0)) is None


def test_reach_expert_beats_a_slow_one_and_a_still_arm():
    """Speed counts: the same resolved-rate law at a quarter of the gain is precise in the end
    but slower, and scores lower."""
    from xcompile.sim.experts import reach_action

    robot = load_robot("panda")
    env = RobotEnv(robot)
    try:
        seeds = [episode_seed("report", 0, i) for i in range(2)]
        fast = [_episode(env, s, lambda e, o: reach_action(e))[0] for s in seeds]
        slow = [_episode(env, s, lambda e, o: reach_action(e, gain=0.25))[0] for s in seeds]
    finally:
        env.close()
    still = evaluate(lambda o: np.zeros((len(o), 7)), robot, episodes=2)
    assert np.mean(fast) > np.mean(slow) > still.score
    assert still.success_rate < 0.5


def test_same_seed_same_score_and_randomisation_varies_the_world():
    robot = load_robot("a1")
    a = evaluate_expert(robot, episodes=2, seed=0)
    b = evaluate_expert(robot, episodes=2, seed=0)
    assert a.scores == b.scores and a.metrics == b.metrics
    env, nominal = RobotEnv(robot), RobotEnv(robot, randomization=Randomization.off())
    try:
        frictions, strengths = set(), set()
        for i in range(3):
            env.reset(seed=i)
            nominal.reset(seed=i)
            frictions.add(env.p.getDynamicsInfo(env.plane, -1, physicsClientId=env.cid)[1])
            strengths.add(float(env.tau_max[0]))
            assert nominal.next_push is None
            assert np.array_equal(nominal.tau_max, nominal.tau_nominal)
        assert len(frictions) == 3 and len(strengths) == 3 and env.next_push is not None
    finally:
        env.close()
        nominal.close()


def test_metrics_are_the_physical_figures():
    res = evaluate_expert(load_robot("a1"), episodes=1)
    d = res.as_dict()
    assert {"vel_error_mps", "yaw_rate_error_rps", "cost_of_transport", "energy_per_m_j"} <= set(d)
    assert 0 < d["vel_error_mps"] < 1.0 and d["cost_of_transport"] > 0
    r = evaluate_expert(load_robot("panda"), episodes=1).as_dict()
    assert {"reach_error_mm", "time_to_1cm_s", "goals", "goals_within_1cm"} <= set(r)
    assert r["goals"] == 4 and 0 < r["time_to_1cm_s"] < 2.5
