"""Gymnasium environments for a robot target: velocity-tracking locomotion and multi-goal reaching.

Both tasks share one body model: actions are joint position targets around the default pose
(`q* = q0 + action_scale * clip(a)`), tracked by a PD law with torque limits computed by us at the
physics rate (PyBullet's own velocity motors are switched off). The flat observation is

    [global (task-specific) | q - q0 (n) | 0.1 * qdot (n) | last action (n)]

locomotion global (14): gravity in base frame (3), base linear velocity in base frame (3),
    0.25 * base angular velocity (3), the command (vx, vy, yaw rate) (3), sin/cos of the gait
    clock (2);
reach global (9): goal - end effector (3), end effector (3) and goal (3), both in base frame.

The tasks and their score are `xcompile.sim.tasks`'s.

Determinism: a fresh env reset with the same seed and given the same actions gives the same
trajectory (PyBullet has no RNG of its own; all randomness comes from `self.np_random`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from xcompile.errors import TargetError
from xcompile.sim.tasks import (  # noqa: F401  (obs_dim, obs_layout, Faults: re-exported)
    GLOBAL_DIMS,
    REACH_SCALE_M,
    VEL_AVERAGE_S,
    WITHIN_M,
    Faults,
    Randomization,
    check_numbers,
    locomotion_step_score,
    obs_dim,
    obs_layout,
    reach_step_score,
    sample_command,
)
from xcompile.sim.world import PyBulletEnv, link_index, load_body
from xcompile.targets import RobotTarget, load_robot
from xcompile.targets.loader import MAX_EPISODE_PHYSICS_STEPS, MAX_SUBSTEPS


def make_env(robot: RobotTarget | str, faults: Faults | None = None,
             render_mode: str | None = None, randomization: Randomization | None = None):
    """The environment of `robot`'s family: `RobotEnv` for jointed bodies, `QuadrotorEnv`
    (`xcompile.sim.quadrotor`) for airframes. Both have the same API."""
    robot = robot if isinstance(robot, RobotTarget) else load_robot(robot)
    if robot.family == "quadrotor":
        from xcompile.sim.quadrotor import QuadrotorEnv

        return QuadrotorEnv(robot, faults, render_mode, randomization)
    return RobotEnv(robot, faults, render_mode, randomization)


class RobotEnv(PyBulletEnv):
    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"], "render_fps": 25}

    def __init__(self, robot: RobotTarget | str, faults: Faults | None = None,
                 render_mode: str | None = None, randomization: Randomization | None = None):
        import pybullet as p

        self.robot = robot if isinstance(robot, RobotTarget) else load_robot(robot)
        self.randomization = randomization or Randomization()
        self.render_mode = render_mode
        r = self.robot
        self.n = r.n_joints
        self.set_faults(faults)
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
        self.tau_max = self.tau_nominal.copy()
        self.energy_j = 0.0            # |torque x joint speed| summed by _apply_pd, J

        self.p = p
        self.cid = p.connect(p.DIRECT)
        self._build_world()

        od = obs_dim(r)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (od,), np.float32)
        self.action_space = gym.spaces.Box(-j.action_clip, j.action_clip, (self.n,), np.float32)
        self._pending: list[np.ndarray] = []

    def set_faults(self, faults: Faults | None) -> None:
        """The faults of the episodes from the next reset on (None: none); `reset(options=
        {"faults": ...})` does the same for one episode's schedule."""
        self.faults = faults or Faults()
        check_numbers(self.robot, self.faults)
        self.tau_nominal = (np.asarray(self.robot.joints.torque_limit, dtype=np.float64)
                            * self.faults.torque_scale)
        self.tau_nominal[list(self.faults.weak_joints)] *= self.faults.weak_scale

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
            self.plane = p.loadURDF(pybullet_data.getDataPath() + "/plane.urdf",
                                    physicsClientId=self.cid)
            p.changeDynamics(self.plane, -1, lateralFriction=1.0, physicsClientId=self.cid)
        self.body, self.jids = load_body(self.cid, r)
        for link in range(-1, p.getNumJoints(self.body, physicsClientId=self.cid)):
            p.changeDynamics(self.body, link, linearDamping=0, angularDamping=0,
                             activationState=p.ACTIVATION_STATE_DISABLE_SLEEPING,
                             physicsClientId=self.cid)
        links = range(-1, p.getNumJoints(self.body, physicsClientId=self.cid))
        body_mass = sum(p.getDynamicsInfo(self.body, link, physicsClientId=self.cid)[0]
                        for link in links)
        extra = self.faults.payload_kg + self.faults.payload_share * body_mass
        if extra:
            mass = p.getDynamicsInfo(self.body, -1, physicsClientId=self.cid)[0]
            p.changeDynamics(self.body, -1, mass=mass + extra, physicsClientId=self.cid)
        # The body's nominal mass with any payload fault (the cost of transport's divisor).
        self.total_mass = body_mass + extra
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
            lim = [p.getJointInfo(self.body, j, physicsClientId=self.cid)[8:10] for j in self.jids]
            lo = np.array([a if a < b else q - math.pi for (a, b), q in zip(lim, self.q0)])
            hi = np.array([b if a < b else q + math.pi for (a, b), q in zip(lim, self.q0)])
            self.goal_lo, self.goal_hi = lo + 0.05 * (hi - lo), hi - 0.05 * (hi - lo)


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
                                   self.cmd, [math.sin(ph), math.cos(ph)]])
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
        if options and "faults" in options:
            self.set_faults(options["faults"])
        p, c, rng = self.p, self.cid, self.np_random
        r, rand = self.robot, self.randomization
        self.t = 0
        self.last_action = np.zeros(self.n)
        self._pending = []
        self._build_world()
        self.tau_max = self.tau_nominal.copy()
        if rand.enabled:
            self.tau_max *= rng.uniform(*rand.motor_strength)
        q_init = self.q0 + rng.uniform(-0.05, 0.05, self.n)
        for jid, q in zip(self.jids, q_init):
            p.resetJointState(self.body, jid, q, 0.0, physicsClientId=c)
        self.score_sum = 0.0
        if self.family == "locomotion":
            if rand.enabled:
                p.changeDynamics(self.plane, -1, lateralFriction=rng.uniform(*rand.friction),
                                 physicsClientId=c)
                mass = p.getDynamicsInfo(self.body, -1, physicsClientId=c)[0]
                p.changeDynamics(self.body, -1, mass=mass * rng.uniform(*rand.base_mass_scale),
                                 physicsClientId=c)
            p.resetBasePositionAndOrientation(self.body, [0, 0, r.task.spawn_height_m],
                                              [0, 0, 0, 1], physicsClientId=c)
            p.resetBaseVelocity(self.body, [0, 0, 0], [0, 0, 0], physicsClientId=c)
            self.cmd = sample_command(rng, r.task)
            self.cmd_steps = max(1, round(r.task.command_period_s * r.control_hz))
            self.next_push = self._next_push(rng, 0)
            # Let the body settle onto its feet under PD before the clock starts.
            for _ in range(int(0.3 / self.dt)):
                self._apply_pd(self.q0)
            self.v_avg = np.zeros(2)
            self.yaw_rate_avg = 0.0
            self.vel_err_sum = self.yaw_err_sum = self.path_m = 0.0
            self.last_xy = self._base()[0][:2].copy()
        else:
            for jid in self.other_jids:
                p.resetJointState(self.body, jid, 0.0, 0.0, physicsClientId=c)
            self.goal_steps = max(1, round(r.task.goal_period_s * r.control_hz))
            self.goal = self._sample_goal(rng)
            self.goal_errors_m: list[float] = []
            self.goal_times_s: list[float | None] = []
            self.goal_within_at: float | None = None
        self.energy_j = 0.0            # from here: the settling above does not count
        self.fell = False
        return self._obs(), {}

    def _next_push(self, rng: np.random.Generator, now: int) -> int | None:
        if not self.randomization.enabled:
            return None
        return now + max(1, round(rng.uniform(*self.randomization.push_every_s) / self.dt))

    def _push(self, rng: np.random.Generator) -> None:
        p, c = self.p, self.cid
        lin, ang = p.getBaseVelocity(self.body, physicsClientId=c)
        angle = rng.uniform(0, 2 * math.pi)
        kick = rng.uniform(*self.randomization.push_mps)
        p.resetBaseVelocity(self.body, [lin[0] + kick * math.cos(angle),
                                        lin[1] + kick * math.sin(angle), lin[2]], ang,
                            physicsClientId=c)

    def _sample_goal(self, rng: np.random.Generator) -> np.ndarray:
        """The end effector's position at a random pose within default +- goal_joint_range and
        inside 90% of the joint limits, above the floor and away from the base: always
        reachable."""
        p, c = self.p, self.cid
        q, qd = self._joint_state()
        span = self.robot.task.goal_joint_range
        lo = np.maximum(self.goal_lo, self.q0 - span)
        hi = np.minimum(self.goal_hi, self.q0 + span)
        lo, hi = np.minimum(lo, self.q0), np.maximum(hi, self.q0)
        base = np.array(p.getBasePositionAndOrientation(self.body, physicsClientId=c)[0])
        for _ in range(20):
            q_goal = rng.uniform(lo, hi)
            for jid, qg in zip(self.jids, q_goal):
                p.resetJointState(self.body, jid, qg, 0.0, physicsClientId=c)
            goal = self._ee_pos()
            rel = goal - base
            if rel[2] > 0.1 and math.hypot(rel[0], rel[1]) > 0.15:
                break
        for jid, qi, qdi in zip(self.jids, q, qd):
            p.resetJointState(self.body, jid, qi, qdi, physicsClientId=c)
        return goal

    def _apply_pd(self, q_target: np.ndarray) -> None:
        p, c = self.p, self.cid
        for _ in range(self.substeps):
            q, qd = self._joint_state()
            tau = self.kp * (q_target - q) - self.kd * qd
            if self.robot.gravity_compensation:
                tau += self._gravity_torque(q)
            tau = np.clip(tau, -self.tau_max, self.tau_max)
            locked = self.faults.locked_joint
            if locked is not None:
                tau[locked] = 0.0       # held by the solver below, whatever is commanded
            self.energy_j += float(np.sum(np.abs(tau * qd))) * self.dt / self.substeps
            p.setJointMotorControlArray(self.body, self.jids, p.TORQUE_CONTROL, forces=tau,
                                        physicsClientId=c)
            if locked is not None:
                # A seized joint: the solver's motor holds it at its default angle with 50x the
                # motor's torque (an explicit stiff PD here was unstable on light links).
                p.setJointMotorControl2(self.body, self.jids[locked], p.POSITION_CONTROL,
                                        targetPosition=self.q0[locked], targetVelocity=0.0,
                                        force=50.0 * float(self.tau_nominal[locked]),
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
        got = self._action_in(action, idle=np.zeros(self.n))
        if got is None:
            # A policy that emits NaN/Inf ends its episode; the fault is reported, not propagated.
            return self._obs(), -10.0, True, False, {"score": self.score(), "invalid_action": True}
        a, applied = got
        info: dict[str, Any] = {}
        if self.family == "locomotion" and self.next_push is not None and self.t >= self.next_push:
            self._push(self.np_random)
            self.next_push = self._next_push(self.np_random, self.t)
        self._apply_pd(self.q0 + self.robot.joints.action_scale * applied)
        prev_action = self.last_action
        self.last_action = a
        self.t += 1
        terminated, step_score = self._step_score()
        self.score_sum += step_score
        smooth = 0.01 * float(np.sum((a - prev_action) ** 2))
        reward = -2.0 if terminated else step_score - smooth
        self._advance_task()
        obs = self._obs()
        truncated = self.t >= self.max_steps and not terminated
        if terminated or truncated:
            info["score"] = self.score()
        return obs, reward, terminated, truncated, info

    def _step_score(self) -> tuple[bool, float]:
        """(fell, this step's score in [0, 1])."""
        if self.family == "locomotion":
            pos, rot, lin, ang = self._base()
            if pos[2] < self.robot.task.fall_height_m or rot[2, 2] < 0.5:
                self.fell = True
                return True, 0.0
            yaw = math.atan2(rot[1, 0], rot[0, 0])
            c, s = math.cos(yaw), math.sin(yaw)
            v_heading = np.array([c * lin[0] + s * lin[1], -s * lin[0] + c * lin[1]])
            alpha = min(1.0, self.dt / VEL_AVERAGE_S)
            self.v_avg += alpha * (v_heading - self.v_avg)
            self.yaw_rate_avg += alpha * (ang[2] - self.yaw_rate_avg)
            e_v = float(np.linalg.norm(self.v_avg - self.cmd[:2]))
            e_yaw = abs(float(self.yaw_rate_avg - self.cmd[2]))
            self.vel_err_sum += e_v
            self.yaw_err_sum += e_yaw
            self.path_m += float(np.linalg.norm(pos[:2] - self.last_xy))
            self.last_xy = pos[:2].copy()
            return False, locomotion_step_score(e_v, e_yaw)
        d = float(np.linalg.norm(self._ee_pos() - self.goal))
        if d < WITHIN_M and self.goal_within_at is None:
            self.goal_within_at = ((self.t - 1) % self.goal_steps + 1) * self.dt
        if self.t % self.goal_steps == 0 or self.t >= self.max_steps:
            self.goal_errors_m.append(d)
            self.goal_times_s.append(self.goal_within_at)
        return False, reach_step_score(d)

    def _advance_task(self) -> None:
        """A new command or goal where its period ends (after this step's score)."""
        if self.t >= self.max_steps:
            return
        if self.family == "locomotion" and self.t % self.cmd_steps == 0:
            self.cmd = sample_command(self.np_random, self.robot.task)
        elif self.family == "reach" and self.t % self.goal_steps == 0:
            self.goal = self._sample_goal(self.np_random)
            self.goal_within_at = None


    def episode_metrics(self) -> dict[str, float | None]:
        """The physical figures of the episode so far (the score's components)."""
        steps = max(self.t, 1)
        if self.family == "locomotion":
            per_m = self.energy_j / self.path_m if self.path_m > 0.1 else None
            return {"vel_error_mps": self.vel_err_sum / steps,
                    "yaw_rate_error_rps": self.yaw_err_sum / steps,
                    "energy_per_m_j": per_m,
                    "cost_of_transport": None if per_m is None else per_m / (self.total_mass * 9.81),
                    "duration_s": self.t * self.dt}
        errors = self.goal_errors_m or [float(np.linalg.norm(self._ee_pos() - self.goal))]
        times = [t for t in self.goal_times_s if t is not None]
        return {"reach_error_mm": 1000 * float(np.mean(errors)),
                "goals": len(self.goal_errors_m),
                "goals_within_tolerance": sum(e <= self.robot.task.tolerance_m
                                              for e in self.goal_errors_m),
                "goals_within_1cm": len(times),
                "time_to_1cm_s": float(np.mean(times)) if times else None}
