"""Typed loader for robot and hardware TOML files.

A robot is named (`spot`, a file in `robots/`) or given as a path to a TOML file whose URDF lies
beside it; both give the same `RobotTarget`, so a body that ships with nobody is usable everywhere a
built-in one is. Validation errors name the file and the bad field.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from xcompile.errors import TargetError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HERE = Path(__file__).parent
ROBOTS_DIR = HERE / "robots"
HARDWARE_DIR = HERE / "hardware"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Joints(_Strict):
    names: list[str] = Field(min_length=1, description="movable URDF joints, in policy order")
    default: list[float] = Field(description="default pose, rad, one per joint")
    kp: list[float] = Field(description="PD stiffness, Nm/rad, one per joint")
    kd: list[float] = Field(description="PD damping, Nm s/rad, one per joint")
    torque_limit: list[float] = Field(description="torque limit, Nm, one per joint")
    action_scale: float = Field(gt=0, description="rad of target offset per unit of action")
    action_clip: float = Field(gt=0, description="actions are clipped to [-clip, clip]")

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


class LocomotionTask(_Strict):
    family: Literal["locomotion"]
    episode_s: float = Field(gt=0, description="episode length, s")
    command_vx_mps: tuple[float, float] = Field(description="range of commanded forward speed")
    gait_hz: float = Field(gt=0, description="gait clock frequency given to the policy")
    spawn_height_m: float = Field(gt=0, description="base height at reset")
    fall_height_m: float = Field(gt=0, description="base below this height counts as a fall")


class ReachTask(_Strict):
    family: Literal["reach"]
    episode_s: float = Field(gt=0)
    ee_link: str = Field(description="URDF link whose origin must reach the goal")
    tolerance_m: float = Field(gt=0, description="success radius")
    goal_joint_range: float = Field(
        gt=0, description="goals are FK of default pose +- this (rad), so always reachable"
    )


class RobotTarget(_Strict):
    name: str
    description: str = ""
    urdf: str = Field(description="'pybullet_data:REL' or a path relative to the TOML file")
    fixed_base: bool
    gravity_compensation: bool = Field(
        default=False, description="the robot's own controller adds gravity torques (arms)"
    )
    control_hz: float = Field(gt=0, le=1000)
    physics_hz: float = Field(gt=0, le=10000)
    hardware: str = Field(default="cpu", description="default hardware target")
    joints: Joints
    task: LocomotionTask | ReachTask = Field(discriminator="family")
    source: str = Field(default="", description="where the TOML was loaded from (set by loader)")

    @property
    def n_joints(self) -> int:
        return len(self.joints.names)

    @property
    def family(self) -> str:
        return self.task.family

    def urdf_path(self) -> Path:
        if self.urdf.startswith("pybullet_data:"):
            import pybullet_data

            return Path(pybullet_data.getDataPath()) / self.urdf.split(":", 1)[1]
        base = Path(self.source).parent if self.source else ROBOTS_DIR
        return (base / self.urdf).resolve()


class HardwareTarget(_Strict):
    name: str
    description: str = ""
    runtime: Literal["onnxruntime-cpu", "tensorrt"]
    precisions: list[Literal["fp32", "fp16", "int8"]] = Field(min_length=1)
    latency_budget_us: float = Field(gt=0)
    memory_mb: float = Field(gt=0)
    source: str = ""


def _read_toml(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise TargetError(f"{path}: no such file") from e
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"{path}: not valid TOML ({e})") from e


def _validation_message(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid target"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def _resolve(name_or_path: str | Path, folder: Path, kind: str) -> Path:
    s = str(name_or_path)
    if s.endswith(".toml") or "/" in s or Path(s).exists() and Path(s).is_file():
        return Path(s)
    path = folder / f"{s}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.toml")))
        raise TargetError(
            f"unknown {kind} target '{s}'. Built-in: {known}. "
            f"Or give a path to a {kind} TOML file."
        )
    return path


def load_robot(name_or_path: str | Path) -> RobotTarget:
    """Load a built-in robot by name, or any robot TOML by path."""
    path = _resolve(name_or_path, ROBOTS_DIR, "robot")
    data = _read_toml(path)
    data["source"] = str(path.resolve())
    try:
        robot = RobotTarget.model_validate(data)
    except ValidationError as e:
        raise TargetError(_validation_message(path, e)) from None
    if not robot.urdf_path().exists():
        raise TargetError(f"{path}: urdf '{robot.urdf}' not found at {robot.urdf_path()}")
    return robot


def load_hardware(name_or_path: str | Path) -> HardwareTarget:
    path = _resolve(name_or_path, HARDWARE_DIR, "hardware")
    data = _read_toml(path)
    data["source"] = str(path.resolve())
    try:
        return HardwareTarget.model_validate(data)
    except ValidationError as e:
        raise TargetError(_validation_message(path, e)) from None


def list_robots() -> list[str]:
    return sorted(p.stem for p in ROBOTS_DIR.glob("*.toml"))


def list_hardware() -> list[str]:
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.toml"))
