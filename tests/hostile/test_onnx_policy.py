"""Hostile and broken ONNX policies: external data stays in the model's folder, every bad model is
an XCompileError (no traceback), the deployment contract is checked at load, NaN actions are
counted, and a rollout GIF is checked before simulating and written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from xcompile.errors import CheckpointError, ContractError, XCompileError
from xcompile.onnx import session as session_mod
from xcompile.onnx.session import ExternalDataError, ort_session
from xcompile.policy import load_policy
from xcompile.sim.env import obs_dim
from xcompile.targets import load_robot

ROBOT = "panda"
SECRET = np.arange(1000, 1000 + 30 * 7, dtype=np.float32)   # what a hostile model wants to read


def _contract(robot) -> dict[str, str]:
    return {"robot": robot.name, "joint_order": json.dumps(list(robot.joints.names)),
            "family": robot.family}


def _linear_model(n_in: int, n_out: int, meta: dict[str, str] | None = None,
                  weight: np.ndarray | None = None) -> onnx.ModelProto:
    """action = obs @ W, batch dynamic; W all 0.5 unless given."""
    w = np.full((n_in, n_out), 0.5, np.float32) if weight is None else weight
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["obs", "W"], ["action"])], "policy",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("action", TensorProto.FLOAT, ["batch", n_out])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    for k, v in (meta or {}).items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    return model


def _panda_model(**kw) -> onnx.ModelProto:
    robot = load_robot(ROBOT)
    return _linear_model(obs_dim(robot), robot.n_joints, _contract(robot), **kw)


def _point_external(model: onnx.ModelProto, location: str) -> onnx.ModelProto:
    """Mark initializer W as external data at `location` (raw data dropped)."""
    _external_tensor(model.graph.initializer[0], location)
    return model


def _external_tensor(t: onnx.TensorProto, location: str) -> None:
    nbytes = len(t.raw_data) or int(np.prod(t.dims)) * 4
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for k, v in (("location", location), ("offset", "0"), ("length", str(nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v


@pytest.fixture
def no_session(monkeypatch):
    """Fail the test if onnxruntime is ever asked to build a session."""
    import onnxruntime as ort

    calls = []

    def spy(*a, **kw):
        calls.append(a)
        raise AssertionError("onnxruntime.InferenceSession was called on a refused model")

    monkeypatch.setattr(ort, "InferenceSession", spy)
    return calls


@pytest.fixture
def layout(tmp_path):
    """tmp/secret.bin (outside) and tmp/model/ (the model's folder)."""
    (tmp_path / "secret.bin").write_bytes(SECRET.tobytes())
    (tmp_path / "model").mkdir()
    return tmp_path


# ------------------------------------------------------------------------ external data escapes


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "symlinked_folder"])
def test_external_data_outside_the_folder_is_refused(layout, how, no_session, monkeypatch):
    folder = layout / "model"
    if how == "absolute":
        loc = str(layout / "secret.bin")
    elif how == "dotdot":
        loc = "../secret.bin"
    elif how == "symlink":
        (folder / "w.bin").symlink_to(layout / "secret.bin")
        loc = "w.bin"
    else:
        (folder / "sub").symlink_to(layout)
        loc = "sub/secret.bin"
    path = folder / "m.onnx"
    path.write_bytes(_point_external(_panda_model(), loc).SerializeToString())
    monkeypatch.chdir(layout)   # the secret is also reachable from the cwd
    for load in (lambda: ort_session(path), lambda: load_policy(path, load_robot(ROBOT))):
        with pytest.raises(ExternalDataError) as e:
            load()
        msg = str(e.value)
        assert str(path) in msg and "tensor 'W' (initializer)" in msg
        assert loc in msg and "beside the model" in msg
        assert isinstance(e.value, ContractError) and isinstance(e.value, CheckpointError)
    assert no_session == []


def test_external_data_in_a_subgraph_constant_is_checked(layout, no_session):
    """A Constant inside an If branch is walked too."""
    robot = load_robot(ROBOT)
    n_in, n_out = obs_dim(robot), robot.n_joints
    const = numpy_helper.from_array(np.zeros((n_in, n_out), np.float32), "C")
    _external_tensor(const, "../secret.bin")
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=const),
         helper.make_node("MatMul", ["obs", "w"], ["y"])], "branch", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n_out])])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["cond"],
                          value=numpy_helper.from_array(np.array(True))),
         helper.make_node("If", ["cond"], ["action"], then_branch=branch, else_branch=branch)],
        "policy", [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("action", TensorProto.FLOAT, ["batch", n_out])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = layout / "model" / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ExternalDataError, match=r"then_branch.*\.\./secret\.bin"):
        ort_session(path)
    assert no_session == []


def test_missing_external_data_file_is_refused(layout, no_session):
    path = layout / "model" / "m.onnx"
    path.write_bytes(_point_external(_panda_model(), "gone.bin").SerializeToString())
    with pytest.raises(ExternalDataError, match="no such file"):
        ort_session(path)


def test_external_data_from_bytes_is_refused(layout, no_session, monkeypatch):
    monkeypatch.chdir(layout)
    data = _point_external(_panda_model(), "secret.bin").SerializeToString()
    with pytest.raises(ExternalDataError, match="given as bytes"):
        ort_session(data)


def test_model_with_external_data_beside_it_loads_from_another_cwd(tmp_path, monkeypatch):
    robot = load_robot(ROBOT)
    w = np.random.default_rng(0).standard_normal((obs_dim(robot), robot.n_joints)).astype(
        np.float32)
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(_panda_model(weight=w), str(folder / "m.onnx"), save_as_external_data=True,
                    location="m.onnx.data", size_threshold=0)
    assert (folder / "m.onnx.data").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    obs = np.random.default_rng(1).standard_normal((3, obs_dim(robot))).astype(np.float32)
    sess = ort_session(folder / "m.onnx")
    np.testing.assert_allclose(sess.run(None, {"obs": obs})[0], obs @ w, rtol=1e-5, atol=1e-5)
    rel = os.path.relpath(folder / "m.onnx", elsewhere)   # a relative model path works too
    np.testing.assert_allclose(load_policy(rel, robot).act(obs), obs @ w, rtol=1e-5, atol=1e-5)


def test_model_without_external_data_loads_from_bytes():
    robot = load_robot(ROBOT)
    sess = ort_session(_panda_model().SerializeToString())
    obs = np.ones((2, obs_dim(robot)), np.float32)
    assert sess.run(None, {"obs": obs})[0].shape == (2, robot.n_joints)


# ------------------------------------------------------------------------ broken model files


def _broken(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "bad.onnx"
    if kind == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "truncated":
        data = _panda_model().SerializeToString()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("this is not an onnx model\n")
    return path


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty", "directory", "text"])
def test_broken_model_is_a_clear_error(tmp_path, kind):
    path = _broken(tmp_path, kind)
    with pytest.raises(XCompileError) as e:
        ort_session(path)
    assert str(path) in str(e.value)
    with pytest.raises(XCompileError):
        load_policy(path, load_robot(ROBOT))


def test_broken_model_on_the_command_line_has_no_traceback(tmp_path):
    from xcompile.cli import app

    for kind in ("garbage", "directory"):
        (tmp_path / kind).mkdir()
        path = _broken(tmp_path / kind, kind)
        r = CliRunner().invoke(app, ["eval", str(path), "--target", ROBOT, "--episodes", "1"])
        assert r.exit_code == 2, r.output
        assert "Traceback" not in r.output and "bad.onnx" in r.output


def test_oversized_model_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(_panda_model().SerializeToString())
    monkeypatch.setattr(session_mod, "MAX_ONNX_BYTES", 100)
    with pytest.raises(CheckpointError, match="GB"):
        ort_session(path)


# ------------------------------------------------------------------------ the contract at load


def _save(tmp_path: Path, model: onnx.ModelProto, name: str = "p.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("field", ["joint_order", "kp", "obs_layout"])
def test_non_json_contract_field_is_a_contract_error(tmp_path, field):
    robot = load_robot(ROBOT)
    meta = {**_contract(robot), field: "not json"}
    path = _save(tmp_path, _linear_model(obs_dim(robot), robot.n_joints, meta))
    with pytest.raises(ContractError, match=f"'{field}' is not valid JSON"):
        load_policy(path, robot)


def test_joint_order_of_the_wrong_type_is_a_contract_error(tmp_path):
    robot = load_robot(ROBOT)
    meta = {**_contract(robot), "joint_order": json.dumps({"a": 1})}
    with pytest.raises(ContractError, match="joint_order"):
        load_policy(_save(tmp_path, _linear_model(obs_dim(robot), robot.n_joints, meta)), robot)


def test_wrong_input_width_is_refused_at_load(tmp_path):
    robot = load_robot(ROBOT)
    path = _save(tmp_path, _linear_model(29, robot.n_joints, _contract(robot)))
    with pytest.raises(ContractError, match=r"width 29.*width 30"):
        load_policy(path, robot)


def test_wrong_action_count_is_refused_at_load(tmp_path):
    robot = load_robot(ROBOT)
    path = _save(tmp_path, _linear_model(obs_dim(robot), 6, _contract(robot)))
    with pytest.raises(ContractError, match=r"outputs 6 actions.*has 7 joints"):
        load_policy(path, robot)


def test_static_batch_one_model_still_loads(tmp_path):
    robot = load_robot(ROBOT)
    model = _panda_model()
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].ClearField("dim_param")
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    act = load_policy(_save(tmp_path, model), robot).act
    assert act(np.ones((4, obs_dim(robot)), np.float32)).shape == (4, robot.n_joints)


def test_wrong_action_shape_in_evaluate_is_a_contract_error():
    from xcompile.evaluate import evaluate

    with pytest.raises(ContractError, match=r"\(1, 5\).*7 joints"):
        evaluate(lambda o: np.zeros((len(o), 5)), load_robot(ROBOT), episodes=1)


def test_torch_mlp_policy_with_wrong_widths_is_refused(tmp_path):
    from xcompile.models.slim import MLPPolicy, save_torch_policy

    robot = load_robot(ROBOT)
    module = MLPPolicy(obs_dim(robot), [8], 6)
    path = save_torch_policy(tmp_path / "p.pt", module, module.spec())
    with pytest.raises(ContractError, match=r"outputs 6 actions.*has 7 joints"):
        load_policy(path, robot)


# ------------------------------------------------------------------------ NaN actions


def test_nan_policy_is_counted_per_episode():
    from xcompile.evaluate import evaluate

    robot = load_robot(ROBOT)
    res = evaluate(lambda o: np.full((len(o), robot.n_joints), np.nan), robot, episodes=2)
    assert res.nonfinite_action_episodes == 2
    d = res.as_dict()
    assert d["nonfinite_action_episodes"] == 2 and d["score"] == 0.0
    assert {"robot", "seed", "episodes", "score", "score_std", "falls", "success_rate",
            "invalid_actions", "scores"} <= set(d)
    assert "NaN/Inf actions in 2 of 2 episodes" in res.nonfinite_message()


def test_finite_policy_counts_no_nonfinite_episode():
    from xcompile.evaluate import evaluate

    robot = load_robot(ROBOT)
    calls = []

    def policy(o):   # Inf on the 3rd call for the first row only: one episode of two
        calls.append(1)
        a = np.zeros((len(o), robot.n_joints))
        if len(calls) == 3:
            a[0, 0] = np.inf
        return a

    res = evaluate(policy, robot, episodes=2)
    assert res.nonfinite_action_episodes == 1
    assert res.nonfinite_message().startswith("the policy emitted NaN/Inf actions in 1 of 2")


# ------------------------------------------------------------------------ rollout GIF


def test_gif_to_a_missing_folder_fails_before_simulating(tmp_path, monkeypatch):
    import xcompile.evaluate as ev

    def no_env(*a, **kw):
        raise AssertionError("simulation started before the GIF path was checked")

    monkeypatch.setattr(ev, "RobotEnv", no_env)
    robot = load_robot(ROBOT)
    with pytest.raises(XCompileError, match="does not exist"):
        ev.rollout_gif(lambda o: np.zeros((len(o), 7)), robot, tmp_path / "nope" / "r.gif")
    with pytest.raises(XCompileError, match="is a folder"):
        ev.rollout_gif(lambda o: np.zeros((len(o), 7)), robot, tmp_path)


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True,
                    reason="needs POSIX permissions and a non-root user")
def test_gif_to_a_read_only_folder_fails_up_front(tmp_path):
    from xcompile.evaluate import check_gif_path

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(XCompileError, match="not writable"):
            check_gif_path(ro / "r.gif")
    finally:
        ro.chmod(0o700)


def test_gif_write_is_atomic(tmp_path, monkeypatch):
    from PIL import Image

    from xcompile.sim.render import write_gif

    frames = [np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 200, np.uint8)]
    path = tmp_path / "r.gif"
    write_gif(frames, path, fps=4)
    assert Image.open(path).n_frames == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.gif"]
    good = path.read_bytes()

    def failing_save(self, fp, *a, **kw):
        fp.write(b"GIF89a partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(XCompileError, match="No space left"):
        write_gif(frames, path, fps=4)
    assert path.read_bytes() == good   # the old GIF is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.gif"]   # no temporary left
