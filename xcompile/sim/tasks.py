"""The tasks every robot target is scored on: what is asked (commands, goals, the world's
variations), how each step is scored, and the observation layout that carries it.

The tasks (in the spirit of legged_gym's velocity tasks):

* locomotion: every `task.command_period_s` a new command (vx, vy, yaw rate) is drawn from the
  robot's ranges (one in ten: stand still). The world varies what a deployment varies
  (`Randomization`): ground friction, base mass (payload), motor strength, and pushes (a kick of
  the base velocity at random times).
* reach: a new goal every `task.goal_period_s`, the end effector at a pose drawn within
  `task.goal_joint_range` of the default pose and inside 90% of the joint limits; motor strength
  varies.

The score is continuous, in [0, 1], the mean over the episode's steps of a per-step score, so it
rewards being fast and precise and is not clipped at "good enough":

* locomotion: `(2 exp(-(e_v / 0.15 m/s)^2) + exp(-(e_yaw / 0.3 rad/s)^2)) / 3`, where e_v is the
  error of the base's planar velocity (heading frame, averaged over 0.2 s) against the command and
  e_yaw that of its yaw rate; a fall ends the episode and its remaining steps count 0.
* reach: `exp(-d / 2 cm)`, d the distance of the end effector to the current goal.

`RobotEnv.episode_metrics()` gives the physical figures behind it (velocity errors, cost of transport,
reach error in mm, time to within 1 cm).

The simulation itself (bodies, PD control, stepping) is `xcompile.sim.env`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from xcompile.errors import TargetError
from xcompile.targets import RobotTarget

GLOBAL_DIMS = {"locomotion": 14, "reach": 9}
# The quadrotor family's observation is RAPTOR's (xcompile.sim.quadrotor): FLU, world frame but
# for the body rates.
QUADROTOR_OBS_LAYOUT = [("position_minus_setpoint", 3), ("rotation_matrix", 9),
                        ("linear_velocity", 3), ("angular_velocity_b", 3), ("previous_action", 4)]

# Score scales (see the module docstring).
VEL_SCALE_MPS = 0.15
YAW_SCALE_RPS = 0.3
REACH_SCALE_M = 0.02
VEL_AVERAGE_S = 0.2          # the base velocity scored is averaged (exponentially) over this
STAND_PROBABILITY = 0.1      # share of commands that are "stand still"
WITHIN_M = 0.01              # reach: "time to within 1 cm"
# distill's weight of a labelled reach step where the hand is far from its goal, against 1 at it
REACH_WEIGHT_FLOOR = 0.05


def obs_dim(robot: RobotTarget) -> int:
    return sum(width for _, width in obs_layout(robot))


def obs_layout(robot: RobotTarget) -> list[tuple[str, int]]:
    """Named slices of the flat observation, in order (recorded in the deployment contract)."""
    if robot.family == "quadrotor":
        return list(QUADROTOR_OBS_LAYOUT)
    n = robot.n_joints
    if robot.family == "locomotion":
        head = [("gravity_b", 3), ("lin_vel_b", 3), ("ang_vel_b_x0.25", 3),
                ("cmd_vx_vy_yaw", 3), ("gait_sin_cos", 2)]
    else:
        head = [("goal_minus_ee_b", 3), ("ee_b", 3), ("goal_b", 3)]
    return head + [("q_minus_default", n), ("qdot_x0.1", n), ("last_action", n)]


def check_numbers(robot: RobotTarget, faults: Faults) -> None:
    """Every number the simulation uses is finite (the loader checks ranges; this also covers a
    RobotTarget built or copied without validation): NaN in PyBullet silently scores 0."""
    j, task = robot.joints, robot.task
    values = {"control_hz": [robot.control_hz], "physics_hz": [robot.physics_hz],
              "joints.default": j.default, "joints.kp": j.kp, "joints.kd": j.kd,
              "joints.torque_limit": j.torque_limit, "joints.action_scale": [j.action_scale],
              "joints.action_clip": [j.action_clip], "task.episode_s": [task.episode_s],
              "faults": [faults.torque_scale, faults.payload_kg, faults.obs_noise_std,
                         faults.weak_scale, faults.payload_share]}
    for field in ("command_vx_mps", "command_vy_mps", "command_yaw_rps", "command_period_s",
                  "goal_period_s", "gait_hz", "spawn_height_m", "fall_height_m", "tolerance_m",
                  "goal_joint_range"):
        if hasattr(task, field):
            v = getattr(task, field)
            values[f"task.{field}"] = list(v) if isinstance(v, tuple) else [v]
    for field, vs in values.items():
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vs):
            raise TargetError(f"{robot.name}: {field} has a value that is not a finite number")
    if robot.control_hz <= 0 or robot.physics_hz <= 0 or task.episode_s <= 0:
        raise TargetError(f"{robot.name}: control_hz, physics_hz and task.episode_s must be > 0")
    bad = [k for k in (*faults.weak_joints, faults.locked_joint)
           if k is not None and not 0 <= k < robot.n_joints]
    if bad:
        raise TargetError(f"{robot.name}: fault names joint {bad[0]}, and the robot has joints "
                          f"0..{robot.n_joints - 1}")
    if len(j.default) != robot.n_joints or not all(
            len(v) == robot.n_joints for v in (j.kp, j.kd, j.torque_limit)):
        raise TargetError(f"{robot.name}: joints.default, kp, kd and torque_limit need one value "
                          "per joint")


@dataclass(frozen=True)
class Randomization:
    """What varies from episode to episode, as on a deployed robot (ranges are uniform).

    Locomotion gets all of it; reach (a fixed arm) only motor strength. `Randomization.off()` is
    the nominal world (tests of the plumbing use it)."""

    friction: tuple[float, float] = (0.5, 1.25)        # ground lateral friction
    base_mass_scale: tuple[float, float] = (0.9, 1.25)  # base mass x this (payload)
    motor_strength: tuple[float, float] = (0.85, 1.05)  # torque limits x this
    push_every_s: tuple[float, float] = (3.0, 5.0)      # time between pushes
    push_mps: tuple[float, float] = (0.2, 0.5)          # horizontal kick of the base velocity
    enabled: bool = True

    @classmethod
    def off(cls) -> Randomization:
        return cls(enabled=False)


@dataclass(frozen=True)
class Faults:
    """Perturbations a deployed robot meets, one episode long (the named suite sized for each
    body is `xcompile.sim.fault_suite`).

    torque_scale        every motor's torque limit x this
    weak_joints         joints (policy order) whose torque limit is also x weak_scale: a weak
    weak_scale          leg or motor
    locked_joint        a seized joint, held at its default angle whatever is commanded
    payload_kg          mass added to the base link
    payload_share       mass added to the base link, as a share of the body's total mass
    action_delay_steps  the actuators get the action this many control steps late
    obs_noise_std       Gaussian noise on every observation entry
    """

    torque_scale: float = 1.0
    locked_joint: int | None = None
    payload_kg: float = 0.0
    action_delay_steps: int = 0
    obs_noise_std: float = 0.0
    weak_joints: tuple[int, ...] = ()
    weak_scale: float = 1.0
    payload_share: float = 0.0


def sample_command(rng: np.random.Generator, task) -> np.ndarray:
    """A locomotion command (vx, vy, yaw rate) from the task's ranges; one in ten is 0."""
    cmd = np.array([rng.uniform(*task.command_vx_mps), rng.uniform(*task.command_vy_mps),
                    rng.uniform(*task.command_yaw_rps)])
    return np.zeros(3) if rng.uniform() < STAND_PROBABILITY else cmd


def locomotion_step_score(vel_error_mps: float, yaw_rate_error_rps: float) -> float:
    return (2 * math.exp(-(vel_error_mps / VEL_SCALE_MPS) ** 2)
            + math.exp(-(yaw_rate_error_rps / YAW_SCALE_RPS) ** 2)) / 3


def reach_step_score(distance_m: float) -> float:
    return math.exp(-distance_m / REACH_SCALE_M)


def step_weights(robot: RobotTarget, obs: np.ndarray) -> np.ndarray | None:
    """How much the action at each observation (rows of `obs`) counts towards the score, for a fit
    to a teacher's actions (distill); None where the family has no such weight (every step alike).

    Reach: the square of the per-step score's sensitivity to the hand's distance d, relative to
    at the goal, exp(-2 d / 2 cm) (a squared error weighted so approximates the squared loss of
    score), plus `REACH_WEIGHT_FLOOR` so the moves between goals are still learned. Near its goal
    an arm's action error of a few thousandths of a radian moves the hand millimetres, and there
    the score falls fastest with them: kuka's student, fitted unweighted, settled further from the
    goals than its teacher (`xcompile.passes.distill`, FAMILY_PROFILE_DEFAULTS)."""
    if robot.family != "reach":
        return None
    at = 0
    for name, width in obs_layout(robot):
        if name == "goal_minus_ee_b":
            break
        at += width
    d = np.linalg.norm(np.asarray(obs, dtype=np.float64)[:, at:at + 3], axis=1)
    return (REACH_WEIGHT_FLOOR + np.exp(-2 * d / REACH_SCALE_M)).astype(np.float32)
