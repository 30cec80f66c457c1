"""Loading a robot target into a PyBullet client: the one place that knows URDF joint ids."""

from __future__ import annotations

from xcompile.errors import TargetError
from xcompile.targets import RobotTarget


def load_body(client: int, robot: RobotTarget,
              base_z: float | None = None) -> tuple[int, list[int]]:
    """Load `robot`'s URDF into `client`; return (body id, PyBullet joint ids in policy order)."""
    import pybullet as p

    z = base_z if base_z is not None else getattr(robot.task, "spawn_height_m", 0.0)
    try:
        body = p.loadURDF(
            str(robot.urdf_path()), [0, 0, z], useFixedBase=robot.fixed_base,
            physicsClientId=client,
        )
    except p.error as e:
        raise TargetError(
            f"{robot.name}: PyBullet cannot load URDF {robot.urdf_path()}: {e}") from e
    by_name = {}
    for i in range(p.getNumJoints(body, physicsClientId=client)):
        info = p.getJointInfo(body, i, physicsClientId=client)
        if info[2] != p.JOINT_FIXED:
            by_name[info[1].decode()] = i
    if not by_name:
        raise TargetError(f"{robot.name}: URDF {robot.urdf_path()} has no movable joints")
    missing = [n for n in robot.joints.names if n not in by_name]
    if missing:
        raise TargetError(
            f"{robot.name}: joints {missing} are not movable joints of {robot.urdf_path()}; "
            f"movable joints there: {sorted(by_name)}"
        )
    return body, [by_name[n] for n in robot.joints.names]


def link_index(client: int, body: int, link_name: str) -> int:
    import pybullet as p

    for i in range(p.getNumJoints(body, physicsClientId=client)):
        if p.getJointInfo(body, i, physicsClientId=client)[12].decode() == link_name:
            return i
    raise TargetError(f"link '{link_name}' not found in URDF")
