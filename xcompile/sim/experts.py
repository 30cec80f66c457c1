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


GAITS: dict[str, Gait] = {
    "a1": Gait(),
    "aliengo": Gait(),
    "laikago": Gait(),
    "mini_cheetah": Gait(thigh_sign=1.0, knee_sign=1.0),
    "spot": Gait(),
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
