"""Foreign fat policies (issue 16): ONNX and torch.export front ends, the interface description,
generic pin-embodiment, and the rest of the plan on the pinned graph.

Reference architectures, written from the papers' descriptions and initialised at random:

- HPT-style (Wang et al. 2024, "Heterogeneous Pre-trained Transformers"): one stem per body that
  maps its proprioception into a shared latent, a shared trunk, one head per body; the body is
  chosen by a `body_id` input that gathers that body's stem and head from stacked weights;
- a one-hot-conditioned multi-task MLP: `body_onehot` concatenated to the observation.

Each is exported by the test to ONNX and to a torch.export program (.pt2).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from xcompile.cli import app
from xcompile.sim.env import obs_dim
from xcompile.targets import load_robot

runner = CliRunner()
D = 16          # latent width of the reference models


class HPT(nn.Module):
    """Per-body stems + shared trunk + per-body heads, selected by `body_id` (Gather)."""

    def __init__(self, n_obs: int, n_act: int, n_bodies: int, d: int = D):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem_w = nn.Parameter(torch.randn(n_bodies, n_obs, d, generator=g) * 0.2)
        self.stem_b = nn.Parameter(torch.randn(n_bodies, d, generator=g) * 0.1)
        self.trunk = nn.Sequential(nn.Linear(d, d), nn.ELU(), nn.Linear(d, d), nn.ELU())
        self.head_w = nn.Parameter(torch.randn(n_bodies, d, n_act, generator=g) * 0.2)
        self.head_b = nn.Parameter(torch.randn(n_bodies, n_act, generator=g) * 0.1)

    def forward(self, obs: torch.Tensor, body_id: torch.Tensor) -> torch.Tensor:
        i = body_id[0]
        h = torch.tanh(obs @ self.stem_w[i] + self.stem_b[i])
        return torch.tanh(self.trunk(h) @ self.head_w[i] + self.head_b[i])

    def one_body_params(self) -> int:
        return (self.stem_w[0].numel() + self.stem_b[0].numel() + self.head_w[0].numel()
                + self.head_b[0].numel() + sum(p.numel() for p in self.trunk.parameters()))


class OneHotMLP(nn.Module):
    """A multi-task MLP told its body by a one-hot vector concatenated to the observation."""

    def __init__(self, n_obs: int, n_act: int, n_bodies: int, d: int = 32):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(n_obs + n_bodies, d), nn.ELU(), nn.Linear(d, n_act),
                                 nn.Tanh())

    def forward(self, obs: torch.Tensor, body_onehot: torch.Tensor) -> torch.Tensor:
        onehot = body_onehot.unsqueeze(0).expand(obs.shape[0], -1)
        return self.net(torch.cat([obs, onehot], dim=1))


def _export(model: nn.Module, body_input: str, body_example: torch.Tensor, n_obs: int,
            folder: Path, stem: str) -> tuple[Path, Path]:
    """`model` saved as folder/stem.onnx and folder/stem.pt2, dynamic batch."""
    model.eval()
    args = (torch.zeros(2, n_obs), body_example)
    dyn = {"obs": {0: torch.export.Dim("batch")}, body_input: None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, args, dynamic_shapes=dyn)
        torch.export.save(ep, folder / f"{stem}.pt2")
        prog = torch.onnx.export(model, args, dynamo=True, input_names=["obs", body_input],
                                 output_names=["action"], dynamic_shapes=dyn, opset_version=18,
                                 verbose=False)
    prog.save(str(folder / f"{stem}.onnx"))
    return folder / f"{stem}.onnx", folder / f"{stem}.pt2"


HPT_TOML = """format = "xcompile-interface/1"
observation = "obs"          # graph input: the flat observation (batch first)
action = "action"            # graph output: the action, in the target's joint order
family = "locomotion"        # the task family it serves

[bodies.a1]                  # one table per body it serves: a value for every other input
body_id = [1]                # a list literal (dtype and shape from the graph input)
[bodies.spot]
body_id = [0]
"""

ONEHOT_TOML = """format = "xcompile-interface/1"
observation = "obs"
action = "action"
family = "locomotion"
[bodies.a1]
body_onehot = [0.0, 1.0]
[bodies.spot]
body_onehot = [1.0, 0.0]
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("foreign")
    n_obs, n_act = obs_dim(load_robot("a1")), load_robot("a1").n_joints
    hpt = HPT(n_obs, n_act, 2)
    onehot = OneHotMLP(n_obs, n_act, 2)
    out = {"hpt": (hpt, *_export(hpt, "body_id", torch.tensor([1]), n_obs, folder, "hpt")),
           "onehot": (onehot, *_export(onehot, "body_onehot", torch.tensor([0.0, 1.0]), n_obs,
                                       folder, "onehot"))}
    (folder / "hpt.toml").write_text(HPT_TOML)
    (folder / "onehot.toml").write_text(ONEHOT_TOML)
    out["folder"] = folder
    return out


def _out(res) -> str:
    return res.output          # stdout and stderr, as the user sees them


def _build(model: Path, toml: Path, tmp: Path, *extra: str, target: str = "a1"):
    out = tmp / "out"
    res = runner.invoke(app, ["build", str(model), "--interface", str(toml), "--target", target,
                              "--passes", "pin-embodiment,export-onnx,quantize", "--episodes",
                              "1", "--profile", "fast", "--out", str(out), "--cache-dir",
                              str(tmp / "cache"), "--json", *extra])
    return res, out


@pytest.mark.parametrize("arch", ["hpt", "onehot"])
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_thin_build_pins_exports_and_quantizes(models, tmp_path, arch, fmt):
    torch_model, onnx_path, pt2_path = models[arch]
    src = onnx_path if fmt == "onnx" else pt2_path
    res, out = _build(src, models["folder"] / f"{arch}.toml", tmp_path)
    assert res.exit_code == 0, _out(res)
    report = json.loads(res.stdout)
    names = [s["name"] for s in report["stages"]]
    assert names == ["fat", "pin-embodiment", "export-onnx", "quantize"], names
    pin = report["stages"][1]
    checks = pin["checks"]
    assert checks["max_abs_err"] <= 1e-5 and checks["foreign"] == fmt
    assert checks["n_check_obs"] > 4096            # random and closed-loop observations
    if arch == "hpt":      # none of spot's stem or head is left: exactly a1's weights
        assert checks["params_pinned"] == torch_model.one_body_params()
        assert checks["params_removed"] == (sum(p.numel() for p in torch_model.parameters())
                                            - torch_model.one_body_params())
        assert checks["bytes_removed"] > 0
    # the pinned ONNX policy: obs -> action with the deployment contract, equal to the fat model
    from xcompile.onnx.session import ort_session

    pinned = next(Path(out).glob("policy.onnx"))
    sess = ort_session(pinned)
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["robot"] == "a1" and json.loads(meta["pass_history"])[:2] == [
        "pin-embodiment", "export-onnx"] and meta["precision"] == "int8"
    x = np.random.default_rng(0).standard_normal((64, obs_dim(load_robot("a1")))).astype(np.float32)
    body = torch.tensor([1]) if arch == "hpt" else torch.tensor([0.0, 1.0])
    with torch.inference_mode():
        want = torch_model(torch.as_tensor(x), body).numpy()
    assert np.abs(sess.run(None, {"obs": x})[0] - want).max() < 0.1     # int8 weights
    assert report["stages"][0]["format"] == "fat-graph"


def test_pinned_equals_fat_for_spot_and_eval_runs(models, tmp_path):
    from xcompile.frontends.graph import fat_graph
    from xcompile.frontends.interface import read_interface
    from xcompile.frontends.pin import pin_graph
    from xcompile.onnx.session import ort_session

    hpt, onnx_path, _ = models["hpt"]
    spot = load_robot("spot")
    fg = fat_graph(onnx_path, read_interface(models["folder"] / "hpt.toml"), spot)
    sess = ort_session(pin_graph(fg).SerializeToString())
    x = np.random.default_rng(1).standard_normal((256, obs_dim(spot))).astype(np.float32)
    with torch.inference_mode():
        want = hpt(torch.as_tensor(x), torch.tensor([0])).numpy()
    assert np.abs(sess.run(None, {"obs": x})[0] - want).max() <= 1e-5
    res = runner.invoke(app, ["eval", str(onnx_path), "--interface",
                              str(models["folder"] / "hpt.toml"), "--target", "a1",
                              "--episodes", "1", "--json"])
    assert res.exit_code == 0, _out(res)
    doc = json.loads(res.stdout)
    assert doc["kind"] == "fat-graph" and len(doc["scores"]) == 1


def test_arm_target_panda(tmp_path):
    """A reach fat policy (HPT-style) for panda and kuka_iiwa, pinned for panda."""
    from xcompile.frontends.graph import fat_graph
    from xcompile.frontends.interface import read_interface
    from xcompile.frontends.measure import graph_params
    from xcompile.frontends.pin import pin_graph

    panda = load_robot("panda")
    model = HPT(obs_dim(panda), panda.n_joints, 2)
    onnx_path, _ = _export(model, "body_id", torch.tensor([0]), obs_dim(panda), tmp_path, "arm")
    toml = tmp_path / "arm.toml"
    toml.write_text('format = "xcompile-interface/1"\nobservation = "obs"\naction = "action"\n'
                    'family = "reach"\n[bodies.panda]\nbody_id = [0]\n'
                    '[bodies.kuka_iiwa]\nbody_id = [1]\n')
    fg = fat_graph(onnx_path, read_interface(toml), panda)
    pinned = pin_graph(fg)
    assert graph_params(pinned) == model.one_body_params()


BAD_INTERFACES = [
    ('format = "xcompile-interface/9"', "format: expected 'xcompile-interface/1'"),
    ("observation = 3", "observation: Input should be a valid string"),
    ('family = "swim"', "family: Input should be 'locomotion' or 'reach'"),
    ("[bodies.a1]\nbody_id = [1, 2]", "bodies.a1.body_id: 2 values, but graph input 'body_id' "
                                      "has shape [1]"),
    ("[bodies.a1]\nbody_id = [1.5]", "bodies.a1.body_id: expected integers"),
    ("[bodies.a1]\nbody_id = [1]\nlegs = [4]", "bodies.a1.legs: no such embodiment input"),
    ("[bodies.a1]\nother = [1]", "bodies.a1.other: no such embodiment input"),
    ('observation = "state"', "observation: graph input 'state' does not exist"),
    ('action = "act"', "action: graph output 'act' does not exist"),
    ("[bodies.spot]\nbody_id = [0]\n[bodies.laikago]\nbody_id = [1]",
     "bodies: no [bodies.a1] table"),
    ("colour = 1", "colour: unknown field"),
    ("observation = [", "not valid TOML"),
]


def _edit(toml: str, change: str) -> str:
    """HPT_TOML with the keys (or body tables) that `change` sets replaced by it."""
    lines = HPT_TOML.splitlines()
    if change.startswith("[bodies") or "\n[" in change:
        lines = lines[:lines.index("[bodies.a1]                  # one table per body it "
                                   "serves: a value for every other input")]
        return "\n".join(lines) + "\n" + change + "\n"
    key = change.split("=")[0].strip()
    kept = [ln for ln in lines if ln.split("=")[0].strip() != key]
    at = next(i for i, ln in enumerate(kept) if ln.startswith("["))
    return "\n".join([*kept[:at], change, *kept[at:]]) + "\n"


@pytest.mark.parametrize("change, message", BAD_INTERFACES)
def test_bad_interface_one_line_error_nothing_written(models, tmp_path, change, message):
    toml = tmp_path / "bad.toml"
    toml.write_text(_edit(HPT_TOML, change))
    res, out = _build(models["hpt"][1], toml, tmp_path)
    assert res.exit_code == 2, _out(res)
    err = _out(res)
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_mismatched_models_and_targets(models, tmp_path):
    folder = models["folder"]
    cases = [
        # a reach target for a locomotion policy
        (["--target", "panda"], models["hpt"][1], folder / "hpt.toml",
         "family: the fat policy serves 'locomotion', but target 'panda' does 'reach'"),
        # a body the policy does not serve
        (["--target", "laikago"], models["hpt"][1], folder / "hpt.toml",
         "bodies: no [bodies.laikago] table"),
    ]
    # an observation of the wrong width: a model made for 40 features
    wrong = HPT(40, 12, 2)
    onnx_path, pt2_path = _export(wrong, "body_id", torch.tensor([1]), 40, tmp_path, "narrow")
    for p in (onnx_path, pt2_path):
        cases.append(([], p, folder / "hpt.toml", "observation: graph input 'obs' has width 40, "
                      "but target 'a1' (locomotion) gives 50"))
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip at all")
    cases.append(([], junk, folder / "hpt.toml", "not a .pt2 archive"))
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"\x08\x07garbage" * 10)
    cases.append(([], fake, folder / "hpt.toml", "not an ONNX model"))
    cases.append(([], models["hpt"][1], None, "say how to drive it with --interface"))
    for i, (extra, model, toml, message) in enumerate(cases):
        work = tmp_path / f"case{i}"
        args = ["build", str(model), "--target", "a1", "--passes",
                "pin-embodiment,export-onnx", "--out", str(work / "out"), "--cache-dir",
                str(work / "cache"), *extra]
        if toml is not None:
            args += ["--interface", str(toml)]
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (message, _out(res))
        assert message in _out(res) and "Traceback" not in _out(res), (message, _out(res))
        assert not work.exists()


def test_pt2_with_pickled_payload_is_refused_before_loading(models, tmp_path):
    """torch.export.load would unpickle a pickled weight with weights_only=False."""
    import zipfile

    src = models["hpt"][2]
    bad = tmp_path / "evil.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("model_weights_config.json"):
                cfg = json.loads(data)
                first = next(iter(cfg["config"]))
                cfg["config"][first]["use_pickle"] = True
                data = json.dumps(cfg).encode()
            zout.writestr(item, data)
    from xcompile.errors import CheckpointError
    from xcompile.frontends.graph import load_graph

    with pytest.raises(CheckpointError, match="pickled or custom object"):
        load_graph(bad)


def test_plans_validate_for_a_foreign_input():
    from xcompile.errors import PlanError
    from xcompile.manager.plan import validate_plan
    from xcompile.passes import DEFAULT_PLAN

    validate_plan(["pin-embodiment", "export-onnx", "quantize"], input_format="fat-graph")
    validate_plan(DEFAULT_PLAN, input_format="fat-graph")     # rl-finetune skips, distill runs
    with pytest.raises(PlanError, match="export-onnx takes torch but the build starts from a "
                                        "fat-graph"):
        validate_plan(["export-onnx"], input_format="fat-graph")


def test_inspect_foreign_shows_what_each_body_keeps(models, tmp_path):
    torch_model, onnx_path, pt2_path = models["hpt"]
    toml = models["folder"] / "hpt.toml"
    total = sum(p.numel() for p in torch_model.parameters())
    for src in (onnx_path, pt2_path):
        res = runner.invoke(app, ["inspect", str(src), "--interface", str(toml), "--json"])
        assert res.exit_code == 0, _out(res)
        info = json.loads(res.stdout)
        assert info["params_total"] == total and info["family"] == "locomotion"
        assert [i["name"] for i in info["inputs"]] == ["obs", "body_id"]
        bodies = {b["name"]: b for b in info["bodies"]}
        assert set(bodies) == {"a1", "spot"}
        for b in bodies.values():       # pinned for one body: exactly one stem, trunk, head
            assert b["params_used"] == torch_model.one_body_params() and b["n_joints"] == 12
            assert 0 < b["fraction_used"] < 1
    res = runner.invoke(app, ["inspect", str(onnx_path)])        # no interface: the graph's I/O
    assert res.exit_code == 0 and "body_id" in res.output and "--interface" in res.output
    res = runner.invoke(app, ["inspect", "examples/fat_policy.pt", "--interface", str(toml)])
    assert res.exit_code != 0 and "foreign" in _out(res) and "Traceback" not in _out(res)
    bad = tmp_path / "bad.toml"
    bad.write_text(HPT_TOML.replace('observation = "obs"', 'observation = "state"'))
    res = runner.invoke(app, ["inspect", str(onnx_path), "--interface", str(bad)])
    assert res.exit_code != 0 and "'state' does not exist" in _out(res)


class JointTokens(nn.Module):
    """Reference (b): a transformer over joint tokens whose body comes in as a per-joint
    descriptor input `joint_desc` [n_joints, k] (MetaMorph/URMA-like), in a layout unlike
    xcompile's own: a descriptor encoder adds an embedding to each joint's state token, a
    separate global token carries the body's state, and a shared head reads each joint."""

    def __init__(self, n_global: int, n_joints: int, k: int = 8, d: int = 16):
        super().__init__()
        torch.manual_seed(2)
        self.n_global, self.n = n_global, n_joints
        self.desc_enc = nn.Sequential(nn.Linear(k, 64), nn.ELU(), nn.Linear(64, 64), nn.ELU(),
                                      nn.Linear(64, d))
        self.joint_in = nn.Linear(3, d)
        self.global_in = nn.Linear(n_global, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.ELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 1)

    def forward(self, obs: torch.Tensor, joint_desc: torch.Tensor) -> torch.Tensor:
        g, n = self.n_global, self.n
        state = torch.stack([obs[:, g:g + n], obs[:, g + n:g + 2 * n],
                             obs[:, g + 2 * n:g + 3 * n]], dim=-1)          # [B, n, 3]
        tokens = self.joint_in(state) + self.desc_enc(joint_desc)           # [B, n, d]
        x = torch.cat([self.global_in(obs[:, :g]).unsqueeze(1), tokens], dim=1)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.mlp(x)
        return torch.tanh(self.head(x[:, 1:]).squeeze(-1))

    def desc_params(self) -> int:
        return sum(p.numel() for p in self.desc_enc.parameters())


def test_joint_token_transformer_with_descriptor_inputs(tmp_path):
    """Pinning folds the descriptor encoder into one constant per body: the pinned graph equals
    the fat one (checked by the pass to 1e-5) and holds fewer weights."""
    a1 = load_robot("a1")
    n_obs, n = obs_dim(a1), a1.n_joints
    model = JointTokens(n_obs - 3 * n, n)
    desc = np.random.default_rng(3).standard_normal((2, n, 8)).round(3)
    onnx_path, pt2_path = _export(model, "joint_desc", torch.as_tensor(desc[1], dtype=torch.float32),
                                  n_obs, tmp_path, "tokens")
    toml = tmp_path / "tokens.toml"
    toml.write_text('format = "xcompile-interface/1"\nobservation = "obs"\naction = "action"\n'
                    f'family = "locomotion"\n[bodies.a1]\njoint_desc = {desc[1].tolist()}\n'
                    f'[bodies.spot]\njoint_desc = {desc[0].tolist()}\n')
    total = sum(p.numel() for p in model.parameters())
    for src in (onnx_path, pt2_path):
        res, out = _build(src, toml, tmp_path / src.suffix[1:])
        assert res.exit_code == 0, _out(res)
        checks = json.loads(res.stdout)["stages"][1]["checks"]
        assert checks["max_abs_err"] <= 1e-5
        # the encoder's weights are gone; one [n, d] embedding (per body) is left in their place
        assert checks["params_pinned"] <= total - model.desc_params() + n * 16
        assert checks["params_removed"] >= model.desc_params() - n * 16
