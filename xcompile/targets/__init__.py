"""Robot and hardware targets: typed TOML files, loaded by name or by path."""

from xcompile.targets.loader import (
    HardwareTarget,
    RobotTarget,
    UrdfInfo,
    check_robot_urdf,
    list_hardware,
    list_robots,
    load_hardware,
    load_robot,
    urdf_info,
)

__all__ = [
    "HardwareTarget",
    "RobotTarget",
    "UrdfInfo",
    "check_robot_urdf",
    "list_hardware",
    "list_robots",
    "load_hardware",
    "load_robot",
    "urdf_info",
]
