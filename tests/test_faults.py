"""The fault suite changes the physics it claims to: a locked joint does not move, a weak motor's
torque is capped, a payload adds the mass it says; every body gets the suite, sized for it."""

from __future__ import annotations

import numpy as np
import pytest

from xcompile.errors import TargetError, XCompileError
from xcompile.sim.env import Faults, RobotEnv
from xcompile.sim.fault_suite import (
    FAULT_NAMES,
    PAYLOAD_SHARE,
    WEAK_SCALE,
    fault_suite,
    named_fault,
    training_schedule,
)
from xcompile.sim.tasks import Randomization
from xcompile.targets import list_robots, load_robot


class _TorqueLog:
    """PyBullet as the env sees it, with every torque it sends in TORQUE_CONTROL mode logged
    (PyBullet's getJointState reports 0 applied torque in that mode)."""

    def __init__(self, p):
        self._p, self.torques = p, []

    def __getattr__(self, name):
        return getattr(self._p, name)

    def setJointMotorControlArray(self, body, jids, mode, **kw):
        if mode == self._p.TORQUE_CONTROL:
            self.torques.append(np.abs(kw["forces"]))
        return self._p.setJointMotorControlArray(body, jids, mode, **kw)


def _drive(env: RobotEnv, steps: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Step `env` with large random actions; return |joint angle - default| per control step
    (steps, n) and |torque| sent per physics step (steps x substeps, n)."""
    rng = np.random.default_rng(seed)
    clip = env.robot.joints.action_clip
    env.reset(seed=seed)
    env.p = log = _TorqueLog(env.p)
    dq = []
    for _ in range(steps):
        env.step(rng.uniform(-clip, clip, env.n))
        q, _ = env._joint_state()
        dq.append(q - env.q0)
        if env.fell:
            break
    return np.abs(np.array(dq)), np.array(log.torques)


@pytest.mark.parametrize("name", ["a1", "panda"])
def test_a_locked_joint_does_not_move(name):
    robot = load_robot(name)
    locked = named_fault(robot, "locked-joint")
    k = locked.locked_joint
    free_dq, _ = _drive(RobotEnv(robot))
    locked_dq, _ = _drive(RobotEnv(robot, faults=locked))
    assert free_dq[:, k].max() > 0.2               # the same actions move it when healthy
    assert locked_dq[:, k].max() < 0.06            # reset jitter is 0.05 rad
    assert np.delete(locked_dq, k, axis=1).max() > 0.2   # the other joints still move


@pytest.mark.parametrize("name", ["a1", "panda"])
def test_a_weak_motor_is_capped_at_its_share_of_torque(name):
    robot = load_robot(name)
    weak = named_fault(robot, "weak-leg")
    env = RobotEnv(robot, faults=weak)
    limit = np.asarray(robot.joints.torque_limit)
    cap = WEAK_SCALE * limit * env.randomization.motor_strength[1]
    _, tau = _drive(env)
    w = list(weak.weak_joints)
    healthy = [j for j in range(robot.n_joints) if j not in w]
    assert np.all(tau[:, w] <= cap[w] + 1e-6)
    assert np.any(tau[:, w] > 0.9 * WEAK_SCALE * limit[w] * env.randomization.motor_strength[0])
    assert np.any(tau[:, healthy] > cap[healthy])  # a healthy motor does go past the cap


def test_a_payload_adds_its_share_of_the_body_mass():
    robot = load_robot("a1")
    plain = RobotEnv(robot, randomization=Randomization.off())  # no random base mass
    loaded = RobotEnv(robot, faults=named_fault(robot, "payload"),
                      randomization=Randomization.off())
    for env in (plain, loaded):
        env.reset(seed=0)
    base = [env.p.getDynamicsInfo(env.body, -1, physicsClientId=env.cid)[0]
            for env in (plain, loaded)]
    assert base[1] - base[0] == pytest.approx(PAYLOAD_SHARE * plain.total_mass, rel=1e-6)
    assert loaded.total_mass == pytest.approx((1 + PAYLOAD_SHARE) * plain.total_mass, rel=1e-6)


@pytest.mark.parametrize("name", list_robots())
def test_every_body_gets_the_suite(name):
    robot = load_robot(name)
    suite = fault_suite(robot)
    assert [f.name for f in suite] == list(FAULT_NAMES)
    applies = {f.name for f in suite if f.faults is not None}
    assert applies == ({"locked-joint", "weak-leg", "delay", "obs-noise"} if robot.fixed_base
                       else set(FAULT_NAMES))
    for f in suite:
        if f.faults is not None:
            RobotEnv(robot, faults=f.faults).close()    # every fault builds a world
        else:
            with pytest.raises(XCompileError, match="does not apply"):
                named_fault(robot, f.name)


def test_bad_faults_are_refused():
    robot = load_robot("a1")
    with pytest.raises(XCompileError, match="unknown fault 'wobble'"):
        named_fault(robot, "wobble")
    with pytest.raises(TargetError, match="joint 12"):
        RobotEnv(robot, faults=Faults(weak_joints=(12,), weak_scale=0.5))


# ------------------------------------------------------------------------ robust training


def test_the_training_schedule_alternates_nominal_and_each_fault():
    robot = load_robot("a1")
    sched = training_schedule(robot)
    suite = [f.faults for f in fault_suite(robot)]
    assert [sched(i) for i in range(0, 12, 2)] == [None] * 6
    assert [sched(i) for i in range(1, 11, 2)] == suite           # every fault, in turn
    assert len(training_schedule(load_robot("panda")).faults) == 4   # no payload on an arm


def test_episodes_run_under_their_scheduled_faults():
    """evaluate and LockstepEnvs give episode i the schedule's faults: scores equal those of the
    same episode run with that fault fixed."""
    from xcompile.evaluate import evaluate
    from xcompile.sim.vec import LockstepEnvs

    robot = load_robot("a1")
    sched = training_schedule(robot)

    def policy(obs):                                  # stand still, a little wobble from obs
        return 0.5 * np.tanh(obs[:, -robot.n_joints:])

    mixed = evaluate(policy, robot, episodes=4, stream="finetune-train", faults=sched).scores
    for i in range(4):
        alone = evaluate(policy, robot, episodes=1, stream="finetune-train", first_episode=i,
                         faults=sched(i)).scores[0]
        assert mixed[i] == pytest.approx(alone, abs=1e-9)
    with LockstepEnvs(robot, 3, 0, sched, stream="finetune-train") as vec:
        vec.reset()
        assert [e.faults for e in vec.envs] == [Faults(), sched(1), Faults()]


def test_robust_sets_faults_on_the_passes_that_train():
    from xcompile.errors import PlanError
    from xcompile.manager.settings import resolve_settings

    s = resolve_settings(cli_cfg={"robust": True})
    cfg = {step.name: step.config for step in s.plan}
    assert cfg["rl-finetune"].faults == "suite" and cfg["distill"].faults == "suite"
    assert s.sources["rl-finetune.faults"] == "cli"
    assert resolve_settings().plan[1].config.faults == "none"     # not robust by default
    with pytest.raises(PlanError, match="--robust"):
        resolve_settings(cli_cfg={"robust": True,
                                  "passes": ["pin-embodiment", "export-onnx"]})


def test_build_report_has_the_robustness_table(competent_fat_ckpt, short_toml, tmp_path):
    """`xcompile build --robustness`: every fault of the suite × (fat, final) on the report's
    episodes, paired ratios, in report.json and report.md; a fixed arm's payload is n/a."""
    from xcompile.build import run_build
    from xcompile.manager.settings import resolve_settings
    from xcompile.robustness import fault_table
    from xcompile.sim.fault_suite import fault_suite

    s = resolve_settings(None, {}, {"profile": "fast",
                                    "passes": ["pin-embodiment", "export-onnx", "quantize"]})
    res = run_build(competent_fat_ckpt, short_toml["panda"], None, s.plan, tmp_path / "out",
                    tmp_path / "cache", profile=s.profile, episodes=2, rollout=False,
                    robustness=True)
    rb = res.report["robustness"]
    robot = load_robot("panda")
    assert [r["fault"] for r in rb["faults"]] == ["none (nominal)"] + [
        f.name for f in fault_suite(robot)]
    assert rb["policies"] == ["fat", "final"]            # no rl-finetune in this plan
    rows = {r["fault"]: r for r in rb["faults"]}
    assert not rows["payload"]["applies"]
    nominal = next(st for st in res.report["stages"] if st["name"] == "quantize")
    assert rows["none (nominal)"]["final"] == pytest.approx(nominal["score"], abs=1e-3)
    assert rows["locked-joint"]["fat"] < rows["none (nominal)"]["fat"]   # the fault bites
    for r in rb["faults"]:
        if r["applies"]:
            assert r["final_over_fat"] == pytest.approx(r["final"] / r["fat"], rel=1e-2)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Robustness: the fault suite" in md and "| locked-joint |" in md
    with pytest.raises(ValueError, match="fat"):
        fault_table({"final": lambda o: o}, robot, 1, 0)
