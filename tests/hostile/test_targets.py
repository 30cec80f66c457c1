"""Hostile robot and hardware targets: every bad name, path, number or URDF gets one TargetError.

Nothing here may give a traceback, hang, or reach PyBullet's C++ URDF parser (which aborts on a
directory and segfaults on a 10,000-joint robot).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xcompile.cli import app
from xcompile.errors import TargetError
from xcompile.targets import list_hardware, list_robots, load_hardware, load_robot, urdf_info
from xcompile.targets import loader as L

ROOT = Path(__file__).resolve().parents[2]
A1_TOML = (L.ROBOTS_DIR / "a1.toml").read_text()
PANDA_TOML = (L.ROBOTS_DIR / "panda.toml").read_text()
SPOT_TOML = (L.ROBOTS_DIR / "spot.toml").read_text()
CPU_TOML = (L.HARDWARE_DIR / "cpu.toml").read_text()


def _edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def no_pybullet(monkeypatch):
    """Fail loudly if anything hands a URDF to PyBullet."""
    import pybullet

    calls = []

    def forbidden(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"PyBullet was asked to load {args[:1]}")

    monkeypatch.setattr(pybullet, "loadURDF", forbidden)
    return calls


# ------------------------------------------------------------------------------ the real targets


def test_every_real_target_still_loads():
    for name in list_robots():
        r = load_robot(name)
        info = urdf_info(r.urdf_path())
        assert set(r.joints.names) <= set(info.movable)
        assert r.substeps == 10
    arm = load_robot(ROOT / "examples" / "unseen_arm" / "arm5.toml")
    assert arm.name == "arm5" and arm.n_joints == 5
    for name in list_hardware():
        assert load_hardware(name).name == name


# ------------------------------------------------------------------------------ 1. names


BAD_NAMES = ["../../x", "/tmp/x", "a/b", "x" * 300, "..", ".hidden", "a..b", "", "sp ot",
             "a\\b", "spot\n", "ünï"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_robot_name_must_be_a_name(tmp_path, bad):
    toml = _write(tmp_path / "r.toml", _edit(A1_TOML, 'name = "a1"', f"name = {_q(bad)}"))
    with pytest.raises(TargetError) as e:
        load_robot(toml)
    msg = str(e.value)
    assert str(toml) in msg and "name" in msg and "Traceback" not in msg


@pytest.mark.parametrize("bad", ["../../x", "/tmp/x", "a/b", "x" * 300])
def test_hardware_names_must_be_names(tmp_path, bad):
    hw = _write(tmp_path / "h.toml", _edit(CPU_TOML, 'name = "cpu"', f"name = {_q(bad)}"))
    with pytest.raises(TargetError, match="name"):
        load_hardware(hw)
    # A robot's default hardware is a built-in hardware name too.
    toml = _write(tmp_path / "r.toml", _edit(A1_TOML, 'hardware = "cpu"', f"hardware = {_q(bad)}"))
    with pytest.raises(TargetError, match="hardware"):
        load_robot(toml)


def test_good_unusual_names_load(tmp_path):
    for good in ("A-1", "a1.v2", "x" * 64, "9_lives"):
        toml = _write(tmp_path / "r.toml", _edit(A1_TOML, 'name = "a1"', f'name = "{good}"'))
        assert load_robot(toml).name == good


def _q(s: str) -> str:
    """A TOML basic string."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# ------------------------------------------------------------------------------ 2. --target values


def test_target_that_is_a_directory(tmp_path):
    for arg in (tmp_path, str(tmp_path), str(tmp_path) + "/", str(L.ROBOTS_DIR)):
        with pytest.raises(TargetError, match="is a directory"):
            load_robot(arg)
    with pytest.raises(TargetError, match="is a directory"):
        load_hardware(str(tmp_path))


@pytest.mark.parametrize("arg, message", [
    ("nowhere/robot.toml", "no such file"),
    ("missing.toml", "no such file"),
    ("x" * 300, "neither a built-in robot name"),
    ("y" * 5000, "is not a robot target"),
    ("a" * 300 + ".toml", "cannot open"),
    ("atlas", "unknown robot target 'atlas'"),
    ("sp\x00ot", "is not a robot target"),
    ("spot; rm -rf ~", "neither a built-in robot name"),
    ("../../etc/passwd", "no such file|not valid TOML|invalid target"),
    ("$(reboot)", "neither a built-in robot name"),
    ("💥", "neither a built-in robot name"),
    ("", "is not a robot target"),
    ("/dev/zero", "not a regular file"),
    ("/dev/null", "not a regular file"),
])
def test_bad_target_argument_is_one_clear_error(arg, message):
    t = time.perf_counter()
    with pytest.raises(TargetError, match=message):
        load_robot(arg)
    assert time.perf_counter() - t < 1.0


def test_fifo_target_does_not_hang(tmp_path):
    fifo = tmp_path / "robot.toml"
    os.mkfifo(fifo)
    with pytest.raises(TargetError, match="not a regular file"):
        load_robot(fifo)


@pytest.mark.parametrize("data, message", [
    (b"name = \"a1\"\n\xff\xfe garbage", "not UTF-8"),
    ("name = 'caf\u00e9'".encode("utf-16"), "not UTF-8"),
    (b"this is [not toml", "not valid TOML"),
    (b"x = " + b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"x = " + b"{a = " * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
])
def test_toml_that_is_not_utf8_or_toml(tmp_path, data, message):
    path = tmp_path / "r.toml"
    path.write_bytes(data)
    with pytest.raises(TargetError, match=message):
        load_robot(path)
    with pytest.raises(TargetError, match=message):
        load_hardware(path)


def test_huge_toml_is_refused_unread(tmp_path):
    path = tmp_path / "big.toml"
    with path.open("wb") as f:            # sparse: 2 GB on paper, nothing on disk
        f.truncate(2_000_000_000)
    t = time.perf_counter()
    with pytest.raises(TargetError, match="at most 1,000,000 bytes"):
        load_robot(path)
    assert time.perf_counter() - t < 0.5
    _write(path, A1_TOML + "#" * 1_000_001)
    with pytest.raises(TargetError, match="at most 1,000,000 bytes"):
        load_robot(path)


def test_bad_targets_through_the_cli(tiny_fat_ckpt, tmp_path, no_pybullet):
    for target in (str(tmp_path), "x" * 300, "sp\x01ot", "/dev/zero", str(tmp_path / "no.toml")):
        res = CliRunner().invoke(app, ["eval", tiny_fat_ckpt, "--target", target])
        assert res.exit_code == 2, res.output
        assert isinstance(res.exception, SystemExit)
    assert no_pybullet == []


# ------------------------------------------------------------------------------ 3. URDF


def _inertial() -> str:
    return ('<inertial><mass value="0.1"/><inertia ixx="0.001" ixy="0" ixz="0" iyy="0.001" '
            'iyz="0" izz="0.001"/></inertial>')


def _chain_urdf(n_joints: int, jtype: str = "revolute") -> str:
    """A chain l0 - j1 - l1 - ... - jN - lN, links and joints interleaved."""
    parts = ['<?xml version="1.0"?>', '<robot name="many">', f'<link name="l0">{_inertial()}</link>']
    for i in range(1, n_joints + 1):
        parts.append(f'<link name="l{i}">{_inertial()}</link>')
        parts.append(f'<joint name="j{i}" type="{jtype}"><parent link="l{i - 1}"/>'
                     f'<child link="l{i}"/><origin xyz="0 0 0.01"/><axis xyz="0 0 1"/>'
                     '<limit lower="-1" upper="1" effort="1" velocity="1"/></joint>')
    parts.append("</robot>")
    return "\n".join(parts)


def _arm_toml(urdf: str = "r.urdf", joints: tuple[str, ...] = ("j1", "j2"), ee: str = "l2") -> str:
    n = len(joints)
    return textwrap.dedent(f"""\
        name = "hostile"
        urdf = "{urdf}"
        fixed_base = true
        control_hz = 50
        physics_hz = 500

        [joints]
        names = {list(joints)!r}
        default = {[0.0] * n}
        kp = {[10.0] * n}
        kd = {[1.0] * n}
        torque_limit = {[10.0] * n}
        action_scale = 1.0
        action_clip = 3.0

        [task]
        family = "reach"
        episode_s = 3.0
        ee_link = "{ee}"
        tolerance_m = 0.05
        goal_joint_range = 0.6
        """).replace("'", '"')


def _robot(tmp_path: Path, urdf_text: str, **kw) -> Path:
    (tmp_path / "r.urdf").write_text(urdf_text)
    return _write(tmp_path / "hostile.toml", _arm_toml(**kw))


def test_small_hostile_fixture_is_valid(tmp_path):
    r = load_robot(_robot(tmp_path, _chain_urdf(2)))
    assert r.n_joints == 2


@pytest.mark.parametrize("n", [1_000, 10_000])
def test_urdf_with_thousands_of_joints_never_reaches_pybullet(tiny_fat_ckpt, tmp_path,
                                                              no_pybullet, n):
    toml = _robot(tmp_path, _chain_urdf(n))
    t = time.perf_counter()
    with pytest.raises(TargetError, match=f"more than {L.MAX_URDF_JOINTS} joints"):
        load_robot(toml)
    assert time.perf_counter() - t < 0.5
    res = CliRunner().invoke(app, ["eval", tiny_fat_ckpt, "--target", str(toml)])
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit)
    assert no_pybullet == []


def test_urdf_at_the_joint_limit_is_accepted(tmp_path):
    toml = _robot(tmp_path, _chain_urdf(L.MAX_URDF_JOINTS), ee="l256")
    assert load_robot(toml).n_joints == 2


def test_urdf_that_is_a_directory_does_not_abort(tmp_path):
    (tmp_path / "r.urdf").mkdir()
    _write(tmp_path / "hostile.toml", _arm_toml())
    probe = textwrap.dedent(f"""
        import sys
        from xcompile.errors import TargetError
        from xcompile.targets import load_robot
        try:
            load_robot({str(tmp_path / "hostile.toml")!r})
        except TargetError as e:
            print("REFUSED", e)
            sys.exit(0)
        print("LOADED")
        sys.exit(1)
        """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
    assert "REFUSED" in out.stdout and "is a directory" in out.stdout


def test_unvalidated_robot_cannot_hand_a_directory_to_pybullet(tmp_path):
    """Even a RobotTarget edited after loading (model_copy skips validation) is checked again
    right before PyBullet loads its URDF."""
    (tmp_path / "d.urdf").mkdir()
    probe = textwrap.dedent(f"""
        import sys
        import pybullet as p
        from xcompile.errors import TargetError
        from xcompile.sim.world import load_body
        from xcompile.targets import load_robot
        r = load_robot("panda").model_copy(update={{"urdf": {str(tmp_path / "d.urdf")!r}}})
        c = p.connect(p.DIRECT)
        try:
            load_body(c, r)
        except TargetError as e:
            print("REFUSED", e)
            sys.exit(0)
        sys.exit(1)
        """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
    assert "is a directory" in out.stdout


LAUGHS = ('<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
          + "".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">'
                    for i in range(1, 10))
          + ']>\n<robot name="x"><link name="&lol9;"/></robot>')


@pytest.mark.parametrize("urdf, message", [
    (LAUGHS, "DOCTYPE or ENTITY"),
    ('<!DOCTYPE robot SYSTEM "file:///etc/passwd"><robot name="x"/>', "DOCTYPE"),
    ("<robot name='x'><link name='a'>", "not well-formed XML"),
    ("\x00\x01 binary", "not well-formed XML"),
    ("", "not well-formed XML"),
    ("<sdf><model/></sdf>", "root element is <sdf>, not <robot>"),
    ("<robot name='x'/>", "has no <link>"),
    ("<robot name='x'><link name='base'/></robot>", "no movable joints"),
    (_chain_urdf(2).replace("j2", "j1"), "defines joint 'j1' twice"),
    (_chain_urdf(2).replace('"l2"', '"l1"'), "twice"),
    (_chain_urdf(2).replace('<parent link="l1"/>', '<parent link="nowhere"/>'), "not a <link>"),
    (_chain_urdf(2).replace('<parent link="l0"/>', '<parent link="l2"/>'), "loop"),
    (_chain_urdf(2).replace('<joint name="j2" type="revolute"><parent link="l1"/>',
                            '<joint name="j2" type="revolute"><parent link="l0"/>')
     .replace("</robot>", '<link name="orphan"/></robot>'), "root links"),
    (_chain_urdf(2).replace('<origin xyz="0 0 0.01"/>', '<origin xyz="nan 0 0"/>'), "finite"),
    (_chain_urdf(2).replace('<mass value="0.1"/>', '<mass value="1e999"/>'), "finite"),
    (_chain_urdf(2).replace('lower="-1"', 'lower="inf"'), "finite"),
    (_chain_urdf(2).replace('lower="-1"', 'lower="0x1p99999"'), "finite"),
    (_chain_urdf(2).replace('type="revolute"', 'type="fixed"'), "no movable joints"),
    (_chain_urdf(2).replace('<joint name="j2" type="revolute"', '<joint name="j2" type="fixed"'),
     "joint 'j2' of URDF .* is of type 'fixed', not movable"),
])
def test_bad_urdf_is_refused_before_pybullet(tmp_path, no_pybullet, urdf, message):
    toml = _robot(tmp_path, urdf)
    t = time.perf_counter()
    with pytest.raises(TargetError, match=message) as e:
        load_robot(toml)
    assert time.perf_counter() - t < 0.5
    assert str(toml) in str(e.value)
    assert no_pybullet == []


def test_missing_joint_is_named(tmp_path, no_pybullet):
    toml = _robot(tmp_path, _chain_urdf(2), joints=("j1", "elbow"))
    with pytest.raises(TargetError, match="joint 'elbow' is not in URDF .*movable joints there: "
                                          "j1, j2"):
        load_robot(toml)


@pytest.mark.parametrize("ee, message", [("l0", "is the base link"), ("hand", "is not a link")])
def test_end_effector_must_be_a_moved_link(tmp_path, ee, message):
    with pytest.raises(TargetError, match=f"task.ee_link: '{ee}' {message}"):
        load_robot(_robot(tmp_path, _chain_urdf(2), ee=ee))


def test_huge_urdf_is_refused_unread(tmp_path):
    with (tmp_path / "r.urdf").open("wb") as f:
        f.truncate(L.MAX_URDF_BYTES + 1)
    _write(tmp_path / "hostile.toml", _arm_toml())
    with pytest.raises(TargetError, match="at most 20,000,000 bytes"):
        load_robot(tmp_path / "hostile.toml")


def test_urdf_is_parsed_once_and_again_when_edited(tmp_path, monkeypatch):
    calls = []
    real = L._parse_urdf
    monkeypatch.setattr(L, "_parse_urdf", lambda data: calls.append(1) or real(data))
    L._urdf_info_cached.cache_clear()
    toml = _robot(tmp_path, _chain_urdf(2))
    for _ in range(5):
        load_robot(toml)
    assert len(calls) == 1
    (tmp_path / "r.urdf").write_text(_chain_urdf(3))
    load_robot(toml)
    assert len(calls) == 2


def test_pybullet_data_urdfs_with_meshes_are_parsed_not_loaded(no_pybullet):
    for name in ("a1", "laikago", "panda"):     # mesh-referencing pybullet_data URDFs
        r = load_robot(name)
        assert len(urdf_info(r.urdf_path()).movable) >= r.n_joints
    assert no_pybullet == []


# ------------------------------------------------------------------------------ 4. numbers


@pytest.mark.parametrize("old, new, field", [
    ("kp = [40.0,", "kp = [nan,", "joints.kp.0"),
    ("kp = [40.0,", "kp = [inf,", "joints.kp.0"),
    ("kp = [40.0,", "kp = [-40.0,", "joints.kp.0"),
    ("kp = [40.0,", "kp = [1e9,", "joints.kp.0"),
    ("kd = [1.0,", "kd = [-1.0,", "joints.kd.0"),
    ("kd = [1.0,", "kd = [-inf,", "joints.kd.0"),
    ("torque_limit = [20.0,", "torque_limit = [0.0,", "joints.torque_limit.0"),
    ("torque_limit = [20.0,", "torque_limit = [nan,", "joints.torque_limit.0"),
    ("default = [0.0,", "default = [nan,", "joints.default.0"),
    ("default = [0.0,", "default = [7.0,", "joints.default.0"),
    ("default = [0.0,", "default = [-1e300,", "joints.default.0"),
    ("action_scale = 0.25", "action_scale = nan", "joints.action_scale"),
    ("action_scale = 0.25", "action_scale = 100.0", "joints.action_scale"),
    ("action_clip = 4.0", "action_clip = inf", "joints.action_clip"),
    ("action_clip = 4.0", "action_clip = 0", "joints.action_clip"),
    ("action_clip = 4.0", "action_clip = 1e6", "joints.action_clip"),
    ("control_hz = 50", "control_hz = 0.001", "control_hz"),
    ("control_hz = 50", "control_hz = 1e-300", "control_hz"),
    ("control_hz = 50", "control_hz = 5000", "control_hz"),
    ("control_hz = 50", "control_hz = nan", "control_hz"),
    ("control_hz = 50", "control_hz = true", "control_hz"),
    ("control_hz = 50", 'control_hz = "50"', "control_hz"),
    ("control_hz = 50", "control_hz = " + "9" * 400, "control_hz"),
    ("physics_hz = 500", "physics_hz = 505", "whole multiple of control_hz"),
    ("physics_hz = 500", "physics_hz = 25", "whole multiple of control_hz"),
    ("physics_hz = 500", "physics_hz = 1e7", "physics_hz"),
    ("control_hz = 50", "control_hz = 1", "at most 100 physics steps per control step"),
    ("episode_s = 12.0", "episode_s = 0", "task.locomotion.episode_s"),
    ("episode_s = 12.0", "episode_s = 1e6", "task.locomotion.episode_s"),
    ("episode_s = 12.0", "episode_s = inf", "task.locomotion.episode_s"),
    ("episode_s = 12.0", "episode_s = 0.001", "shorter than one control step"),
    ("command_vx_mps = [-0.5, 0.8]", "command_vx_mps = [0.6, 0.3]", "lo <= hi"),
    ("command_vx_mps = [-0.5, 0.8]", "command_vx_mps = [-20.0, 0.6]", "command_vx_mps.0"),
    ("command_vx_mps = [-0.5, 0.8]", "command_vx_mps = [0.3, nan]", "command_vx_mps.1"),
    ("command_vx_mps = [-0.5, 0.8]", "command_vx_mps = [0.3, 0.6, 0.9]", "command_vx_mps"),
    ("command_yaw_rps = [-1.0, 1.0]", "command_yaw_rps = [1.0, -1.0]", "command_yaw_rps"),
    ("command_vy_mps = [-0.3, 0.3]", "command_vy_mps = [-0.3, inf]", "command_vy_mps.1"),
    ("command_period_s = 4.0", "command_period_s = 0", "command_period_s"),
    ("gait_hz = 2.0", "gait_hz = nan", "gait_hz"),
    ("gait_hz = 2.0", "gait_hz = 1e9", "gait_hz"),
    ("spawn_height_m = 0.30", "spawn_height_m = -0.3", "spawn_height_m"),
    ("spawn_height_m = 0.30", "spawn_height_m = 1e9", "spawn_height_m"),
    ("fall_height_m = 0.12", "fall_height_m = 0.5", "fall_height_m (0.5) must be below"),
    ("fall_height_m = 0.12", "fall_height_m = 0", "fall_height_m"),
])
def test_bad_numbers_name_the_field(tmp_path, old, new, field):
    with pytest.raises(TargetError) as e:
        load_robot(_write(tmp_path / "bad.toml", _edit(A1_TOML, old, new)))
    assert field in str(e.value), str(e.value)


@pytest.mark.parametrize("old, new, field", [
    ("tolerance_m = 0.05", "tolerance_m = 0", "task.reach.tolerance_m"),
    ("tolerance_m = 0.05", "tolerance_m = 100.0", "task.reach.tolerance_m"),
    ("tolerance_m = 0.05", "tolerance_m = nan", "task.reach.tolerance_m"),
    ("goal_joint_range = 1.2", "goal_joint_range = 50.0", "task.reach.goal_joint_range"),
    ("goal_joint_range = 1.2", "goal_joint_range = -inf", "task.reach.goal_joint_range"),
    ("episode_s = 10.0", "episode_s = 121", "task.reach.episode_s"),
])
def test_bad_reach_numbers_name_the_field(tmp_path, old, new, field):
    with pytest.raises(TargetError) as e:
        load_robot(_write(tmp_path / "bad.toml", _edit(PANDA_TOML, old, new)))
    assert field in str(e.value), str(e.value)


def test_episode_physics_steps_are_bounded(tmp_path):
    toml = _edit(_edit(A1_TOML, "episode_s = 12.0", "episode_s = 120.0"),
                 "physics_hz = 500", "physics_hz = 5000")
    with pytest.raises(TargetError, match="600,000 physics steps per episode; at most 240,000"):
        load_robot(_write(tmp_path / "bad.toml", toml))


def test_limits_are_named(tmp_path):
    cases = [("control_hz = 50", "control_hz = 5000", "1000"),
             ("kp = [40.0,", "kp = [-1.0,", "greater than or equal to 0"),
             ("episode_s = 12.0", "episode_s = 500", "120")]
    for old, new, limit in cases:
        with pytest.raises(TargetError, match=limit):
            load_robot(_write(tmp_path / "bad.toml", _edit(A1_TOML, old, new)))


@pytest.mark.parametrize("old, new, field", [
    ("latency_budget_us = 500.0", "latency_budget_us = nan", "latency_budget_us"),
    ("latency_budget_us = 500.0", "latency_budget_us = -1", "latency_budget_us"),
    ("latency_budget_us = 500.0", "latency_budget_us = 1e12", "latency_budget_us"),
    ("memory_mb = 512.0", "memory_mb = inf", "memory_mb"),
    ("memory_mb = 512.0", "memory_mb = 0", "memory_mb"),
    ('precisions = ["fp32", "int8"]', 'precisions = ["fp32", "int8", "fp16", "fp32"]',
     "precisions"),
])
def test_bad_hardware_numbers_name_the_field(tmp_path, old, new, field):
    with pytest.raises(TargetError) as e:
        load_hardware(_write(tmp_path / "bad.toml", _edit(CPU_TOML, old, new)))
    assert field in str(e.value)


def test_zero_gain_is_allowed_and_descriptors_stay_finite(tmp_path):
    import numpy as np

    from xcompile.models.descriptors import joint_descriptors

    robot = load_robot(_write(tmp_path / "z.toml", _edit(A1_TOML, "kp = [40.0,", "kp = [0.0,")))
    d = joint_descriptors(robot)
    assert np.all(np.isfinite(d))


# ------------------------------------------------------------------------------ 5. the simulator


@pytest.mark.parametrize("update, message", [
    ({"control_hz": 1e-3}, "physics steps"),               # would have hung
    ({"control_hz": math.nan}, "control_hz"),
])
def test_env_refuses_unvalidated_numbers(update, message):
    from xcompile.sim.env import RobotEnv

    robot = load_robot("a1").model_copy(update=update)
    t = time.perf_counter()
    with pytest.raises(TargetError, match=message):
        RobotEnv(robot)
    assert time.perf_counter() - t < 1.0


def test_env_refuses_unvalidated_nan_gain():
    from xcompile.sim.env import RobotEnv

    a1 = load_robot("a1")
    joints = a1.joints.model_copy(update={"kp": [math.nan] * 12})
    with pytest.raises(TargetError, match="joints.kp"):
        RobotEnv(a1.model_copy(update={"joints": joints}))


def test_slowest_valid_episode_is_bounded(tmp_path):
    """The longest episode the loader allows is a bounded number of physics steps."""
    from xcompile.sim.env import RobotEnv

    toml = _edit(_edit(A1_TOML, "episode_s = 12.0", "episode_s = 120.0"),
                 "physics_hz = 500", "physics_hz = 2000")
    robot = load_robot(_write(tmp_path / "slow.toml", toml))
    env = RobotEnv(robot)
    try:
        assert env.max_steps * env.substeps <= L.MAX_EPISODE_PHYSICS_STEPS
    finally:
        env.close()
