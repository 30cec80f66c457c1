"""The typed schema of robot and hardware targets, and the numeric bounds every field is held to.

A target file is input from strangers. Its fields are checked by these pydantic models before any
work: names are names (a robot's name becomes the output folder `build/<name>`), paths are plain
text, and every number is finite, of the right type (an int or float in the TOML, never a string or
bool) and inside a stated range. The limits below are far above every real robot's values (see the
built-in TOMLs) and far below what would hang or crash the simulator. Reading the files and checking
the URDF a robot names is `loader.py`'s job.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, model_validator

HERE = Path(__file__).parent
ROBOTS_DIR = HERE / "robots"         # built-in robots, and where their relative URDF paths start
HARDWARE_DIR = HERE / "hardware"     # built-in hardware targets
AIRFRAMES_DIR = HERE / "airframes"   # built-in quadrotors (robot targets without a URDF)

# ---------------------------------------------------------------------------------- limits
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_NAME_LEN = 64
MAX_PATH_LEN = 4096              # PATH_MAX on Linux
MAX_TOML_BYTES = 1_000_000       # the built-in TOMLs are ~1.5 kB
MAX_URDF_BYTES = 20_000_000      # pybullet_data's largest robot URDFs are well under 1 MB
MAX_URDF_JOINTS = 256            # real robots: 6-30; PyBullet tracebacks at ~1,000, segfaults at 10k
MAX_URDF_LINKS = 512
MAX_TEXT_LEN = 2000              # description
MAX_IDENT_LEN = 256              # joint and link names

MAX_ABS_ANGLE = 2 * math.pi      # default pose, rad
MAX_GAIN_KP = 1e5                # Nm/rad   (built-ins: 20-300)
MAX_GAIN_KD = 1e4                # Nm s/rad (built-ins: 0.5-15)
MAX_TORQUE = 1e5                 # Nm       (built-ins: 12-176)
MAX_ACTION_SCALE = 2 * math.pi   # rad per unit of action (built-ins: 0.25, 1.0)
MAX_ACTION_CLIP = 100.0          # (built-ins: 3.2, 4.0)
MIN_CONTROL_HZ, MAX_CONTROL_HZ = 1.0, 1000.0    # built-ins: 50
MAX_PHYSICS_HZ = 10_000.0                       # built-ins: 500
MAX_SUBSTEPS = 100               # physics steps per control step (built-ins: 10)
MAX_EPISODE_S = 120.0            # built-ins: 3-4 s
# Physics steps in one episode (episode_s x physics_hz): 120 s at 2 kHz, ~20 s of CPU at the
# ~80 us a PD-controlled physics step takes here. Built-ins: 1,500-2,000.
MAX_EPISODE_PHYSICS_STEPS = 240_000
MAX_GAIT_HZ = 50.0               # built-ins: 2
MAX_SPEED_MPS = 10.0             # commanded speed, each way (built-ins: up to 1.0)
MAX_YAW_RATE = 10.0              # commanded yaw rate, rad/s, each way (built-ins: up to 1.0)
MAX_HEIGHT_M = 10.0              # spawn height (built-ins: 0.30-0.54)
MAX_TOLERANCE_M = 1.0            # reach success radius (built-ins: 0.05)
MAX_GOAL_RANGE = math.pi         # rad (built-ins: pi, i.e. the joint limits)
MAX_LATENCY_US = 1e7             # 10 s (built-ins: 200, 500)
MAX_MEMORY_MB = 1e6              # 1 TB (built-ins: 512, 1024)


# ---------------------------------------------------------------------------------- models


def _check_name(v: str) -> str:
    if not NAME_PATTERN.fullmatch(v) or ".." in v:
        raise ValueError(
            f"{show(v)} is not a valid name: use 1-{MAX_NAME_LEN} letters, digits, '_', '.' or "
            "'-', starting with a letter or digit, no '..' and no path separators (the name "
            "becomes a folder, build/<name>)")
    return v


def show(s: str, n: int = 60) -> str:
    """A user-given string for a message: quoted, escaped, cut short."""
    r = repr(s)
    return r if len(r) <= n else r[: n - 5] + "...'" + f" ({len(s)} characters)"


def _check_path_text(v: str) -> str:
    if any(ord(c) < 32 or c == "\x7f" for c in v):
        raise ValueError(f"{show(v)} has control characters; give a plain path")
    return v


Name = Annotated[str, AfterValidator(_check_name)]
PathText = Annotated[str, AfterValidator(_check_path_text)]
Ident = Annotated[str, Field(min_length=1, max_length=MAX_IDENT_LEN)]


def _num(**limits: float):
    """A finite number (int or float in the TOML, never a string or bool) within `limits`."""
    return Annotated[float, Field(strict=True, allow_inf_nan=False, **limits)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Joints(_Strict):
    names: list[Ident] = Field(min_length=1, max_length=MAX_URDF_JOINTS,
                               description="movable URDF joints, in policy order")
    default: list[_num(ge=-MAX_ABS_ANGLE, le=MAX_ABS_ANGLE)] = Field(
        max_length=MAX_URDF_JOINTS, description="default pose, rad, one per joint")
    kp: list[_num(ge=0, le=MAX_GAIN_KP)] = Field(
        max_length=MAX_URDF_JOINTS, description="PD stiffness, Nm/rad, one per joint")
    kd: list[_num(ge=0, le=MAX_GAIN_KD)] = Field(
        max_length=MAX_URDF_JOINTS, description="PD damping, Nm s/rad, one per joint")
    torque_limit: list[_num(gt=0, le=MAX_TORQUE)] = Field(
        max_length=MAX_URDF_JOINTS, description="torque limit, Nm, one per joint")
    action_scale: _num(gt=0, le=MAX_ACTION_SCALE) = Field(
        description="rad of target offset per unit of action")
    action_clip: _num(gt=0, le=MAX_ACTION_CLIP) = Field(
        description="actions are clipped to [-clip, clip]")

    @model_validator(mode="after")
    def _lengths(self) -> Joints:
        n = len(self.names)
        for field in ("default", "kp", "kd", "torque_limit"):
            if len(getattr(self, field)) != n:
                raise ValueError(
                    f"joints.{field} has {len(getattr(self, field))} values, "
                    f"joints.names has {n}: give one per joint"
                )
        if len(set(self.names)) != n:
            raise ValueError("joints.names has duplicates")
        return self


def _range(lo_min: float, hi_max: float):
    return tuple[_num(ge=lo_min, le=hi_max), _num(ge=lo_min, le=hi_max)]


class LocomotionTask(_Strict):
    """Velocity tracking: every `command_period_s` a new command (vx, vy, yaw rate) is drawn from
    the ranges (one in ten is "stand still"); the episode is scored per step on how well the base
    follows it (`xcompile.sim.env`)."""

    family: Literal["locomotion"]
    episode_s: _num(gt=0, le=MAX_EPISODE_S) = Field(description="episode length, s")
    command_vx_mps: _range(-MAX_SPEED_MPS, MAX_SPEED_MPS) = Field(
        description="range (lo, hi) of commanded forward speed, m/s (negative: backward)")
    command_vy_mps: _range(-MAX_SPEED_MPS, MAX_SPEED_MPS) = Field(
        default=(-0.2, 0.2), description="range (lo, hi) of commanded sideways speed, m/s")
    command_yaw_rps: _range(-MAX_YAW_RATE, MAX_YAW_RATE) = Field(
        default=(-0.6, 0.6), description="range (lo, hi) of commanded yaw rate, rad/s")
    command_period_s: _num(gt=0, le=MAX_EPISODE_S) = Field(
        default=4.0, description="a new command is drawn every this many seconds")
    gait_hz: _num(gt=0, le=MAX_GAIT_HZ) = Field(
        description="gait clock frequency given to the policy")
    spawn_height_m: _num(gt=0, le=MAX_HEIGHT_M) = Field(description="base height at reset")
    fall_height_m: _num(gt=0, le=MAX_HEIGHT_M) = Field(
        description="base below this height counts as a fall")

    @model_validator(mode="after")
    def _order(self) -> LocomotionTask:
        for field in ("command_vx_mps", "command_vy_mps", "command_yaw_rps"):
            lo, hi = getattr(self, field)
            if lo > hi:
                raise ValueError(f"task.{field} is a range [lo, hi] with lo <= hi; got "
                                 f"[{lo:g}, {hi:g}]")
        if self.fall_height_m >= self.spawn_height_m:
            raise ValueError(f"task.fall_height_m ({self.fall_height_m:g}) must be below "
                             f"task.spawn_height_m ({self.spawn_height_m:g}), or every episode "
                             "starts as a fall")
        return self


class ReachTask(_Strict):
    """Several goals per episode, one every `goal_period_s`, scored per step on the distance of
    the end effector to the current goal."""

    family: Literal["reach"]
    episode_s: _num(gt=0, le=MAX_EPISODE_S)
    ee_link: Ident = Field(description="URDF link whose origin must reach the goal")
    tolerance_m: _num(gt=0, le=MAX_TOLERANCE_M) = Field(
        description="a goal counts as reached (success rate) within this distance at its end")
    goal_joint_range: _num(gt=0, le=MAX_GOAL_RANGE) = Field(
        description="goals are the end effector at a pose drawn within default +- this (rad), "
                    "inside 90% of each joint's limits: always reachable")
    goal_period_s: _num(gt=0, le=MAX_EPISODE_S) = Field(
        default=2.5, description="a new goal every this many seconds")


MAX_MASS_KG = 100.0              # airframes (built-ins: 0.03-2.0)
MAX_INERTIA = 100.0              # kg m^2 (built-ins: 1e-5 - 0.04)
MAX_THRUST_N = 1e4               # one rotor at full command (built-ins: 0.11-16)
MAX_ROTORS = 16
MAX_ARM_M = 10.0


class Airframe(_Strict):
    """A rigid body with rotors (quadrotor family): what `xcompile.sim.quadrotor` simulates.

    Conventions are RAPTOR's (and l2f's, the simulator it was trained in): body frame FLU (x
    forward, y left, z up); the action is one command a in [-1, 1] per rotor, in `rotors` order,
    taken to a normalised rotor speed u = (a + 1) / 2 in [0, 1]; u follows the command with first-
    order lag (`motor_time_constant_*_s`); a rotor pushes along body z with thrust
    `thrust_curve_n[0] + thrust_curve_n[1] u + thrust_curve_n[2] u^2` (N) and twists the body about
    z by `spin * torque_per_thrust_m * thrust` (N m)."""

    rotors: list[Ident] = Field(min_length=3, max_length=MAX_ROTORS,
                                description="rotor names, in action order")
    rotor_positions_m: list[tuple[_num(ge=-MAX_ARM_M, le=MAX_ARM_M),
                                  _num(ge=-MAX_ARM_M, le=MAX_ARM_M),
                                  _num(ge=-MAX_ARM_M, le=MAX_ARM_M)]] = Field(
        max_length=MAX_ROTORS, description="each rotor's position, body frame (FLU), m")
    rotor_spin: list[Literal[-1, 1]] = Field(
        max_length=MAX_ROTORS, description="sign of each rotor's drag torque about body z")
    thrust_curve_n: tuple[_num(ge=-MAX_THRUST_N, le=MAX_THRUST_N),
                          _num(ge=-MAX_THRUST_N, le=MAX_THRUST_N),
                          _num(ge=-MAX_THRUST_N, le=MAX_THRUST_N)] = Field(
        description="(c0, c1, c2): one rotor's thrust c0 + c1 u + c2 u^2, N, u in [0, 1]")
    torque_per_thrust_m: _num(ge=0, le=1.0) = Field(
        description="a rotor's drag torque per newton of its thrust, m")
    motor_time_constant_up_s: _num(gt=0, le=10.0) = Field(
        description="first-order lag of rotor speed when it rises, s")
    motor_time_constant_down_s: _num(gt=0, le=10.0) = Field(
        description="first-order lag of rotor speed when it falls, s")
    mass_kg: _num(gt=0, le=MAX_MASS_KG)
    inertia_kgm2: tuple[_num(gt=0, le=MAX_INERTIA), _num(gt=0, le=MAX_INERTIA),
                        _num(gt=0, le=MAX_INERTIA)] = Field(
        description="principal moments of inertia (xx, yy, zz) about the centre of mass, kg m^2")
    size_m: tuple[_num(gt=0, le=MAX_ARM_M), _num(gt=0, le=MAX_ARM_M),
                  _num(gt=0, le=MAX_ARM_M)] = Field(description="collision box (x, y, z), m")
    action_clip: _num(gt=0, le=MAX_ACTION_CLIP) = Field(
        default=1.0, description="actions are clipped to [-clip, clip] (1: the full range)")

    @model_validator(mode="after")
    def _consistent(self) -> Airframe:
        n = len(self.rotors)
        for field in ("rotor_positions_m", "rotor_spin"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"airframe.{field} has {len(getattr(self, field))} values, "
                                 f"airframe.rotors has {n}: give one per rotor")
        if len(set(self.rotors)) != n:
            raise ValueError("airframe.rotors has duplicates")
        if n * self.thrust(1.0) <= self.mass_kg * 9.81:
            raise ValueError(f"the rotors at full command lift {n * self.thrust(1.0):.3g} N, the "
                             f"airframe weighs {self.mass_kg * 9.81:.3g} N: it cannot hover")
        return self

    def thrust(self, u: float) -> float:
        """One rotor's thrust (N) at normalised speed u, never below 0."""
        c0, c1, c2 = self.thrust_curve_n
        return max(0.0, c0 + c1 * u + c2 * u * u)

    def hover_speed(self) -> float:
        """The normalised rotor speed at which the rotors together carry the airframe's weight."""
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if len(self.rotors) * self.thrust(mid) < self.mass_kg * 9.81 \
                else (lo, mid)
        return 0.5 * (lo + hi)


class QuadrotorTask(_Strict):
    """Hold a setpoint from a perturbed start: every `setpoint_period_s` a new setpoint within
    `setpoint_radius_m` of home; scored per step on the distance to it (`xcompile.sim.quadrotor`)."""

    family: Literal["quadrotor"]
    episode_s: _num(gt=0, le=MAX_EPISODE_S) = Field(description="episode length, s")
    home_height_m: _num(gt=0, le=MAX_HEIGHT_M) = Field(
        default=1.5, description="height of the first setpoint above the ground, m")
    setpoint_period_s: _num(gt=0, le=MAX_EPISODE_S) = Field(
        default=3.0, description="a new setpoint every this many seconds")
    setpoint_radius_m: _num(ge=0, le=MAX_HEIGHT_M) = Field(
        default=0.3, description="later setpoints lie within this distance of home, m")
    start_offset_m: _num(ge=0, le=MAX_HEIGHT_M) = Field(
        default=0.3, description="the start lies within this distance of home, m")
    start_angle_rad: _num(ge=0, le=math.pi / 2) = Field(
        default=0.6, description="the start is rotated by up to this angle about a random "
                                 "axis (tilt and heading), rad")
    start_speed_mps: _num(ge=0, le=MAX_SPEED_MPS) = Field(
        default=0.5, description="the start moves at up to this speed, m/s")
    start_rate_rps: _num(ge=0, le=MAX_YAW_RATE) = Field(
        default=1.0, description="the start spins at up to this body rate, rad/s")
    safety_box_m: _num(gt=0, le=MAX_HEIGHT_M) = Field(
        default=1.0, description="leaving this half-width box around home, or touching the "
                                 "ground, is a crash, m")

    @model_validator(mode="after")
    def _inside(self) -> QuadrotorTask:
        reach = max(self.setpoint_radius_m, self.start_offset_m)
        if reach >= self.safety_box_m or reach >= self.home_height_m:
            raise ValueError(f"task: setpoints and starts reach {reach:g} m from home; keep that "
                             f"inside the safety box ({self.safety_box_m:g} m) and above the "
                             f"ground (home {self.home_height_m:g} m up)")
        return self


class RobotTarget(_Strict):
    """A robot target: a jointed body (`urdf` + `[joints]`: locomotion, reach) or a rigid airframe
    driven by rotors (`[airframe]`: quadrotor, no URDF)."""

    name: Name
    description: str = Field(default="", max_length=MAX_TEXT_LEN)
    urdf: PathText = Field(default="", max_length=MAX_PATH_LEN,
                           description="'pybullet_data:REL' or a path relative to the TOML file "
                           "(jointed bodies; an airframe has none)")
    fixed_base: StrictBool = False
    gravity_compensation: StrictBool = Field(
        default=False, description="the robot's own controller adds gravity torques (arms)"
    )
    control_hz: _num(ge=MIN_CONTROL_HZ, le=MAX_CONTROL_HZ)
    physics_hz: _num(ge=MIN_CONTROL_HZ, le=MAX_PHYSICS_HZ)
    hardware: Name = Field(default="cpu", description="default hardware target (a built-in name)")
    joints: Joints | None = None
    airframe: Airframe | None = None
    task: LocomotionTask | ReachTask | QuadrotorTask = Field(discriminator="family")
    source: str = Field(default="", description="where the TOML was loaded from (set by loader)")

    @model_validator(mode="after")
    def _rates(self) -> RobotTarget:
        if self.task.family == "quadrotor":
            if self.airframe is None or self.joints is not None or self.urdf:
                raise ValueError("a quadrotor target has an [airframe] table and no urdf or "
                                 "[joints] (see xcompile/targets/airframes/crazyflie.toml)")
        elif self.joints is None or not self.urdf or self.airframe is not None:
            raise ValueError(f"a {self.task.family} target has a urdf and a [joints] table, and "
                             "no [airframe] (see xcompile/targets/robots/a1.toml)")
        ratio = self.physics_hz / self.control_hz
        k = round(ratio)
        if k < 1 or abs(ratio - k) > 1e-9 * ratio:
            raise ValueError(f"physics_hz ({self.physics_hz:g}) must be a whole multiple of "
                             f"control_hz ({self.control_hz:g})")
        if k > MAX_SUBSTEPS:
            raise ValueError(f"physics_hz / control_hz is {k}; at most {MAX_SUBSTEPS} physics "
                             "steps per control step")
        steps = round(self.task.episode_s * self.control_hz)
        if steps < 1:
            raise ValueError(f"task.episode_s ({self.task.episode_s:g}) is shorter than one "
                             f"control step (control_hz {self.control_hz:g})")
        if steps * k > MAX_EPISODE_PHYSICS_STEPS:
            raise ValueError(f"task.episode_s x physics_hz is {steps * k:,} physics steps per "
                             f"episode; at most {MAX_EPISODE_PHYSICS_STEPS:,} (e.g. "
                             f"{MAX_EPISODE_S:g} s at {MAX_EPISODE_PHYSICS_STEPS / MAX_EPISODE_S:g} "
                             "Hz): shorten the episode or lower physics_hz")
        return self

    @property
    def n_joints(self) -> int:
        """Width of the action: joints driven, or rotors of an airframe."""
        return len(self.actuators)

    @property
    def actuators(self) -> list[str]:
        """The action's entries in order: joint names, or rotor names of an airframe."""
        return list(self.airframe.rotors if self.airframe else self.joints.names)

    @property
    def action_clip(self) -> float:
        return (self.airframe or self.joints).action_clip

    @property
    def family(self) -> str:
        return self.task.family

    @property
    def substeps(self) -> int:
        """Physics steps per control step (validated: a whole number in [1, MAX_SUBSTEPS])."""
        return max(1, round(self.physics_hz / self.control_hz))

    @property
    def episode_steps(self) -> int:
        """Control steps per episode (validated: at least 1)."""
        return max(1, round(self.task.episode_s * self.control_hz))

    def urdf_path(self) -> Path | None:
        """The URDF's path (None for an airframe, which is built from its TOML)."""
        if not self.urdf:
            return None
        if self.urdf.startswith("pybullet_data:"):
            import pybullet_data  # only for robots that use it: keep `import xcompile` light

            return Path(pybullet_data.getDataPath()) / self.urdf.split(":", 1)[1]
        base = Path(self.source).parent if self.source else ROBOTS_DIR
        return (base / self.urdf).resolve()


class HardwareTarget(_Strict):
    name: Name
    description: str = Field(default="", max_length=MAX_TEXT_LEN)
    runtime: Literal["onnxruntime-cpu", "tensorrt"]
    precisions: list[Literal["fp32", "fp16", "int8"]] = Field(min_length=1, max_length=3)
    latency_budget_us: _num(gt=0, le=MAX_LATENCY_US)
    memory_mb: _num(gt=0, le=MAX_MEMORY_MB)
    source: str = ""
