"""What a foreign policy's interface says it expects of the world, checked against a target.

An interface may state the control period, the axis convention, the observation's slices and the
action's order and range (RAPTOR's does: `examples/raptor/convert.py`). Each one given must be what
the target's world gives, or the policy would be driven with the wrong units, order or rate.
"""

from __future__ import annotations

from typing import Any

from xcompile.errors import InterfaceError
from xcompile.targets import RobotTarget


def check_conventions(iface: Any, robot: RobotTarget, where: str) -> None:
    """What the interface (an `xcompile.frontends.interface.Interface`) says the policy expects
    of the world (control period, axes, observation slices, action order and range), where it
    says it, against what `robot`'s world gives."""
    from xcompile.sim.tasks import obs_layout

    period = 1.0 / robot.control_hz
    if iface.control_period_s is not None and abs(iface.control_period_s - period) > 1e-9 * period:
        raise InterfaceError(f"{where}: control_period_s: the policy steps every "
                             f"{iface.control_period_s:g} s, target {robot.name!r} every "
                             f"{period:g} s (control_hz {robot.control_hz:g})")
    if iface.frame is not None and robot.family != "quadrotor":
        raise InterfaceError(f"{where}: frame: only a quadrotor policy names an axis convention "
                             f"(xcompile's quadrotor world is FLU); remove it for {robot.family}")
    if iface.obs_layout is not None:
        theirs = [s.size for s in iface.obs_layout]
        ours = obs_layout(robot)
        if theirs != [w for _, w in ours]:
            raise InterfaceError(f"{where}: obs_layout: slices of sizes {theirs}, but target "
                                 f"{robot.name!r} observes " + ", ".join(
                                     f"{n} ({w})" for n, w in ours))
    spec = iface.action_spec
    if spec is not None:
        if list(spec.order) != robot.actuators:
            raise InterfaceError(f"{where}: action_spec.order: the policy's action is "
                                 f"{list(spec.order)}, target {robot.name!r}'s "
                                 f"{robot.actuators}; the orders must be the same")
        clip = robot.action_clip
        if spec.range is not None and tuple(spec.range) != (-clip, clip):
            raise InterfaceError(f"{where}: action_spec.range: {list(spec.range)}, but target "
                                 f"{robot.name!r} takes actions in [{-clip:g}, {clip:g}]")
