"""Robot and hardware targets: typed TOML files, loaded by name or by path."""

from xcompile.targets.loader import (
    HardwareTarget,
    RobotTarget,
    list_hardware,
    list_robots,
    load_hardware,
    load_robot,
)

__all__ = [
    "HardwareTarget",
    "RobotTarget",
    "list_hardware",
    "list_robots",
    "load_hardware",
    "load_robot",
]
