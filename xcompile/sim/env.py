"""Gymnasium environments for a robot target: velocity-commanded locomotion and reaching.

Both tasks share one body model: actions are joint position targets around the default pose
(`q* = q0 + action_scale * clip(a)`), tracked by a PD law with torque limits computed by us at the
physics rate (PyBullet's own velocity motors are switched off). The flat observation is

    [global (task-specific) | q - q0 (n) | 0.1 * qdot (n) | last action (n)]

locomotion global (12): gravity in base frame (3), base linear velocity in base frame (3),
    0.25 * base angular velocity (3), commanded forward speed (1), sin/cos of the gait clock (2);
reach global (9): goal - end effector (3), end effector (3) and goal (3), both in base frame.

Every episode ends with `info["score"]` in [0, 1]: locomotion scores distance made good along the
command over commanded distance (0 after a fall); reach scores 1 within tolerance at the end, else
half of the fraction of the initial distance that was closed.

Determinism: a fresh env reset with the same seed and given the same actions gives the same
trajectory (PyBullet has no RNG of its own; all randomness comes from `self.np_random`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from xcompile.errors import TargetError
from xcompile.sim.render import frame
from xcompile.sim.world import link_index, load_body
from xcompile.targets import RobotTarget, load_robot
from xcompile.targets.loader import MAX_EPISODE_PHYSICS_STEPS, MAX_SUBSTEPS

GLOBAL_DIMS = {"locomotion": 12, "reach": 9}


def obs_dim(robot: RobotTarget) -> int:
    return GLOBAL_DIMS[robot.family] + 3 * robot.n_joints


def obs_layout(robot: RobotTarget) -> list[tuple[str, int]]:
    """Named slices of the flat observation, in order (recorded in the deployment contract)."""
    n = robot.n_joints
    if robot.family == "locomotion":
        head = [("gravity_b", 3), ("lin_vel_b", 3), ("ang_vel_b_x0.25", 3), ("cmd_vx", 1),
                ("gait_sin_cos", 2)]
    else:
        head = [("goal_minus_ee_b", 3), ("ee_b", 3), ("goal_b", 3)]
    return head + [("q_minus_default", n), ("qdot_x0.1", n), ("last_action", n)]


def _check_numbers(robot: RobotTarget, faults: Faults) -> None:
    """Every number the simulation uses is finite (the loader checks ranges; this also covers a
    RobotTarget built or copied without validation): NaN in PyBullet silently scores 0."""
    j, task = robot.joints, robot.task
    values = {"control_hz": [robot.control_hz], "physics_hz": [robot.physics_hz],
              "joints.default": j.default, "joints.kp": j.kp, "joints.kd": j.kd,
              "joints.torque_limit": j.torque_limit, "joints.action_scale": [j.action_scale],
              "joints.action_clip": [j.action_clip], "task.episode_s": [task.episode_s],
              "faults": [faults.torque_scale, faults.payload_kg, faults.obs_noise_std]}
    for field in ("command_vx_mps", "gait_hz", "spawn_height_m", "fall_height_m", "tolerance_m",
                  "goal_joint_range"):
        if hasattr(task, field):
            v = getattr(task, field)
            values[f"task.{field}"] = list(v) if isinstance(v, tuple) else [v]
    for field, vs in values.items():
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vs):
            raise TargetError(f"{robot.name}: {field} has a value that is not a finite number")
    if robot.control_hz <= 0 or robot.physics_hz <= 0 or task.episode_s <= 0:
        raise TargetError(f"{robot.name}: control_hz, physics_hz and task.episode_s must be > 0")
    if len(j.default) != robot.n_joints or not all(
            len(v) == robot.n_joints for v in (j.kp, j.kd, j.torque_limit)):
        raise TargetError(f"{robot.name}: joints.default, kp, kd and torque_limit need one value "
                          "per joint")


@dataclass(frozen=True)
class Faults:
    """Perturbations a deployed robot meets (used by robustness benchmarks)."""

    torque_scale: float = 1.0
    locked_joint: int | None = None
    payload_kg: float = 0.0
    action_delay_steps: int = 0
    obs_noise_std: float = 0.0


class RobotEnv(gym.Env):
    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"], "render_fps": 25}

    def __init__(self, robot: RobotTarget | str, faults: Faults | None = None,
                 render_mode: str | None = None):
        import pybullet as p

        self.robot = robot if isinstance(robot, RobotTarget) else load_robot(robot)
        self.faults = faults or Faults()
        self.render_mode = render_mode
        r = self.robot
        _check_numbers(r, self.faults)
        self.n = r.n_joints
        self.family = r.family
        self.substeps = max(1, round(r.physics_hz / r.control_hz))
        self.dt = 1.0 / r.control_hz
        self.max_steps = max(1, round(r.task.episode_s * r.control_hz))
        if self.substeps > MAX_SUBSTEPS or self.max_steps * self.substeps > \
                MAX_EPISODE_PHYSICS_STEPS:
            raise TargetError(
                f"{r.name}: an episode would take {self.max_steps} control steps of "
                f"{self.substeps} physics steps; at most {MAX_SUBSTEPS} physics steps per control "
                f"step and {MAX_EPISODE_PHYSICS_STEPS} per episode")
        j = r.joints
        self.q0 = np.asarray(j.default, dtype=np.float64)
        self.kp = np.asarray(j.kp, dtype=np.float64)
        self.kd = np.asarray(j.kd, dtype=np.float64)
        self.tau_max = np.asarray(j.torque_limit, dtype=np.float64) * self.faults.torque_scale

        self.p = p
        self.cid = p.connect(p.DIRECT)
        self._build_world()

        od = obs_dim(r)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (od,), np.float32)
        self.action_space = gym.spaces.Box(-j.action_clip, j.action_clip, (self.n,), np.float32)
        self._pending: list[np.ndarray] = []

    def _build_world(self) -> None:
        """(Re)create the world in our client. Done at every reset: hand-resetting joints leaves
        PyBullet's contact caches behind, so a second episode with the same seed could differ
        (seen on laikago's mesh feet); a rebuilt world starts from the same solver state."""
        import pybullet_data

        p, r = self.p, self.robot
        p.resetSimulation(physicsClientId=self.cid)
        p.setPhysicsEngineParameter(fixedTimeStep=1.0 / (self.substeps * r.control_hz),
                                    deterministicOverlappingPairs=1,
                                    physicsClientId=self.cid)
        p.setGravity(0, 0, -9.81, physicsClientId=self.cid)
        if r.family == "locomotion":
            plane = p.loadURDF(pybullet_data.getDataPath() + "/plane.urdf",
                               physicsClientId=self.cid)
            p.changeDynamics(plane, -1, lateralFriction=1.0, physicsClientId=self.cid)
        self.body, self.jids = load_body(self.cid, r)
        for link in range(-1, p.getNumJoints(self.body, physicsClientId=self.cid)):
            p.changeDynamics(self.body, link, linearDamping=0, angularDamping=0,
                             activationState=p.ACTIVATION_STATE_DISABLE_SLEEPING,
                             physicsClientId=self.cid)
        if self.faults.payload_kg:
            mass = p.getDynamicsInfo(self.body, -1, physicsClientId=self.cid)[0]
            p.changeDynamics(self.body, -1, mass=mass + self.faults.payload_kg,
                             physicsClientId=self.cid)
        # Real PD: switch off the default velocity motors, we apply torques ourselves.
        p.setJointMotorControlArray(self.body, self.jids, p.VELOCITY_CONTROL,
                                    forces=[0.0] * self.n, physicsClientId=self.cid)
        if r.family == "reach":
            self.ee = link_index(self.cid, self.body, r.task.ee_link)
            # Joints of the URDF that the policy does not drive (e.g. fingers) are held still.
            self.other_jids = [
                i for i in range(p.getNumJoints(self.body, physicsClientId=self.cid))
                if i not in self.jids
                and p.getJointInfo(self.body, i, physicsClientId=self.cid)[2] != p.JOINT_FIXED
            ]
            movable = sorted(self.jids + self.other_jids)
            self.n_movable = len(movable)
            self.driven_pos = [movable.index(j) for j in self.jids]


    # ---------------------------------------------------------------- state
    def _joint_state(self) -> tuple[np.ndarray, np.ndarray]:
        st = self.p.getJointStates(self.body, self.jids, physicsClientId=self.cid)
        return (np.array([s[0] for s in st]), np.array([s[1] for s in st]))

    def _base(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        p, c = self.p, self.cid
        pos, orn = p.getBasePositionAndOrientation(self.body, physicsClientId=c)
        lin, ang = p.getBaseVelocity(self.body, physicsClientId=c)
        rot = np.array(p.getMatrixFromQuaternion(orn)).reshape(3, 3)
        return np.array(pos), rot, np.array(lin), np.array(ang)

    def _ee_pos(self) -> np.ndarray:
        return np.array(self.p.getLinkState(self.body, self.ee, computeForwardKinematics=True,
                                            physicsClientId=self.cid)[4])

    def _obs(self) -> np.ndarray:
        q, qd = self._joint_state()
        pos, rot, lin, ang = self._base()
        if self.family == "locomotion":
            ph = 2 * math.pi * self.robot.task.gait_hz * self.t * self.dt
            head = np.concatenate([rot.T @ np.array([0, 0, -1.0]), rot.T @ lin, 0.25 * (rot.T @ ang),
                                   [self.cmd_vx], [math.sin(ph), math.cos(ph)]])
        else:
            ee = rot.T @ (self._ee_pos() - pos)
            goal = rot.T @ (self.goal - pos)
            head = np.concatenate([goal - ee, ee, goal])
        obs = np.concatenate([head, q - self.q0, 0.1 * qd, self.last_action]).astype(np.float32)
        if self.faults.obs_noise_std:
            obs += self.np_random.normal(0, self.faults.obs_noise_std, obs.shape).astype(np.float32)
        return obs

    # ---------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        p, c, rng = self.p, self.cid, self.np_random
        r = self.robot
        self.t = 0
        self.last_action = np.zeros(self.n)
        self._pending = []
        self._build_world()
        q_init = self.q0 + rng.uniform(-0.05, 0.05, self.n)
        for jid, q in zip(self.jids, q_init):
            p.resetJointState(self.body, jid, q, 0.0, physicsClientId=c)
        if self.family == "locomotion":
            p.resetBasePositionAndOrientation(self.body, [0, 0, r.task.spawn_height_m],
                                              [0, 0, 0, 1], physicsClientId=c)
            p.resetBaseVelocity(self.body, [0, 0, 0], [0, 0, 0], physicsClientId=c)
            lo, hi = r.task.command_vx_mps
            self.cmd_vx = float(rng.uniform(lo, hi))
            # Let the body settle onto its feet under PD before the clock starts.
            for _ in range(int(0.3 / self.dt)):
                self._apply_pd(self.q0)
            self.start_xy = self._base()[0][:2].copy()
        else:
            for jid in self.other_jids:
                p.resetJointState(self.body, jid, 0.0, 0.0, physicsClientId=c)
            self.goal = self._sample_goal(rng)
            self.start_dist = float(np.linalg.norm(self._ee_pos() - self.goal))
        self.fell = False
        return self._obs(), {}

    def _sample_goal(self, rng: np.random.Generator) -> np.ndarray:
        """A goal that is the end effector's position at a random nearby pose: always reachable."""
        p, c = self.p, self.cid
        q, _ = self._joint_state()
        span = self.robot.task.goal_joint_range
        q_goal = self.q0 + rng.uniform(-span, span, self.n)
        for jid, qg in zip(self.jids, q_goal):
            p.resetJointState(self.body, jid, qg, 0.0, physicsClientId=c)
        goal = self._ee_pos()
        for jid, qi in zip(self.jids, q):
            p.resetJointState(self.body, jid, qi, 0.0, physicsClientId=c)
        return goal

    def _apply_pd(self, q_target: np.ndarray) -> None:
        p, c = self.p, self.cid
        for _ in range(self.substeps):
            q, qd = self._joint_state()
            tau = self.kp * (q_target - q) - self.kd * qd
            if self.robot.gravity_compensation:
                tau += self._gravity_torque(q)
            tau = np.clip(tau, -self.tau_max, self.tau_max)
            if self.faults.locked_joint is not None:
                # A seized joint: held at its current angle by a stiff motor, whatever we command.
                k = self.faults.locked_joint
                tau[k] = 20 * self.kp[k] * (self.q0[k] - q[k]) - 5 * self.kd[k] * qd[k]
            p.setJointMotorControlArray(self.body, self.jids, p.TORQUE_CONTROL, forces=tau,
                                        physicsClientId=c)
            if self.family == "reach" and self.other_jids:
                p.setJointMotorControlArray(self.body, self.other_jids, p.POSITION_CONTROL,
                                            targetPositions=[0.0] * len(self.other_jids),
                                            physicsClientId=c)
            p.stepSimulation(physicsClientId=c)

    def _gravity_torque(self, q: np.ndarray) -> np.ndarray:
        # Fixed-base arms only: inverse dynamics at zero velocity and acceleration over all
        # movable joints of the URDF (undriven ones are held at 0).
        full = np.zeros(self.n_movable)
        full[self.driven_pos] = q
        zeros = [0.0] * self.n_movable
        g = self.p.calculateInverseDynamics(self.body, list(full), zeros, zeros,
                                            physicsClientId=self.cid)
        return np.asarray(g)[self.driven_pos]

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float64), -self.robot.joints.action_clip,
                    self.robot.joints.action_clip)
        info: dict[str, Any] = {}
        if not np.all(np.isfinite(a)):
            # A policy that emits NaN/Inf ends its episode; the fault is reported, not propagated.
            info.update(score=0.0, invalid_action=True)
            return self._obs(), -10.0, True, False, info
        applied = a
        if self.faults.action_delay_steps:
            self._pending.append(a)
            applied = (self._pending.pop(0) if len(self._pending) > self.faults.action_delay_steps
                       else np.zeros(self.n))
        self._apply_pd(self.q0 + self.robot.joints.action_scale * applied)
        prev_action = self.last_action
        self.last_action = a
        self.t += 1
        obs = self._obs()
        terminated, reward = self._reward_and_done(a, prev_action)
        truncated = self.t >= self.max_steps and not terminated
        if terminated or truncated:
            info["score"] = self.score()
        return obs, reward, terminated, truncated, info

    def _reward_and_done(self, a: np.ndarray, prev: np.ndarray) -> tuple[bool, float]:
        smooth = 0.01 * float(np.sum((a - prev) ** 2))
        if self.family == "locomotion":
            pos, rot, lin, ang = self._base()
            up = rot[2, 2]  # z of body up axis in world: cos of tilt
            if pos[2] < self.robot.task.fall_height_m or up < 0.5:
                self.fell = True
                return True, -2.0
            vx = lin[0]
            track = math.exp(-((vx - self.cmd_vx) ** 2) / 0.05)
            return False, track + 0.2 - 0.5 * lin[1] ** 2 - 0.05 * ang[2] ** 2 - smooth
        d = float(np.linalg.norm(self._ee_pos() - self.goal))
        return False, -d + (0.5 if d < self.robot.task.tolerance_m else 0.0) - smooth

    def score(self) -> float:
        """Normalised task score of the episode so far, in [0, 1]."""
        if self.family == "locomotion":
            if self.fell:
                return 0.0
            pos, *_ = self._base()
            made_good = float(pos[0] - self.start_xy[0])
            commanded = self.cmd_vx * self.robot.task.episode_s
            if not commanded > 0:  # the loader requires a positive command; never divide by 0
                return 0.0
            return float(np.clip(made_good / commanded, 0.0, 1.0))
        d = float(np.linalg.norm(self._ee_pos() - self.goal))
        if d <= self.robot.task.tolerance_m:
            return 1.0
        return float(0.5 * np.clip(1.0 - d / max(self.start_dist, 1e-6), 0.0, 1.0))

    def render(self):

        return frame(self)

    def close(self):
        if getattr(self, "cid", None) is not None:
            if self.p.isConnected(physicsClientId=self.cid):
                self.p.disconnect(self.cid)
            self.cid = None
