"""Scripted expert controllers, the teachers of the sample fat policy.

* Locomotion: a trotting central pattern generator in joint space driven by the gait clock in the
  observation, with stride length set by the commanded speed and two feedback terms (speed error
  on hip flexion, body roll/pitch on abduction and flexion). Its shape parameters per robot live in
  `GAITS` and were tuned by random search on the score (examples/tune_gaits.py).
* Reach: resolved-rate control with a damped least-squares Jacobian inverse: each step moves the
  joint targets a bounded step along J^+ (goal - ee).

Both return actions in the env's units (offsets from the default pose over action_scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xcompile.evaluate import EvalResult
from xcompile.seeds import episode_seed
from xcompile.sim.env import RobotEnv


@dataclass(frozen=True)
class Gait:
    thigh_sign: float = -1.0   # sign of hip-flexion angle that swings the foot forward
    knee_sign: float = -1.0    # sign of knee angle that folds the leg (lifts the foot)
    stride: float = 0.35       # rad of hip swing amplitude per m/s of commanded speed
    lift: float = 0.5          # rad of knee fold at mid-swing
    k_speed: float = 0.3       # rad of hip offset per m/s of speed error
    k_roll: float = 0.3        # rad of abduction per unit of lateral gravity
    k_pitch: float = 0.3       # rad of hip flexion per unit of longitudinal gravity
    duty_shift: float = 0.0    # phase lead of knee fold relative to hip swing, rad


GAITS: dict[str, Gait] = {  # from examples/tune_gaits.py (seed 0)
    "a1": Gait(thigh_sign=1.0, knee_sign=1.0, stride=0.6, lift=0.5, k_speed=0.3, k_roll=0.3,
               k_pitch=0.3, duty_shift=0.0),
    "aliengo": Gait(thigh_sign=1.0, knee_sign=1.0, stride=0.206, lift=0.601, k_speed=0.457,
                    k_roll=0.399, k_pitch=0.906, duty_shift=0.662),
    "laikago": Gait(thigh_sign=1.0, knee_sign=1.0, stride=0.1, lift=0.5, k_speed=0.326,
                    k_roll=0.109, k_pitch=0.571, duty_shift=0.493),
    "mini_cheetah": Gait(thigh_sign=1.0, knee_sign=1.0, stride=1.2, lift=0.814, k_speed=-0.017,
                         k_roll=0.181, k_pitch=-0.993, duty_shift=0.122),
    "spot": Gait(thigh_sign=1.0, knee_sign=1.0, stride=0.243, lift=0.225, k_speed=0.66,
                 k_roll=0.049, k_pitch=-0.611, duty_shift=-0.51),
}

# Trot: diagonal legs together. Legs in policy order are FR/FL/RR/RL-like groups of 3; the phase
# offset of leg k is 0 for legs 0 and 3, pi for legs 1 and 2.
TROT_OFFSETS = np.array([0.0, np.pi, np.pi, 0.0])


def locomotion_action(env: RobotEnv, obs: np.ndarray, gait: Gait) -> np.ndarray:
    r = env.robot
    g_b, v_b, cmd = obs[0:3], obs[3:6], obs[9]
    phase = np.arctan2(obs[10], obs[11])
    target = np.zeros(env.n)
    for k in range(env.n // 3):
        ph = phase + TROT_OFFSETS[k % 4]
        # The hip swings forward while cos(ph) > 0; the foot is lifted during that half.
        hip = gait.stride * cmd * np.sin(ph) + gait.k_speed * (cmd - v_b[0]) + gait.k_pitch * g_b[0]
        knee = gait.lift * max(0.0, np.cos(ph + gait.duty_shift))
        target[3 * k: 3 * k + 3] = [gait.k_roll * g_b[1], gait.thigh_sign * hip,
                                    gait.knee_sign * knee]
    return np.clip(target / r.joints.action_scale, -r.joints.action_clip, r.joints.action_clip)


def reach_action(env: RobotEnv, gain: float = 0.5, max_step: float = 0.15,
                 damping: float = 0.05) -> np.ndarray:
    p, c = env.p, env.cid
    q, _ = env._joint_state()
    full = np.zeros(env.n_movable)
    full[env.driven_pos] = q
    zeros = [0.0] * env.n_movable
    ee_state = p.getLinkState(env.body, env.ee, computeForwardKinematics=True, physicsClientId=c)
    # Jacobian of the ee link frame origin: local offset from the CoM frame to the link frame.
    com_to_frame = p.multiplyTransforms(*p.invertTransform(ee_state[0], ee_state[1]),
                                        ee_state[4], ee_state[5])[0]
    jac_t, _ = p.calculateJacobian(env.body, env.ee, com_to_frame, list(full), zeros, zeros,
                                   physicsClientId=c)
    J = np.asarray(jac_t)[:, env.driven_pos]
    err = env.goal - np.asarray(ee_state[4])
    dq = J.T @ np.linalg.solve(J @ J.T + damping**2 * np.eye(3), gain * err)
    dq = np.clip(dq, -max_step, max_step)
    target = q + dq - env.q0
    r = env.robot
    return np.clip(target / r.joints.action_scale, -r.joints.action_clip, r.joints.action_clip)


def expert_action(env: RobotEnv, obs: np.ndarray) -> np.ndarray:
    if env.family == "locomotion":
        return locomotion_action(env, obs, GAITS.get(env.robot.name, Gait()))
    return reach_action(env)


def evaluate_expert(robot, episodes: int = 20, seed: int = 0, stream: str = "report"):
    """Score of the scripted expert on the episodes `xcompile eval --stream STREAM --seed SEED`
    scores a policy on (`xcompile.seeds`)."""
    env = RobotEnv(robot)
    res = EvalResult(robot=env.robot.name, seed=seed, stream=stream, scores=[])
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=episode_seed(stream, seed, i))
            while True:
                obs, _, term, trunc, info = env.step(expert_action(env, obs))
                res.steps += 1
                if term or trunc:
                    break
            res.scores.append(float(info["score"]))
            res.falls += int(env.fell)
    finally:
        env.close()
    return res
