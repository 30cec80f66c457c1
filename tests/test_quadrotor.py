"""The quadrotor world (xcompile/sim/quadrotor.py) and RAPTOR in it.

Physics: hover thrust carries each built-in airframe's weight (and holds it in place), a rotor
follows a command step with its first-order time constant (rising and falling), an airframe with
its rotors stopped falls freely, and the torques turn the body the way the rotor layout says.
Task: the observation is RAPTOR's (FLU, rotation body to world row-major, body rates), the score
is in [0, 1], a crash ends the episode with the rest counted 0, the same seed gives the same
episode. RAPTOR (when foundation-policy is installed) flies every built-in airframe, and a new
airframe written as a TOML compiles end to end with --profile fast.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pybullet as p
import pytest

from xcompile.errors import TargetError
from xcompile.sim.env import make_env, obs_dim
from xcompile.sim.quadrotor import OBS_LAYOUT, QuadrotorEnv
from xcompile.sim.tasks import Randomization
from xcompile.targets import list_airframes, load_robot

REPO = Path(__file__).resolve().parent.parent
AIRFRAMES = ["crazyflie", "racer250", "x500"]
HAVE_RAPTOR = importlib.util.find_spec("foundation_policy") is not None
needs_raptor = pytest.mark.skipif(not HAVE_RAPTOR, reason="foundation-policy (RAPTOR) is not "
                                  "installed: pip install foundation-policy, or the dev extra")


def _nominal(name: str) -> QuadrotorEnv:
    env = make_env(name, randomization=Randomization.off())
    env.reset(seed=0)
    return env


def _place(env: QuadrotorEnv, pos=(0, 0, 0), orn=(0, 0, 0, 1), lin=(0, 0, 0), ang=(0, 0, 0)):
    """Put the body at home + pos, at rest unless told, rotors at hover."""
    p.resetBasePositionAndOrientation(env.body, list(env.home + np.array(pos)), orn,
                                      physicsClientId=env.cid)
    p.resetBaseVelocity(env.body, list(lin), list(ang), physicsClientId=env.cid)
    env.u[:] = env.u_hover


def test_builtin_airframes():
    assert list_airframes() == AIRFRAMES
    for name in AIRFRAMES:
        r = load_robot(name)
        assert r.family == "quadrotor" and r.urdf_path() is None and r.joints is None
        assert r.actuators == ["front_right", "back_right", "back_left", "front_left"]
        assert obs_dim(r) == 22 == sum(w for _, w in OBS_LAYOUT)


@pytest.mark.parametrize("name", AIRFRAMES)
def test_hover_thrust_equals_weight_and_holds(name):
    env = _nominal(name)
    af = env.af
    assert len(af.rotors) * af.thrust(env.u_hover) == pytest.approx(af.mass_kg * 9.81, rel=1e-9)
    _place(env)
    for _ in range(100):                                  # 1 s at the hover command
        env.step(np.full(4, 2 * env.u_hover - 1))
    pos, rot, lin, ang = env._state()
    assert np.abs(pos - env.home).max() < 1e-4 and np.abs(lin).max() < 1e-4
    assert np.allclose(rot, np.eye(3), atol=1e-6) and np.abs(ang).max() < 1e-6
    env.close()


@pytest.mark.parametrize("name", AIRFRAMES)
def test_motor_step_is_first_order(name):
    env = _nominal(name)
    af = env.af
    for start, cmd, tau in ((0.2, 0.9, af.motor_time_constant_up_s),
                            (0.9, 0.2, af.motor_time_constant_down_s)):
        _place(env)
        env.u[:] = start
        k = max(1, round(tau / env.dt))              # about one time constant of control steps
        for _ in range(k):
            env._physics(np.full(4, cmd))
        t = k * env.dt
        assert env.u == pytest.approx(np.full(4, cmd + (start - cmd) * math.exp(-t / tau)),
                                      abs=1e-12)
    env.close()


def test_free_fall_without_thrust():
    env = _nominal("x500")                   # thrust curve c0 = 0: stopped rotors push nothing
    _place(env, pos=(0, 0, 0.5))
    env.u[:] = 0.0
    z0 = env._state()[0][2]
    for _ in range(30):                      # 0.3 s
        env._physics(np.zeros(4))
    pos, rot, lin, _ = env._state()
    t, h = 0.3, env.dt / env.substeps
    n = round(t / h)
    assert lin[2] == pytest.approx(-9.81 * t, abs=1e-9)
    # Bullet integrates semi-implicitly (velocity first): the drop is g h^2 n (n + 1) / 2, within
    # g t h / 2 (3 mm here) of the exact g t^2 / 2.
    assert pos[2] - z0 == pytest.approx(-9.81 * h * h * n * (n + 1) / 2, abs=1e-9)
    assert pos[2] - z0 == pytest.approx(-0.5 * 9.81 * t * t, rel=0.01)
    assert np.allclose(rot, np.eye(3), atol=1e-9)
    env.close()


def test_torques_turn_the_body_as_the_layout_says():
    env = _nominal("crazyflie")
    hover = env.u_hover

    def rates_after(u):
        _place(env)
        env.u[:] = u
        env._physics(np.asarray(u))
        return env._state()[3]

    right_up = rates_after([hover + 0.05, hover + 0.05, hover, hover])  # front/back right
    assert right_up[0] < 0 and abs(right_up[1]) < 1e-3 * abs(right_up[0])   # rolls left (FLU)
    front_up = rates_after([hover + 0.05, hover, hover, hover + 0.05])
    assert front_up[1] < 0                                              # pitches nose up
    ccw = rates_after([hover, hover + 0.05, hover, hover + 0.05])       # spin +1 rotors
    assert ccw[2] > 0 and abs(ccw[0]) < 1e-6
    env.close()


def test_observation_is_raptors():
    env = _nominal("crazyflie")
    yaw90 = p.getQuaternionFromEuler([0, 0, math.pi / 2])
    _place(env, pos=(0.1, -0.2, 0.3), orn=yaw90, lin=(0.5, 0, 0), ang=(1.0, 0, 0))
    obs = env._obs()
    assert np.allclose(obs[:3], [0.1, -0.2, 0.3], atol=1e-6)          # position - setpoint
    R = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])                   # body x points world y
    assert np.allclose(obs[3:12], R.reshape(-1), atol=1e-6)           # body to world, row-major
    assert np.allclose(obs[12:15], [0.5, 0, 0], atol=1e-6)            # world frame
    assert np.allclose(obs[15:18], [0, -1.0, 0], atol=1e-6)           # body frame: world x = -y_b
    assert np.allclose(obs[18:], 2 * env.u_hover - 1)                 # previous action
    env.close()


def test_score_bounds_crash_and_determinism():
    env = make_env("racer250")
    obs, _ = env.reset(seed=5)
    while True:
        obs, r, term, trunc, info = env.step(-np.ones(4))               # rotors off: it drops
        if term or trunc:
            break
    assert env.fell and term and 0 <= info["score"] < 0.2
    assert env.episode_metrics()["crashed"] is True

    def episode(seed):
        e = make_env("crazyflie")
        e.reset(seed=seed)
        rng = np.random.default_rng(0)
        trace = [e.step(np.full(4, 2 * e.u_hover - 1) + 0.02 * rng.standard_normal(4))[0]
                 for _ in range(50)]
        e.close()
        return np.stack(trace), e.score()

    (a, sa), (b, sb) = episode(3), episode(3)
    assert np.array_equal(a, b) and sa == sb and 0 <= sa <= 1
    assert not np.array_equal(a, episode(4)[0])
    env.close()


def test_airframe_toml_is_checked(tmp_path):
    text = (REPO / "xcompile/targets/airframes/crazyflie.toml").read_text()
    heavy = tmp_path / "heavy.toml"
    heavy.write_text(text.replace("mass_kg = 0.0306", "mass_kg = 0.06"))
    with pytest.raises(TargetError, match="cannot hover"):
        load_robot(heavy)
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("rotor_spin = [-1, 1, -1, 1]", "rotor_spin = [-1, 1, -1]"))
    with pytest.raises(TargetError, match="one per rotor"):
        load_robot(bad)
    with pytest.raises(TargetError, match="locked joint"):
        from xcompile.sim.tasks import Faults

        make_env("crazyflie", faults=Faults(locked_joint=0))


# ------------------------------------------------------------------------------ RAPTOR


@pytest.fixture(scope="module")
def raptor(raptor_dir) -> Path:
    return raptor_dir


@needs_raptor
def test_raptor_flies_every_airframe_and_the_score_tells_damage(raptor):
    from xcompile.evaluate import evaluate
    from xcompile.frontends.graph import fat_graph_policy

    class Mirrored:
        """RAPTOR with its motor order mirrored front/back: a wrong mapping."""

        def __init__(self, act):
            self.act = act

        def __call__(self, obs):
            return self.act(obs)[:, [3, 2, 1, 0]]

        def reset_states(self):
            self.act.reset_states()

        def set_rows(self, rows):
            self.act.set_rows(rows)

    for name in AIRFRAMES:
        robot = load_robot(name)
        act = fat_graph_policy(raptor / "raptor.onnx", raptor / "raptor.toml", robot).act
        res = evaluate(act, robot, episodes=3, seed=0, stream="bench")
        assert res.falls == 0, (name, res.scores)
        assert 0.3 < res.score < 1.0                    # flies, and not saturated
        bad = evaluate(Mirrored(act), robot, episodes=3, seed=0, stream="bench")
        assert bad.falls == 3 and bad.score < 0.5 * res.score, (name, bad.scores)


@needs_raptor
def test_interface_conventions_are_checked(raptor, tmp_path):
    from xcompile.frontends.graph import fat_graph_policy
    from xcompile.frontends.interface import InterfaceError

    text = (raptor / "raptor.toml").read_text()
    for old, new, match in (
            ("control_period_s = 0.01", "control_period_s = 0.02", "control_period_s"),
            ('order = ["front_right", "back_right", "back_left", "front_left"]',
             'order = ["front_left", "back_right", "back_left", "front_right"]',
             "action_spec.order")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text.replace(old, new))
        with pytest.raises(InterfaceError, match=match):
            fat_graph_policy(raptor / "raptor.onnx", bad, load_robot("crazyflie"))
    with pytest.raises(InterfaceError, match="family"):
        fat_graph_policy(raptor / "raptor.onnx", raptor / "raptor.toml", load_robot("a1"))


@needs_raptor
def test_new_airframe_compiles_end_to_end(raptor, tmp_path):
    """A quadrotor nobody ships (a Crazyflie with a 4 g payload deck), as a TOML: RAPTOR compiled
    for it with --profile fast into an int8 MLP with the quadrotor deployment contract, and
    emitted as C (an MLP student has no state)."""
    text = (REPO / "xcompile/targets/airframes/crazyflie.toml").read_text()
    toml = tmp_path / "cf_deck.toml"
    toml.write_text(text.replace('name = "crazyflie"', 'name = "cf_deck"')
                    .replace("mass_kg = 0.0306", "mass_kg = 0.0346"))
    cfg = tmp_path / "small.toml"
    cfg.write_text('[pass.distill]\nstudent = "mlp"\nhidden = [32, 32]\nrounds = 2\n'
                   'episodes_per_round = 2\nfinal_fit_epochs = 60\n')
    out = tmp_path / "build"
    proc = subprocess.run(
        [sys.executable, "-m", "xcompile", "build", str(raptor / "raptor.onnx"), "--interface",
         str(raptor / "raptor.toml"), "--target", str(toml), "--int8", "--profile", "fast",
         "--episodes", "2", "--config", str(cfg), "--out", str(out), "--emit", "c"],
        capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["quantize"]["score"] > 0.2
    import onnx

    meta = {m.key: m.value for m in onnx.load(out / "policy.onnx").metadata_props}
    assert meta["robot"] == "cf_deck" and meta["frame"] == "FLU"
    assert json.loads(meta["motor_order"])[0] == "front_right"
    assert json.loads(meta["airframe"])["mass_kg"] == pytest.approx(0.0346)
    header = (out / "policy.h").read_text()
    assert '#define XC_FRAME "FLU"' in header and "Rotor commands" in header
    assert '#define XC_JOINT_ORDER "front_right,back_right,back_left,front_left"' in header


@needs_raptor
def test_rollout_gif_of_a_quadrotor(raptor, tmp_path):
    from PIL import Image

    from xcompile.evaluate import rollout_gif
    from xcompile.frontends.graph import fat_graph_policy

    robot = load_robot("x500")
    act = fat_graph_policy(raptor / "raptor.onnx", raptor / "raptor.toml", robot).act
    gif = tmp_path / "flight.gif"
    rollout_gif(act, robot, gif, every=25, max_frames=4)
    with Image.open(gif) as im:
        assert im.n_frames == 4 and im.size == (320, 240)
        frames = []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB"), dtype=np.int16))
    assert any(np.abs(a - b).mean() > 0.1 for a, b in zip(frames, frames[1:]))   # it moves
    assert any(((f[..., 0] > 200) & (f[..., 1] < 60)).sum() >= 20 for f in frames)  # setpoint
