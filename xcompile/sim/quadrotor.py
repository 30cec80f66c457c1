"""The quadrotor world: a rigid airframe with rotors in PyBullet, and its setpoint task.

Physics (at `physics_hz`, `control_hz` / `physics_hz` substeps per action):

* each rotor's normalised speed u in [0, 1] follows its command (a + 1) / 2 with first-order lag,
  `motor_time_constant_up_s` when rising and `_down_s` when falling (exact discretisation);
* a rotor pushes along body z with thrust T(u) = c0 + c1 u + c2 u^2 (the TOML's thrust curve, at
  least 0) and twists the body about z by spin * torque_per_thrust * T;
* the total force and the total torque (thrust about the rotor arms plus drag torque) are applied
  at the centre of mass, in the world frame, to one PyBullet rigid body with the airframe's mass
  and principal inertia; gravity 9.81 m/s^2; no ground effect, no drag.

The task: start from a perturbed state near home (`task.start_*`: position offset, a rotation
about a random axis, velocity, body rates; the rotors at hover speed) and hold a setpoint; every
`task.setpoint_period_s` a new setpoint within `task.setpoint_radius_m` of home. Each step scores
`exp(-d / 10 cm)`, d the distance to the setpoint; touching the ground or leaving the safety box
around home is a crash, which ends the episode with its remaining steps counted 0. The world
varies per episode: total thrust x U(0.95, 1.05), mass x U(0.95, 1.05), and pushes (a velocity
kick of 0.1-0.3 m/s every 2-4 s); `Randomization.off()` keeps the nominal airframe and no pushes.

Observation and action are RAPTOR's (foundation-policy, trained in l2f), so that it flies here
without an adapter: observation (22) = position - setpoint (world, FLU), the rotation matrix body
to world (row-major), linear velocity (world), angular velocity (body), the previous action (4);
action = one command in [-1, 1] per rotor, in the TOML's `rotors` order.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from xcompile.sim.tasks import QUADROTOR_OBS_LAYOUT as OBS_LAYOUT
from xcompile.sim.tasks import Faults, Randomization
from xcompile.sim.world import PyBulletEnv
from xcompile.targets import RobotTarget

POSITION_SCALE_M = 0.1       # a step's score is exp(-distance / this)
SETTLED_M = 0.1              # "settling time": until the distance stays within this
THRUST_SCALE = (0.95, 1.05)
MASS_SCALE = (0.95, 1.05)
PUSH_EVERY_S = (2.0, 4.0)
PUSH_MPS = (0.1, 0.3)
GRAVITY = 9.81


def quadrotor_step_score(distance_m: float) -> float:
    return math.exp(-distance_m / POSITION_SCALE_M)


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / max(np.linalg.norm(v), 1e-9)


def _in_ball(rng: np.random.Generator, radius: float) -> np.ndarray:
    return _random_unit(rng) * radius * rng.uniform() ** (1 / 3)


class QuadrotorEnv(PyBulletEnv):
    """The quadrotor family's environment (same API as `xcompile.sim.env.RobotEnv`)."""

    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"], "render_fps": 25}

    def __init__(self, robot: RobotTarget, faults: Faults | None = None,
                 render_mode: str | None = None, randomization: Randomization | None = None):
        import pybullet as p

        self.robot, self.p = robot, p
        self.set_faults(faults)
        self.randomization = randomization or Randomization()
        self.render_mode = render_mode
        self.family = "quadrotor"
        af, task = robot.airframe, robot.task
        self.af = af
        self.n = len(af.rotors)
        self.substeps = robot.substeps
        self.dt = 1.0 / robot.control_hz
        self.max_steps = robot.episode_steps
        self.setpoint_steps = max(1, round(task.setpoint_period_s * robot.control_hz))
        self.arms = np.asarray(af.rotor_positions_m, dtype=np.float64)
        self.drag = np.asarray(af.rotor_spin, dtype=np.float64) * af.torque_per_thrust_m
        self.u_hover = af.hover_speed()
        self.home = np.array([0.0, 0.0, task.home_height_m])
        od = sum(w for _, w in OBS_LAYOUT)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (od,), np.float32)
        self.action_space = gym.spaces.Box(-af.action_clip, af.action_clip, (self.n,), np.float32)
        self.cid = p.connect(p.DIRECT)
        self._build_world(mass=af.mass_kg)
        self.t = 0
        self.fell = False

    # ---------------------------------------------------------------- world
    def _build_world(self, mass: float) -> None:
        p, c, af = self.p, self.cid, self.af
        p.resetSimulation(physicsClientId=c)
        p.setPhysicsEngineParameter(fixedTimeStep=self.dt / self.substeps, physicsClientId=c)
        p.setGravity(0, 0, -GRAVITY, physicsClientId=c)
        half = [s / 2 for s in af.size_m]
        shape = p.createCollisionShape(p.GEOM_BOX, halfExtents=half, physicsClientId=c)
        self.body = p.createMultiBody(mass, shape, -1, self.home.tolist(), [0, 0, 0, 1],
                                      physicsClientId=c)
        p.changeDynamics(self.body, -1, mass=mass, localInertiaDiagonal=list(af.inertia_kgm2),
                         linearDamping=0, angularDamping=0,
                         activationState=p.ACTIVATION_STATE_DISABLE_SLEEPING, physicsClientId=c)
        self.mass = mass

    def _state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(position, rotation body -> world, linear velocity (world), angular velocity (body))."""
        p, c = self.p, self.cid
        pos, orn = p.getBasePositionAndOrientation(self.body, physicsClientId=c)
        lin, ang = p.getBaseVelocity(self.body, physicsClientId=c)
        rot = np.array(p.getMatrixFromQuaternion(orn)).reshape(3, 3)
        return np.array(pos), rot, np.array(lin), rot.T @ np.array(ang)

    def rotor_thrusts(self, u: np.ndarray) -> np.ndarray:
        c0, c1, c2 = self.af.thrust_curve_n
        return self.thrust_scale * np.maximum(0.0, c0 + c1 * u + c2 * u * u)

    def _physics(self, command: np.ndarray) -> None:
        p, c, af = self.p, self.cid, self.af
        h = self.dt / self.substeps
        k_up = 1 - math.exp(-h / af.motor_time_constant_up_s)
        k_down = 1 - math.exp(-h / af.motor_time_constant_down_s)
        for _ in range(self.substeps):
            self.u += np.where(command > self.u, k_up, k_down) * (command - self.u)
            thrust = self.rotor_thrusts(self.u)
            force_b = np.array([0.0, 0.0, thrust.sum()])
            # arm x (0, 0, T) = (y T, -x T, 0) per rotor, plus each rotor's drag torque about z
            torque_b = np.array([(self.arms[:, 1] * thrust).sum(),
                                 -(self.arms[:, 0] * thrust).sum(),
                                 (self.drag * thrust).sum()])
            pos, orn = p.getBasePositionAndOrientation(self.body, physicsClientId=c)
            rot = np.array(p.getMatrixFromQuaternion(orn)).reshape(3, 3)
            p.applyExternalForce(self.body, -1, (rot @ force_b).tolist(), pos, p.WORLD_FRAME,
                                 physicsClientId=c)
            p.applyExternalTorque(self.body, -1, (rot @ torque_b).tolist(), p.WORLD_FRAME,
                                  physicsClientId=c)
            p.stepSimulation(physicsClientId=c)

    def _obs(self) -> np.ndarray:
        pos, rot, lin, ang_b = self._state()
        obs = np.concatenate([pos - self.setpoint, rot.reshape(-1), lin, ang_b,
                              self.last_action]).astype(np.float32)
        if self.faults.obs_noise_std:
            obs += self.np_random.normal(0, self.faults.obs_noise_std, obs.shape).astype(np.float32)
        return obs

    # ---------------------------------------------------------------- gym API
    def set_faults(self, faults: Faults | None) -> None:
        """The faults of the episodes from the next reset on (None: none)."""
        faults = faults or Faults()
        if faults.locked_joint is not None or faults.weak_joints or faults.payload_share:
            from xcompile.errors import TargetError

            raise TargetError(f"{self.robot.name}: a locked joint, a weak joint or a payload given "
                              "as a share, is not a fault this quadrotor model has (torque_scale "
                              "and payload_kg are)")
        self.faults = faults

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options and "faults" in options:
            self.set_faults(options["faults"])
        p, c, rng = self.p, self.cid, self.np_random
        task, rand = self.robot.task, self.randomization
        mass = self.af.mass_kg * (rng.uniform(*MASS_SCALE) if rand.enabled else 1.0) \
            + self.faults.payload_kg
        self.thrust_scale = (rng.uniform(*THRUST_SCALE) if rand.enabled else 1.0) \
            * self.faults.torque_scale
        self._build_world(mass)
        start = self.home + _in_ball(rng, task.start_offset_m)
        orn = p.getQuaternionFromAxisAngle(_random_unit(rng).tolist(),
                                           rng.uniform(0, task.start_angle_rad))
        p.resetBasePositionAndOrientation(self.body, start.tolist(), orn, physicsClientId=c)
        lin = _in_ball(rng, task.start_speed_mps)
        rot = np.array(p.getMatrixFromQuaternion(orn)).reshape(3, 3)
        ang = rot @ _in_ball(rng, task.start_rate_rps)
        p.resetBaseVelocity(self.body, lin.tolist(), ang.tolist(), physicsClientId=c)
        self.u = np.full(self.n, self.u_hover)
        self.last_action = np.full(self.n, 2 * self.u_hover - 1)
        self._pending: list[np.ndarray] = []
        self.setpoint = self.home.copy()
        self.next_push = self._next_push(0)
        self.t = 0
        self.score_sum = 0.0
        self.fell = False
        self.sq_err_sum = 0.0
        self.last_outside = 0       # the last step of this setpoint's period outside SETTLED_M
        self.settle_times_s: list[float] = []
        self.setpoints = 0
        return self._obs(), {}

    def _next_push(self, now: int) -> int | None:
        if not self.randomization.enabled:
            return None
        return now + max(1, round(self.np_random.uniform(*PUSH_EVERY_S) / self.dt))

    def step(self, action):
        got = self._action_in(action, idle=self.last_action)   # hover until the first arrives
        if got is None:
            return self._obs(), -10.0, True, False, {"score": self.score(), "invalid_action": True}
        a, applied = got
        info: dict[str, Any] = {}
        if self.next_push is not None and self.t >= self.next_push:
            lin, ang = self.p.getBaseVelocity(self.body, physicsClientId=self.cid)
            kick = _random_unit(self.np_random) * self.np_random.uniform(*PUSH_MPS)
            self.p.resetBaseVelocity(self.body, (np.array(lin) + kick).tolist(), ang,
                                     physicsClientId=self.cid)
            self.next_push = self._next_push(self.t)
        self._physics(np.clip((applied + 1) / 2, 0.0, 1.0))
        self.last_action = a
        self.t += 1
        pos = self._state()[0]
        d = float(np.linalg.norm(pos - self.setpoint))
        box = self.robot.task.safety_box_m
        if pos[2] <= self.af.size_m[2] / 2 or np.any(np.abs(pos - self.home) > box):
            self.fell = True
            info["score"] = self.score()
            return self._obs(), -2.0, True, False, info
        step_score = quadrotor_step_score(d)
        self.score_sum += step_score
        self.sq_err_sum += d * d
        self._track_settling(d)
        if self.t % self.setpoint_steps == 0 and self.t < self.max_steps:
            self.setpoint = self.home + _in_ball(self.np_random, self.robot.task.setpoint_radius_m)
        truncated = self.t >= self.max_steps
        if truncated:
            info["score"] = self.score()
        return self._obs(), step_score, False, truncated, info

    def _track_settling(self, d: float) -> None:
        """Settling time of each setpoint period: until the distance entered SETTLED_M for the
        rest of the period (a period that ends outside does not count as settled)."""
        k = (self.t - 1) % self.setpoint_steps + 1     # steps into this setpoint's period
        if d > SETTLED_M:
            self.last_outside = k
        if k == self.setpoint_steps or self.t >= self.max_steps:
            if d <= SETTLED_M:
                self.settle_times_s.append(self.last_outside * self.dt)
            self.setpoints += 1
            self.last_outside = 0

    def episode_metrics(self) -> dict[str, float | None]:
        steps = max(self.t, 1)
        return {"position_rmse_m": math.sqrt(self.sq_err_sum / steps),
                "settling_time_s": (float(np.mean(self.settle_times_s))
                                    if self.settle_times_s else None),
                "setpoints": self.setpoints,
                "setpoints_settled": len(self.settle_times_s),
                "crashed": bool(self.fell),
                "duration_s": self.t * self.dt}
