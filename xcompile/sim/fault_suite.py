"""The fault suite: the faults a deployed robot meets, by name, each sized for the body.

    locked-joint  joint 2 in policy order (a knee on every quadruped here, an arm's third joint)
                  seized at its default angle
    weak-leg      the first leg's three joints (a quadruped) or joint 1 (an arm's shoulder) at
                  55% of their torque limit
    payload       25% of the body's total mass added to the base (a free-floating base only: on
                  a fixed arm the base does not move, so the fault does not apply)
    delay         the actions reach the motors one control step late
    obs-noise     Gaussian noise of std 0.05 on every observation entry

`fault_suite(robot)` lists them, with None where a fault does not apply to the body;
`named_fault(robot, name)` is one of them, for `xcompile eval --fault NAME`; `training_schedule
(robot)` the faults robust training runs episode by episode (`faults = "suite"` of rl-finetune and
distill, `xcompile build --robust`): every even episode nominal, the odd ones each applicable
fault in turn, so half the data is of a healthy body and the rest covers every fault. The quadrotor model
has none of the joint faults; it gets `delay` and `obs-noise`.
"""

from __future__ import annotations

from dataclasses import dataclass

from xcompile.errors import XCompileError
from xcompile.sim.tasks import Faults
from xcompile.targets import RobotTarget

FAULT_NAMES = ("locked-joint", "weak-leg", "payload", "delay", "obs-noise")
LOCKED_JOINT = 2
WEAK_SCALE = 0.55
PAYLOAD_SHARE = 0.25
DELAY_STEPS = 1
OBS_NOISE_STD = 0.05


@dataclass(frozen=True)
class NamedFault:
    name: str
    faults: Faults | None      # None: the fault does not apply to this body
    detail: str


def _weak(robot: RobotTarget) -> tuple[tuple[int, ...], str]:
    names = robot.joints.names
    if robot.family == "locomotion" and robot.n_joints >= 12 and robot.n_joints % 3 == 0:
        return (0, 1, 2), f"{', '.join(names[:3])} at {WEAK_SCALE:.0%} torque"
    return (1,), f"{names[1]} at {WEAK_SCALE:.0%} torque"


def fault_suite(robot: RobotTarget) -> list[NamedFault]:
    """Every fault of the suite for `robot`, in FAULT_NAMES order."""
    delay = NamedFault("delay", Faults(action_delay_steps=DELAY_STEPS),
                       f"{DELAY_STEPS} control step ({1000 * DELAY_STEPS / robot.control_hz:g} "
                       "ms) late")
    noise = NamedFault("obs-noise", Faults(obs_noise_std=OBS_NOISE_STD),
                       f"std {OBS_NOISE_STD} on every entry")
    if robot.family == "quadrotor":
        na = "n/a: the quadrotor model has no joints"
        return [NamedFault("locked-joint", None, na), NamedFault("weak-leg", None, na),
                NamedFault("payload", None, "n/a: see bench/quadrotor.py"), delay, noise]
    weak, weak_detail = _weak(robot)
    payload = (NamedFault("payload", None, "n/a: a fixed base does not carry it")
               if robot.fixed_base else
               NamedFault("payload", Faults(payload_share=PAYLOAD_SHARE),
                          f"+{PAYLOAD_SHARE:.0%} of the body's mass on the base"))
    return [NamedFault("locked-joint", Faults(locked_joint=LOCKED_JOINT),
                       f"{robot.joints.names[LOCKED_JOINT]} held at its default angle"),
            NamedFault("weak-leg", Faults(weak_joints=weak, weak_scale=WEAK_SCALE), weak_detail),
            payload, delay, noise]


def named_fault(robot: RobotTarget, name: str) -> Faults:
    """The suite's fault `name` for `robot`; an error that says what to choose otherwise."""
    if name not in FAULT_NAMES:
        raise XCompileError(f"unknown fault {name!r}: choose one of {', '.join(FAULT_NAMES)}")
    fault = next(f for f in fault_suite(robot) if f.name == name)
    if fault.faults is None:
        raise XCompileError(f"fault {name!r} does not apply to {robot.name} ({fault.detail})")
    return fault.faults


@dataclass(frozen=True)
class FaultSchedule:
    """Episode i's faults: None on even episodes, else `faults[(i // 2) % len(faults)]`.
    Picklable, so simulator worker processes get it as it is."""

    faults: tuple[Faults, ...]

    def __call__(self, episode: int) -> Faults | None:
        if episode % 2 == 0 or not self.faults:
            return None
        return self.faults[(episode // 2) % len(self.faults)]


FaultsArg = Faults | FaultSchedule | None
"""What an env batch takes: the same faults for every episode, a schedule, or none."""


def training_schedule(robot: RobotTarget) -> FaultSchedule:
    return FaultSchedule(tuple(f.faults for f in fault_suite(robot) if f.faults is not None))


def episode_options(faults: FaultsArg, episode: int) -> dict | None:
    """`reset(options=...)` of episode `episode` under `faults` (None where the env's own
    faults, fixed at construction, hold)."""
    return {"faults": faults(episode)} if isinstance(faults, FaultSchedule) else None


def fixed_faults(faults: FaultsArg) -> Faults | None:
    """The faults an env is built with: a schedule sets them per episode instead."""
    return None if isinstance(faults, FaultSchedule) else faults
