"""The passes check meaning: pinned == fat, ONNX == torch, quantized is smaller and close."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from xcompile.artifact import Artifact
from xcompile.errors import CheckpointError, ContractError, TargetError, ToolUnavailable
from xcompile.models.checkpoint import save_checkpoint
from xcompile.models.fat import FatConfig, FatPolicy
from xcompile.models.slim import MLPPolicy, load_torch_policy, save_torch_policy
from xcompile.onnx.graph import input_layers, output_layers, tensorrt_ready
from xcompile.onnx.session import ort_session
from xcompile.passes.base import BuildContext, get_pass
from xcompile.passes.build_tensorrt import import_tensorrt
from xcompile.policy import load_policy
from xcompile.sim.env import obs_dim
from xcompile.sim.observations import random_obs
from xcompile.targets import list_robots, load_hardware, load_robot


def run_pass(name: str, art: Artifact, robot, workdir: Path, history=(), **cfg):
    """Run one pass and its check the way the pass manager does; return (artifact, report)."""
    cls = get_pass(name)
    assert art.format == cls.input_format
    workdir.mkdir(parents=True)
    ctx = BuildContext(robot=robot, hardware=load_hardware("cpu"), workdir=workdir,
                       source_sha256="ab" * 32, history=list(history))
    conf = cls.Config(**cfg)
    result = cls().run(art, conf, ctx)
    assert result.artifact.format == cls.output_format
    assert all(p.is_relative_to(workdir) for p in workdir.rglob("*"))
    return result.artifact, cls().check(art, result, conf, ctx)


def fat_artifact(path: str, robot) -> Artifact:
    return Artifact.create("fat-checkpoint", path, robot.name)


def my_dog(tmp_path: Path):
    """a1 given only by a TOML path, under another name, with an absolute URDF path."""
    a1 = load_robot("a1")
    text = (Path(a1.source).read_text()
            .replace('name = "a1"', 'name = "my_dog"')
            .replace('urdf = "pybullet_data:a1/a1.urdf"', f'urdf = "{a1.urdf_path()}"'))
    path = tmp_path / "my_dog.toml"
    path.write_text(text)
    return load_robot(path)


@pytest.fixture(scope="module")
def a1_onnx(tiny_fat_ckpt, tmp_path_factory):
    """(pinned torch artifact, exported onnx artifact) for a1."""
    robot = load_robot("a1")
    tmp = tmp_path_factory.mktemp("a1")
    pinned, _ = run_pass("pin-embodiment", fat_artifact(tiny_fat_ckpt, robot), robot,
                         tmp / "pin", n_check_obs=256, check_episodes=0)
    exported, report = run_pass("export-onnx", pinned, robot, tmp / "export",
                                history=["pin-embodiment"])
    return pinned, exported, report


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory):
    """An exported 50 -> 256 -> 256 -> 12 MLP for a1 (weights dominate its file size), with an
    observation normalisation that export folds into its first layer."""
    robot = load_robot("a1")
    tmp = tmp_path_factory.mktemp("mlp")
    torch.manual_seed(1)
    mlp = MLPPolicy(obs_dim(robot), [256, 256], robot.n_joints, "elu", normalize=True)
    mlp.obs_mean.copy_(torch.as_tensor(random_obs(robot, 256).mean(0)))
    mlp.obs_std.fill_(0.5)    # export folds this into the first layer; its check compares
    path = save_torch_policy(tmp / "mlp.pt", mlp, {**mlp.spec(), "robot": "a1",
                                                   "joint_order": list(robot.joints.names)})
    art = Artifact.create("torch", path, "a1", meta={"kind": "mlp"})
    exported, _ = run_pass("export-onnx", art, robot, tmp / "export", n_check_obs=128)
    return exported


# ------------------------------------------------------------------------------ slim files


def test_mlp_normalization_folds_exactly(tmp_path):
    torch.manual_seed(0)
    mlp = MLPPolicy(10, [16], 3, "tanh", normalize=True).eval()
    mlp.obs_mean.copy_(torch.randn(10))
    mlp.obs_std.copy_(torch.rand(10) + 0.5)
    x = torch.randn(32, 10)
    folded = mlp.fold_normalization().eval()
    assert not folded.normalize
    torch.testing.assert_close(folded(x), mlp(x), atol=1e-5, rtol=1e-5)
    path = save_torch_policy(tmp_path / "m.pt", mlp, mlp.spec())
    torch.testing.assert_close(load_torch_policy(path)(x), mlp(x))


def test_torch_policy_errors(tmp_path, tiny_fat_ckpt):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError):
        load_torch_policy(bad)
    with pytest.raises(CheckpointError, match="not an xcompile torch policy"):
        load_torch_policy(tiny_fat_ckpt)          # a fat checkpoint is not a torch policy
    torch.save({"format": "xcompile.torch-policy", "version": 1,
                "spec": {"kind": "mlp", "obs_dim": 4, "hidden": [8], "n_actions": 2},
                "state_dict": {"net.0.weight": torch.zeros(3, 3)}}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_torch_policy(tmp_path / "w.pt")


# ------------------------------------------------------------------------------ pin-embodiment


ARM5 = Path(__file__).resolve().parents[1] / "examples" / "unseen_arm" / "arm5.toml"


@pytest.mark.parametrize("name", [*list_robots(), "my_dog", "arm5"])
def test_pin_equals_fat(name, tiny_fat_ckpt, tmp_path):
    # Every built-in robot, a copy of spot under another name, and an arm nobody ships.
    robot = (my_dog(tmp_path) if name == "my_dog" else load_robot(ARM5) if name == "arm5"
             else load_robot(name))
    fat = fat_artifact(tiny_fat_ckpt, robot)
    out, report = run_pass("pin-embodiment", fat, robot, tmp_path / "w", n_check_obs=1024,
                           check_episodes=1 if name in ("a1", "xarm6") else 0)
    assert report["max_abs_err"] <= 1e-5
    assert report["params_pinned"] < report["params_fat"]
    assert report["params_removed"] > 0 and report["bytes_removed"] > 0
    assert report["known_body"] is (name in ("a1", "panda"))   # xarm6, my_dog: zero-shot

    # Independently of the pass's own check: the file reloads and acts like the fat policy.
    loaded = load_policy(out.path, robot)
    assert loaded.kind == "torch"
    obs = random_obs(robot, 64, seed=7)
    np.testing.assert_allclose(loaded.act(obs), load_policy(tiny_fat_ckpt, robot).act(obs),
                               atol=1e-5)
    assert load_torch_policy(out.path).n_joints == robot.n_joints


def test_pin_refuses_unserved_family(tmp_path):
    model = FatPolicy(FatConfig(d_model=16, n_layers=1, n_heads=2, d_ff=16, desc_hidden=16,
                                desc_layers=1, global_dims={"locomotion": 14}))
    path = save_checkpoint(tmp_path / "loco.pt", model, [])
    panda = load_robot("panda")
    with pytest.raises(TargetError, match="reach"):
        run_pass("pin-embodiment", fat_artifact(str(path), panda), panda, tmp_path / "w")


def test_torch_policy_refuses_other_robot(a1_onnx):
    pinned, _, _ = a1_onnx
    with pytest.raises(ContractError, match="compiled for robot 'a1'"):
        load_policy(pinned.path, load_robot("aliengo"))


# ------------------------------------------------------------------------------ export-onnx


def test_export_matches_torch_and_carries_contract(a1_onnx):
    pinned, exported, report = a1_onnx
    assert report["max_abs_err_b1"] <= 1e-4 and report["max_abs_err_b64"] <= 1e-4
    model = onnx.load(str(exported.path))
    assert [i.name for i in model.graph.input] == ["obs"]
    assert [o.name for o in model.graph.output] == ["action"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param   # dynamic batch
    assert [p.name for p in exported.path.parent.glob("*.onnx")] == ["policy.onnx"]  # one graph
    assert {o.version for o in model.opset_import if o.domain == ""} == {17}
    assert not list(exported.path.parent.glob("*.data"))          # weights inside

    meta = {p.key: p.value for p in model.metadata_props}
    robot = load_robot("a1")
    assert meta["robot"] == "a1" and meta["family"] == "locomotion"
    assert json.loads(meta["joint_order"]) == list(robot.joints.names)
    assert json.loads(meta["default_pose"]) == list(robot.joints.default)
    assert float(meta["action_scale"]) == robot.joints.action_scale
    assert float(meta["control_period_s"]) == pytest.approx(1 / robot.control_hz)
    assert json.loads(meta["kp"]) == list(robot.joints.kp)
    assert sum(w for _, w in json.loads(meta["obs_layout"])) == obs_dim(robot)
    assert json.loads(meta["pass_history"]) == ["pin-embodiment", "export-onnx"]
    assert meta["source_checkpoint_sha256"] == "ab" * 32
    for key in ("action_clip", "kd", "torque_limit", "xcompile_version"):
        assert meta[key]

    # The compiled policy runs through the generic loader and acts like the torch one.
    obs = random_obs(robot, 16, seed=3)
    np.testing.assert_allclose(load_policy(exported.path, robot).act(obs),
                               load_policy(pinned.path, robot).act(obs), atol=1e-4)


def test_export_is_deterministic(a1_onnx, tmp_path):
    pinned, exported, _ = a1_onnx
    again, _ = run_pass("export-onnx", pinned, load_robot("a1"), tmp_path / "again",
                        history=["pin-embodiment"], n_check_obs=64)
    assert again.path.read_bytes() == exported.path.read_bytes()


# ------------------------------------------------------------------------------ quantize


def test_int8_is_smaller_close_and_tensorrt_ready(mlp_onnx, tmp_path):
    robot = load_robot("a1")
    q, report = run_pass("quantize", mlp_onnx, robot, tmp_path / "q", precision="int8",
                         calibration_episodes=2, heldout_episodes=1, max_action_error=0.05,
                         activations="int8")
    assert report["size_ratio"] < 0.5                 # int8 weights: about 4x smaller
    assert q.n_bytes < mlp_onnx.n_bytes
    assert report["mean_action_err"] <= 0.05
    model = onnx.load(str(q.path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert tensorrt_ready(model) == []
    assert report["tensorrt_ready"] is True

    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["precision"] == "int8" and meta["robot"] == "a1"
    assert json.loads(meta["pass_history"])[-1] == "quantize"
    with pytest.raises(ContractError):
        load_policy(q.path, load_robot("aliengo"))
    obs = random_obs(robot, 8)
    assert load_policy(q.path, robot).act(obs).shape == (8, robot.n_joints)


@pytest.mark.parametrize("mode", ["int8", "float"])
def test_input_layer_modes(mlp_onnx, tmp_path, mode):
    q, report = run_pass("quantize", mlp_onnx, load_robot("a1"), tmp_path / "q",
                         calibration_episodes=1, heldout_episodes=1, input_layer=mode)
    model = onnx.load(str(q.path))
    inits = {i.name for i in model.graph.initializer}
    first = next(n for n in model.graph.node if n.op_type in ("MatMul", "Gemm"))
    assert input_layers(onnx.load(str(mlp_onnx.path))) == [first.name]
    assert (first.input[1] in inits) is (mode == "float")    # float weights, or through a DQ
    assert report["input_layer"] == mode and tensorrt_ready(model) == []


def test_weight_only_activations(mlp_onnx, tmp_path):
    """activations="float": int8 weights behind their DequantizeLinear, no activation Q/DQ left,
    closer to float than the int8 x int8 model on the same observations, and still smaller."""
    robot = load_robot("a1")
    opts = dict(calibration_episodes=1, heldout_episodes=1, input_layer="float")
    q8, r8 = run_pass("quantize", mlp_onnx, robot, tmp_path / "q8", activations="int8", **opts)
    wo, rwo = run_pass("quantize", mlp_onnx, robot, tmp_path / "wo", activations="float", **opts)
    model = onnx.load(str(wo.path))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" in ops
    inits = {i.name: i for i in model.graph.initializer}
    dq_inputs = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq_inputs and all(inits[name].data_type == onnx.TensorProto.INT8 for name in dq_inputs)
    assert rwo["activations"] == "float" and tensorrt_ready(model) == []
    assert rwo["mean_action_err"] < r8["mean_action_err"]
    assert rwo["bytes_quantized"] < rwo["bytes_float"]


def test_weight_only_scales_per_output_channel(mlp_onnx, tmp_path):
    """Weight-only int8 keeps one scale per output channel of each hidden weight matrix (the
    default), which is closer to float than one scale per matrix on the same observations."""
    robot = load_robot("a1")
    opts = dict(calibration_episodes=1, heldout_episodes=1, activations="float")
    runs = {pc: run_pass("quantize", mlp_onnx, robot, tmp_path / f"pc{pc}", per_channel=pc,
                         **opts) for pc in (True, False)}
    for pc, (q, _) in runs.items():
        model = onnx.load(str(q.path))
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert dqs and all(inits[n.input[1]].size == (inits[n.input[0]].shape[1] if pc else 1)
                           for n in dqs)
    assert runs[True][1]["mean_action_err"] < runs[False][1]["mean_action_err"]


def test_cpu_default_is_weight_only_and_folds_at_load(mlp_onnx, tmp_path):
    """On the cpu hardware target (onnxruntime-cpu) `auto` gives weight-only int8, marked in the
    metadata; `ort_session` folds its DequantizeLinears at load and still computes the same."""
    import onnxruntime as ort

    robot = load_robot("a1")
    q, rq = run_pass("quantize", mlp_onnx, robot, tmp_path / "q", calibration_episodes=1,
                     heldout_episodes=1, input_layer="float")
    model = onnx.load(str(q.path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert rq["activations"] == "float" and meta["int8_activations"] == "false"
    assert "QuantizeLinear" not in {n.op_type for n in model.graph.node}
    plain = ort.InferenceSession(str(q.path), providers=["CPUExecutionProvider"])
    obs = random_obs(robot, 64)
    np.testing.assert_allclose(ort_session(q.path).run(None, {"obs": obs})[0],
                               plain.run(None, {"obs": obs})[0], atol=1e-5)


def test_weight_only_first_layer_is_fp16(mlp_onnx, tmp_path):
    """By default on cpu the first layer's weights (normalisation folded in) are stored in fp16
    behind a Cast, the hidden ones in int8; the file is smaller and still close to float."""
    robot = load_robot("a1")
    q, report = run_pass("quantize", mlp_onnx, robot, tmp_path / "q", calibration_episodes=1,
                         heldout_episodes=1)
    model = onnx.load(str(q.path))
    assert report["input_layer"] == "fp16" and report["activations"] == "float"
    inits = {t.name: t for t in model.graph.initializer}
    products = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    feeds = {o: n for n in model.graph.node for o in n.output}
    first, hidden = feeds[products[0].input[1]], feeds[products[1].input[1]]
    assert first.op_type == "Cast" and inits[first.input[0]].data_type == onnx.TensorProto.FLOAT16
    assert hidden.op_type == "DequantizeLinear"
    assert inits[hidden.input[0]].data_type == onnx.TensorProto.INT8
    assert report["mean_action_err"] < 0.01 and report["size_ratio"] < 0.5
    assert tensorrt_ready(model) == []


def test_int8_pinned_keeps_output_layer_float(a1_onnx, tmp_path):
    _, exported, _ = a1_onnx
    q, report = run_pass("quantize", exported, load_robot("a1"), tmp_path / "q",
                         calibration_episodes=1, heldout_episodes=0, max_action_error=0.2)
    model = onnx.load(str(q.path))
    assert tensorrt_ready(model) == []
    # The action layer's products (the head and the joint-state skip added to it) read float
    # weights straight from initializers, not through a DequantizeLinear; the rest is int8.
    inits = {i.name: i for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    last = output_layers(model)
    assert len(last) == 2
    assert all(by_name[n].input[1] in inits for n in last)
    widths = sorted(tuple(inits[by_name[n].input[1]].dims) for n in last)
    assert widths == [(3, 1), (32, 1)]        # skip over (q, qdot, last action); head over d_model
    products = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert any(n.input[1] not in inits for n in products)      # the blocks are quantized


def test_tensorrt_ready_flags_bad_qdq():
    from onnx import TensorProto, helper

    zp_u8 = helper.make_tensor("zp", TensorProto.UINT8, [], [3])
    bias = helper.make_tensor("b", TensorProto.INT32, [2], [1, 2])
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q0"),
         helper.make_node("DequantizeLinear", ["b", "s"], ["bf"], name="dq_bias")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [2])],
        initializer=[zp_u8, bias, helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])])
    problems = tensorrt_ready(helper.make_model(graph))
    assert any("UINT8" in p for p in problems)
    assert any("quantized bias" in p for p in problems)
    assert any("no zero point" in p for p in problems)


def test_fp16_loads_and_is_close(mlp_onnx, tmp_path):
    robot = load_robot("a1")
    h, report = run_pass("quantize", mlp_onnx, robot, tmp_path / "h", precision="fp16",
                         heldout_episodes=0)
    assert report["mean_action_err"] < 1e-2
    assert h.n_bytes < 0.6 * mlp_onnx.n_bytes
    model = onnx.load(str(h.path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {p.key: p.value for p in model.metadata_props}["precision"] == "fp16"
    assert load_policy(h.path, robot).act(random_obs(robot, 4)).shape == (4, 12)


# ------------------------------------------------------------------------------ build-tensorrt


def _tensorrt_available() -> bool:
    try:
        import_tensorrt()
    except ToolUnavailable:
        return False
    return True


@pytest.mark.tensorrt
@pytest.mark.skipif(not _tensorrt_available(), reason="needs TensorRT and a CUDA device")
def test_build_tensorrt(a1_onnx, tmp_path):
    _, exported, _ = a1_onnx
    out, report = run_pass("build-tensorrt", exported, load_robot("a1"), tmp_path / "trt")
    assert out.path.name == "policy.plan" and out.n_bytes > 0
    info = json.loads((out.path.parent / "policy.plan.json").read_text())
    assert info["tensorrt_version"] and report["plan_bytes"] == out.n_bytes


def test_build_tensorrt_unavailable(a1_onnx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)      # import tensorrt -> ImportError
    _, exported, _ = a1_onnx
    with pytest.raises(ToolUnavailable, match="TensorRT is not installed") as e:
        run_pass("build-tensorrt", exported, load_robot("a1"), tmp_path / "trt")
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "trt").iterdir())

