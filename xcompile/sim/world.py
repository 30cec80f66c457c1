"""PyBullet clients: the base every task family's env shares (score, frame, close), and loading a
jointed robot target's URDF, the one place that knows URDF joint ids."""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np

from xcompile.errors import TargetError
from xcompile.targets import RobotTarget
from xcompile.targets.loader import check_robot_urdf


class PyBulletEnv(gym.Env):
    """What every task family's env shares: one PyBullet client (`self.p`, `self.cid`), the
    episode's score from per-step scores summed in `self.score_sum` over `self.max_steps`, a
    rendered frame, and closing the client."""

    p: Any
    cid: int | None
    robot: Any
    faults: Any
    _pending: list[np.ndarray]
    score_sum: float
    max_steps: int

    def _action_in(self, action: Any, idle: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(the action clipped to the target's range, what the actuators get this step: the
        action, or under an action-delay fault the one `action_delay_steps` steps old, `idle`
        before there is one); None for an action with NaN or Inf, which ends the episode."""
        clip = self.robot.action_clip
        a = np.clip(np.asarray(action, dtype=np.float64), -clip, clip)
        if not np.all(np.isfinite(a)):
            return None
        if not self.faults.action_delay_steps:
            return a, a
        self._pending.append(a)
        return a, (self._pending.pop(0) if len(self._pending) > self.faults.action_delay_steps
                   else idle)

    def score(self) -> float:
        """The episode's score so far, in [0, 1]: per-step scores summed over the episode's full
        length (so the steps after a fall or crash count 0)."""
        return float(np.clip(self.score_sum / self.max_steps, 0.0, 1.0))

    def render(self):
        from xcompile.sim.render import frame

        return frame(self)

    def close(self):
        if getattr(self, "cid", None) is not None:
            if self.p.isConnected(physicsClientId=self.cid):
                self.p.disconnect(self.cid)
            self.cid = None


def load_body(client: int, robot: RobotTarget,
              base_z: float | None = None) -> tuple[int, list[int]]:
    """Load `robot`'s URDF into `client`; return (body id, PyBullet joint ids in policy order).

    PyBullet parses URDFs in C++ and aborts or segfaults on some hostile ones (a directory, 10,000
    joints), so it is only ever handed a path the loader's URDF check passed (cached, so cheap).
    """
    import pybullet as p

    urdf = check_robot_urdf(robot)
    z = base_z if base_z is not None else getattr(robot.task, "spawn_height_m", 0.0)
    if not math.isfinite(z):
        raise TargetError(f"{robot.name}: base height {z} is not a finite number")
    try:
        body = p.loadURDF(
            str(urdf), [0, 0, z], useFixedBase=robot.fixed_base,
            physicsClientId=client,
        )
    except p.error as e:
        raise TargetError(
            f"{robot.name}: PyBullet cannot load URDF {urdf}: {e}") from e
    by_name = {}
    for i in range(p.getNumJoints(body, physicsClientId=client)):
        info = p.getJointInfo(body, i, physicsClientId=client)
        if info[2] != p.JOINT_FIXED:
            by_name[info[1].decode()] = i
    if not by_name:
        raise TargetError(f"{robot.name}: URDF {urdf} has no movable joints")
    missing = [n for n in robot.joints.names if n not in by_name]
    if missing:
        raise TargetError(
            f"{robot.name}: joints {missing} are not movable joints of {urdf}; "
            f"movable joints there: {sorted(by_name)}"
        )
    return body, [by_name[n] for n in robot.joints.names]


def link_index(client: int, body: int, link_name: str) -> int:
    import pybullet as p

    for i in range(p.getNumJoints(body, physicsClientId=client)):
        if p.getJointInfo(body, i, physicsClientId=client)[12].decode() == link_name:
            return i
    raise TargetError(f"link '{link_name}' not found in URDF")
