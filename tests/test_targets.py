"""Targets: every built-in TOML loads; bad ones are refused with the field named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from xcompile.errors import TargetError
from xcompile.targets import list_hardware, list_robots, load_hardware, load_robot

ROBOTS = ["a1", "aliengo", "kuka_iiwa", "laikago", "mini_cheetah", "panda", "spot", "xarm6"]


def test_builtins_listed():
    assert list_robots() == ROBOTS
    assert {"cpu", "jetson_orin"} <= set(list_hardware())


@pytest.mark.parametrize("name", ROBOTS)
def test_every_builtin_robot_loads(name):
    r = load_robot(name)
    assert r.name == name
    assert r.urdf_path().exists()
    assert len(r.joints.default) == r.n_joints
    assert r.family in ("locomotion", "reach")


@pytest.mark.parametrize("name", ["cpu", "jetson_orin"])
def test_every_builtin_hardware_loads(name):
    h = load_hardware(name)
    assert h.latency_budget_us > 0


def test_spot_is_our_urdf_with_spot_dimensions():
    import pybullet as p

    from xcompile.sim.world import load_body

    r = load_robot("spot")
    assert r.urdf_path().parent.name == "robots"
    c = p.connect(p.DIRECT)
    try:
        body, jids = load_body(c, r)
        mass = sum(p.getDynamicsInfo(body, i, physicsClientId=c)[0]
                   for i in range(-1, p.getNumJoints(body, physicsClientId=c)))
        lo, hi = p.getAABB(body, -1, physicsClientId=c)
        assert len(jids) == 12
        assert 30 < mass < 35
        assert 0.8 < hi[0] - lo[0] < 1.2  # body box; legs add the rest of the ~1.1 m
    finally:
        p.disconnect(c)


def test_robot_by_path_with_its_own_urdf(tmp_path):
    src = Path(load_robot("spot").source)
    shutil.copy(src, tmp_path / "my_dog.toml")
    shutil.copy(src.parent / "spot.urdf", tmp_path / "spot.urdf")
    text = (tmp_path / "my_dog.toml").read_text().replace('name = "spot"', 'name = "my_dog"')
    (tmp_path / "my_dog.toml").write_text(text)
    r = load_robot(tmp_path / "my_dog.toml")
    assert r.name == "my_dog" and r.urdf_path() == (tmp_path / "spot.urdf").resolve()


def _write_bad(tmp_path, old, new):
    text = Path(load_robot("a1").source).read_text()
    assert old in text
    path = tmp_path / "bad.toml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize("old,new,field", [
    ("control_hz = 50", 'control_hz = "fast"', "control_hz"),
    ("control_hz = 50\n", "", "control_hz"),
    ('family = "locomotion"', 'family = "swimming"', "task"),
    ("action_scale = 0.25", "action_scale = -1", "action_scale"),
    ("default = [0.0, 0.9, -1.8, ", "default = [", "joints"),
    ("hardware = \"cpu\"", "hardware = \"cpu\"\nwheels = 4", "wheels"),
])
def test_bad_robot_toml_names_the_field(tmp_path, old, new, field):
    with pytest.raises(TargetError) as e:
        load_robot(_write_bad(tmp_path, old, new))
    assert field in str(e.value)


def test_unknown_robot_lists_builtins():
    with pytest.raises(TargetError, match="unknown robot target 'atlas'.*spot"):
        load_robot("atlas")


def test_not_toml(tmp_path):
    (tmp_path / "x.toml").write_text("this is [not toml")
    with pytest.raises(TargetError, match="not valid TOML"):
        load_robot(tmp_path / "x.toml")


def test_missing_urdf(tmp_path):
    with pytest.raises(TargetError, match="urdf"):
        load_robot(_write_bad(tmp_path, "pybullet_data:a1/a1.urdf", "nowhere.urdf"))
