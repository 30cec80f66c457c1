"""Robot and hardware targets: typed TOML files, loaded by name or by path."""

from xcompile.targets.loader import (
    check_robot_urdf,
    list_airframes,
    list_hardware,
    list_robots,
    load_hardware,
    load_robot,
    urdf_info,
)
from xcompile.targets.schema import HardwareTarget, RobotTarget
from xcompile.targets.urdf import UrdfInfo

__all__ = [
    "HardwareTarget",
    "RobotTarget",
    "UrdfInfo",
    "check_robot_urdf",
    "list_airframes",
    "list_hardware",
    "list_robots",
    "load_hardware",
    "load_robot",
    "urdf_info",
]
