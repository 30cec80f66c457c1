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
        self.n_bodies = n_bodies

    def forward(self, obs: torch.Tensor, body_onehot: torch.Tensor) -> torch.Tensor:
        onehot = body_onehot.unsqueeze(0).expand(obs.shape[0], -1)
        return self.net(torch.cat([obs, onehot], dim=1))

    def one_body_params(self) -> int:
        """Pinned, the one-hot's columns of the first weight fold into its bias."""
        return sum(p.numel() for p in self.parameters()) - self.net[0].out_features * self.n_bodies


def _export(model: nn.Module, body_input: str, body_example: torch.Tensor, n_obs: int,
            folder: Path, stem: str) -> tuple[Path, Path]:
    """`model` saved as folder/stem.onnx and folder/stem.pt2, dynamic batch."""
    return _export_io(model, {"obs": torch.zeros(2, n_obs), body_input: body_example}, {"obs"},
                      ["action"], folder, stem)


def _export_io(model: nn.Module, inputs: dict[str, torch.Tensor], batched: set[str],
               outputs: list[str], folder: Path, stem: str) -> tuple[Path, Path]:
    """`model` (its forward's arguments named as `inputs`) saved as folder/stem.onnx and
    folder/stem.pt2; the inputs in `batched` share a dynamic batch dimension."""
    model.eval()
    args = tuple(inputs.values())
    batch = torch.export.Dim("batch")
    dyn = {k: ({0: batch} if k in batched else None) for k in inputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, args, dynamic_shapes=dyn)
        torch.export.save(ep, folder / f"{stem}.pt2")
        prog = torch.onnx.export(model, args, dynamo=True, input_names=list(inputs),
                                 output_names=outputs, dynamic_shapes=dyn, opset_version=18,
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
    """A thin build of a foreign model; a test of what it makes passes `short_toml["a1"]` as
    the target (3 s episodes): the scores it reports are plumbing here."""
    out = tmp / "out"
    res = runner.invoke(app, ["build", str(model), "--interface", str(toml), "--target", target,
                              "--passes", "pin-embodiment,export-onnx,quantize", "--episodes",
                              "1", "--profile", "fast", "--out", str(out), "--cache-dir",
                              str(tmp / "cache"), "--json", *extra])
    return res, out


@pytest.mark.parametrize("arch", ["hpt", "onehot"])
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_thin_build_pins_exports_and_quantizes(short_toml, models, tmp_path, arch, fmt):
    torch_model, onnx_path, pt2_path = models[arch]
    src = onnx_path if fmt == "onnx" else pt2_path
    res, out = _build(src, models["folder"] / f"{arch}.toml", tmp_path, target=short_toml["a1"])
    assert res.exit_code == 0, _out(res)
    report = json.loads(res.stdout)
    names = [s["name"] for s in report["stages"]]
    assert names == ["fat", "pin-embodiment", "export-onnx", "quantize"], names
    pin = report["stages"][1]
    checks = pin["checks"]
    assert checks["max_abs_err"] <= 1e-5 and checks["foreign"] == fmt
    assert checks["n_check_obs"] > 4096            # random and closed-loop observations
    # HPT: none of spot's stem or head is left; one-hot: no weight of the one-hot's columns
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


def _arm_model(tmp_path: Path) -> tuple[HPT, Path, Path]:
    """An HPT-style reach policy for panda and kuka_iiwa, its ONNX file and interface."""
    panda = load_robot("panda")
    model = HPT(obs_dim(panda), panda.n_joints, 2)
    onnx_path, _ = _export(model, "body_id", torch.tensor([0]), obs_dim(panda), tmp_path, "arm")
    toml = tmp_path / "arm.toml"
    toml.write_text('format = "xcompile-interface/1"\nobservation = "obs"\naction = "action"\n'
                    'family = "reach"\n[bodies.panda]\nbody_id = [0]\n'
                    '[bodies.kuka_iiwa]\nbody_id = [1]\n')
    return model, onnx_path, toml


def test_arm_target_panda(tmp_path):
    """A reach fat policy (HPT-style) for panda and kuka_iiwa, pinned for panda."""
    from xcompile.frontends.graph import fat_graph
    from xcompile.frontends.interface import read_interface
    from xcompile.frontends.measure import graph_params
    from xcompile.frontends.pin import pin_graph

    panda = load_robot("panda")
    model, onnx_path, toml = _arm_model(tmp_path)
    fg = fat_graph(onnx_path, read_interface(toml), panda)
    pinned = pin_graph(fg)
    assert graph_params(pinned) == model.one_body_params()


def test_default_plan_runs_on_a_foreign_arm(tmp_path):
    """The whole default plan on a foreign reach policy: rl-finetune and build-tensorrt skip
    with their reason, distill uses the pinned graph as a black-box teacher, the report has
    its usual stage table. (The trained foreign policies' figures: bench/RESULTS.md.)"""
    model, onnx_path, toml = _arm_model(tmp_path)
    config = tmp_path / "build.toml"
    config.write_text("[pass.distill]\nrounds = 2\nepisodes_per_round = 1\nfit_epochs = 5\n"
                      "final_fit_epochs = 5\n")
    res = runner.invoke(app, ["build", str(onnx_path), "--interface", str(toml), "--target",
                              "panda", "--config", str(config), "--episodes", "1",
                              "--profile", "fast", "--out", str(tmp_path / "out"),
                              "--cache-dir", str(tmp_path / "cache"), "--json"])
    assert res.exit_code == 0, _out(res)
    report = json.loads(res.stdout)
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["fat", "pin-embodiment", "rl-finetune", "distill", "export-onnx",
                            "quantize", "build-tensorrt"], list(stages)
    assert stages["rl-finetune"]["skipped"] and stages["build-tensorrt"]["skipped"]
    assert stages["distill"]["checks"]["student"] == "mlp"
    assert stages["pin-embodiment"]["checks"]["params_pinned"] == model.one_body_params()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| stage | params | bytes |" in md and "\n| distill | " in md, md[:2000]


BAD_INTERFACES = [
    ('format = "xcompile-interface/9"', "format: expected 'xcompile-interface/1'"),
    ("observation = 3", "observation: Input should be a valid string"),
    ('family = "swim"', "family: Input should be 'locomotion', 'reach' or 'quadrotor'"),
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


def test_joint_token_transformer_with_descriptor_inputs(short_toml, tmp_path):
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
        res, out = _build(src, toml, tmp_path / src.suffix[1:], target=short_toml["a1"])
        assert res.exit_code == 0, _out(res)
        checks = json.loads(res.stdout)["stages"][1]["checks"]
        assert checks["max_abs_err"] <= 1e-5
        # the encoder's weights are gone; one [n, d] embedding (per body) is left in their place
        assert checks["params_pinned"] <= total - model.desc_params() + n * 16
        assert checks["params_removed"] >= model.desc_params() - n * 16


# ------------------------------------------------------------------------------ recurrent (d)


class GRUPolicy(nn.Module):
    """Reference (d): a recurrent policy with no body input, which (like RAPTOR) has to infer its
    body from its own history: Linear -> ELU -> GRU cell (hidden D) -> Linear -> tanh, the state
    explicit: (obs, h_in) -> (action, h_out)."""

    def __init__(self, n_obs: int, n_act: int, d: int = D):
        super().__init__()
        torch.manual_seed(5)
        self.inp = nn.Linear(n_obs, d)
        self.cell = nn.GRUCell(d, d)
        self.out = nn.Linear(d, n_act)
        with torch.no_grad():
            self.cell.weight_hh.mul_(3.0)         # a long memory: the state matters
            self.out.weight.mul_(3.0)

    def forward(self, obs: torch.Tensor, h_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.cell(nn.functional.elu(self.inp(obs)), h_in)
        return torch.tanh(self.out(h)), h


class HPTGRU(nn.Module):
    """A recurrent policy with a body input: per-body stems (gathered by `body_id`) into a shared
    GRU cell and head."""

    def __init__(self, n_obs: int, n_act: int, n_bodies: int, d: int = D):
        super().__init__()
        g = torch.Generator().manual_seed(6)
        self.stem_w = nn.Parameter(torch.randn(n_bodies, n_obs, d, generator=g) * 0.2)
        self.stem_b = nn.Parameter(torch.randn(n_bodies, d, generator=g) * 0.1)
        torch.manual_seed(6)
        self.cell = nn.GRUCell(d, d)
        self.head = nn.Linear(d, n_act)

    def forward(self, obs: torch.Tensor, body_id: torch.Tensor, h_in: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        i = body_id[0]
        h = self.cell(torch.tanh(obs @ self.stem_w[i] + self.stem_b[i]), h_in)
        return torch.tanh(self.head(h)), h

    def one_body_params(self) -> int:
        return (self.stem_w[0].numel() + self.stem_b[0].numel()
                + sum(p.numel() for p in [*self.cell.parameters(), *self.head.parameters()]))


REC_TOML = """format = "xcompile-interface/1"
observation = "obs"
action = "action"
family = "locomotion"        # no [bodies.*]: no embodiment input, so any locomotion target

[recurrent]
[[recurrent.state]]
input = "h_in"               # graph input that takes the state (batch, 16)
output = "h_out"             # graph output that gives the next state
shape = [16]
dtype = "float32"
reset = "zeros"
"""

HPTGRU_TOML = REC_TOML.replace("[recurrent]", "[bodies.a1]\nbody_id = [1]\n[bodies.spot]\n"
                               "body_id = [0]\n\n[recurrent]")


@pytest.fixture(scope="module")
def rec(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("recurrent")
    a1 = load_robot("a1")
    n_obs, n_act = obs_dim(a1), a1.n_joints
    gru, hgru = GRUPolicy(n_obs, n_act), HPTGRU(n_obs, n_act, 2)
    out = {"gru": (gru, *_export_io(gru, {"obs": torch.zeros(2, n_obs),
                                          "h_in": torch.zeros(2, D)}, {"obs", "h_in"},
                                    ["action", "h_out"], folder, "gru")),
           "hgru": (hgru, *_export_io(hgru, {"obs": torch.zeros(2, n_obs),
                                             "body_id": torch.tensor([1]),
                                             "h_in": torch.zeros(2, D)}, {"obs", "h_in"},
                                      ["action", "h_out"], folder, "hgru")),
           "folder": folder}
    (folder / "rec.toml").write_text(REC_TOML)
    (folder / "hgru.toml").write_text(HPTGRU_TOML)
    return out


def _torch_steps(model: nn.Module, xs: np.ndarray, *extra: torch.Tensor,
                 h0: np.ndarray | None = None) -> np.ndarray:
    """The torch model over a sequence xs [T, B, n_obs], its state carried from `h0` (zeros)."""
    h = torch.zeros(xs.shape[1], D) if h0 is None else torch.as_tensor(h0).expand(xs.shape[1], D)
    acts = []
    with torch.inference_mode():
        for x in xs:
            a, h = model(torch.as_tensor(x), *extra, h)
            acts.append(a.numpy())
    return np.stack(acts)


def _episodes_in_lock_step(policy, xs: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
    """Drive a stateful policy as `evaluate` does: episodes of different lengths in lock-step,
    rows dropping out as episodes end; returns each episode's actions [T_i, n_act]."""
    policy.reset_states()
    acts: list[list[np.ndarray]] = [[] for _ in lengths]
    for t in range(max(lengths)):
        live = [e for e, n in enumerate(lengths) if t < n]
        policy.set_rows(live)
        for e, a in zip(live, policy(xs[t, live])):
            acts[e].append(a)
    return [np.stack(a) for a in acts]


@pytest.mark.parametrize("fmt, precision", [("onnx", "int8"), ("pt2", "int8"), ("onnx", "fp16")])
def test_recurrent_thin_build_pins_exports_and_quantizes(short_toml, rec, tmp_path, fmt, precision):
    gru, onnx_path, pt2_path = rec["gru"]
    res, out = _build(onnx_path if fmt == "onnx" else pt2_path, rec["folder"] / "rec.toml",
                      tmp_path, f"--{precision}", target=short_toml["a1"])
    assert res.exit_code == 0, _out(res)
    report = json.loads(res.stdout)
    assert [s["name"] for s in report["stages"]] == ["fat", "pin-embodiment", "export-onnx",
                                                     "quantize"]
    checks = report["stages"][1]["checks"]
    assert checks["max_abs_err"] <= 1e-5 and checks["recurrent_states"] == 1
    assert checks["n_check_obs"] > 4096 + 140        # random, and one closed-loop episode
    #                                                   (3 s at 50 Hz: 150 steps)
    assert checks["params_pinned"] == sum(p.numel() for p in gru.parameters())
    q = report["stages"][3]["checks"]
    assert q["check_obs"] == "closed-loop" and q["mean_action_err"] < 0.02
    from xcompile.onnx.recurrent import RULE
    from xcompile.onnx.session import ort_session
    from xcompile.policy import load_policy

    sess = ort_session(out / "policy.onnx")
    assert [i.name for i in sess.get_inputs()] == ["obs", "h_in"]
    assert [o.name for o in sess.get_outputs()] == ["action", "h_out"]
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["precision"] == precision
    assert json.loads(meta["recurrent_state"]) == {"rule": RULE, "states": [
        {"input": "h_in", "output": "h_out", "shape": [16], "dtype": "float32", "reset": "zeros"}]}
    # the quantized policy, loaded as a runtime loads it, follows the torch model over a sequence
    xs = np.random.default_rng(7).standard_normal((40, 3, obs_dim(load_robot("a1"))))
    xs = xs.astype(np.float32)
    got = _episodes_in_lock_step(load_policy(out / "policy.onnx", load_robot("a1")).act, xs,
                                 [40, 40, 40])
    assert np.abs(np.stack(got, 1) - _torch_steps(gru, xs)).max() < 0.1


def test_recurrent_pinned_equals_torch_step_by_step_and_evals_like_fat(rec, tmp_path):
    """fp32: the pinned policy, loaded by the runtime loader, is the torch model run step by step
    with its state carried from the recorded reset value (a list here; to 1e-5), per episode
    while episodes of several lengths share the batch; `xcompile eval` of it and of the fat model
    give the same per-episode scores."""
    gru, onnx_path, _ = rec["gru"]
    h0 = np.linspace(-0.8, 0.8, D).round(3).astype(np.float32)
    toml = tmp_path / "reset.toml"
    toml.write_text(REC_TOML.replace('reset = "zeros"', f"reset = {h0.tolist()}"))
    out = tmp_path / "out"
    res = runner.invoke(app, ["build", str(onnx_path), "--interface", str(toml), "--target",
                              "a1", "--passes", "pin-embodiment,export-onnx", "--episodes", "1",
                              "--profile", "fast", "--out", str(out), "--cache-dir",
                              str(tmp_path / "cache"), "--json"])
    assert res.exit_code == 0, _out(res)
    from xcompile.policy import load_policy

    a1 = load_robot("a1")
    policy = load_policy(out / "policy.onnx", a1).act
    xs = np.random.default_rng(8).standard_normal((60, 3, obs_dim(a1))).astype(np.float32)
    want = _torch_steps(gru, xs, h0=h0)
    assert np.abs(want - _torch_steps(gru, xs)).max() > 1e-2    # the reset value matters
    lengths = [60, 25, 41]
    got = _episodes_in_lock_step(policy, xs, lengths)
    for e, n in enumerate(lengths):
        assert np.abs(got[e] - want[:n, e]).max() <= 1e-5
    got_again = _episodes_in_lock_step(policy, xs, lengths)      # reset at the rollout's start
    assert all(np.array_equal(a, b) for a, b in zip(got, got_again))
    scores = {}
    for name, args in (("pinned", [str(out / "policy.onnx")]),
                       ("fat", [str(onnx_path), "--interface", str(toml)])):
        res = runner.invoke(app, ["eval", *args, "--target", "a1", "--episodes", "2", "--json"])
        assert res.exit_code == 0, _out(res)
        scores[name] = json.loads(res.stdout)["scores"]
    assert scores["pinned"] == scores["fat"]


class _NoReset:
    """Sabotaged twin: a row keeps its state when a new episode takes it over (the state is
    carried across episodes instead of reset)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def reset_states(self) -> None:
        self.inner.reset_states()

    def set_rows(self, episodes: list[int]) -> None:
        self.inner.set_rows(list(range(len(episodes))))

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.inner(obs)


def test_recurrent_eval_is_per_episode_and_independent_of_parallel(rec):
    from xcompile.evaluate import score_policy
    from xcompile.frontends.graph import fat_graph_policy

    a1 = load_robot("a1")
    act = fat_graph_policy(rec["gru"][1], rec["folder"] / "rec.toml", a1).act
    batched = score_policy(act, a1, 3, seed=0).scores                    # parallel 10
    serial = score_policy(act, a1, 3, seed=0, parallel=1).scores
    assert batched == serial
    alone = score_policy(act, a1, 1, seed=0, first_episode=2).scores     # a fresh state
    assert alone == serial[2:]
    broken = score_policy(_NoReset(act), a1, 3, seed=0, parallel=1).scores
    assert broken[0] == serial[0]          # the first episode starts from the reset state ...
    assert broken[1] != serial[1] and broken[2] != serial[2]   # ... the others from the last one


BAD_RECURRENT = [
    ('input = "h_in"', 'input = "h"',
     "recurrent.state.0.input: graph input 'h' does not exist; the graph's inputs are obs, h_in"),
    ('output = "h_out"', 'output = "h_next"',
     "recurrent.state.0.output: graph output 'h_next' does not exist"),
    ("shape = [16]", "shape = [8]", "recurrent.state.0.input: graph input 'h_in' is float32 of "
     "shape ['batch', 16]; the state's shape and dtype say float32 of shape [batch, 8]"),
    ('dtype = "float32"', 'dtype = "float64"', "the state's shape and dtype say float64"),
    ('dtype = "float32"', 'dtype = "int8"',
     "recurrent.state.0.dtype: Input should be 'float32', 'float16' or 'float64'"),
    ('reset = "zeros"', "reset = [0.0, 1.0]",
     "recurrent.state.0.reset: 2 values, but the state has shape [16] (16 values)"),
    ('reset = "zeros"', 'reset = "ones"', 'recurrent.state.0.reset: expected "zeros" or a list'),
    ('output = "h_out"', "", "recurrent.state.0.output: missing: expected graph output"),
    ('reset = "zeros"', 'reset = "zeros"\nsize = 3',
     "recurrent.state.0.size: unknown field; expected one of input, output, shape, dtype, reset"),
    ('input = "h_in"', 'input = "obs"', "recurrent.state.0.input: 'obs' is a name the pinned "
     "policy gives its observation or action"),
    ("[recurrent]", "[recurrent]\nkind = 'gru'", "recurrent.kind: unknown field"),
    ("[[recurrent.state]]", "", "recurrent.state: missing: expected [[recurrent.state]] tables"),
]


@pytest.mark.parametrize("old, new, message", BAD_RECURRENT)
def test_bad_recurrent_table_one_line_error_nothing_written(rec, tmp_path, old, new, message):
    toml = tmp_path / "bad.toml"
    assert old in REC_TOML
    toml.write_text(REC_TOML.replace(old, new))
    res, out = _build(rec["gru"][1], toml, tmp_path)
    assert res.exit_code == 2, _out(res)
    err = _out(res)
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_recurrent_interface_mismatches_and_plans_refused(rec, models, tmp_path):
    """A state input left undescribed, bodies left out for a graph with a body input, and
    passes that do not take a recurrent policy yet: one line, exit 2, nothing written."""
    no_rec = tmp_path / "no_rec.toml"
    no_rec.write_text(REC_TOML[:REC_TOML.index("[recurrent]")])
    no_bodies = tmp_path / "no_bodies.toml"
    no_bodies.write_text(HPT_TOML[:HPT_TOML.index("[bodies.a1]")])
    toml = rec["folder"] / "rec.toml"
    cases = [
        (rec["gru"][1], no_rec, ["--passes", "pin-embodiment"],
         "bodies: the graph has embodiment inputs (h_in); give a [bodies.NAME] table"),
        (models["hpt"][1], no_bodies, ["--passes", "pin-embodiment"],
         "bodies: the graph has embodiment inputs (body_id)"),
        (rec["gru"][2], toml, ["--emit", "c", "--passes", "pin-embodiment,export-onnx"],
         "emit-c does not take a recurrent policy yet"),
    ]
    for i, (model, iface, extra, message) in enumerate(cases):
        work = tmp_path / f"case{i}"
        res = runner.invoke(app, ["build", str(model), "--interface", str(iface), "--target",
                                  "a1", "--profile", "fast", "--out", str(work / "out"),
                                  "--cache-dir", str(work / "cache"), *extra])
        assert res.exit_code == 2, (message, _out(res))
        assert message in _out(res) and len(_out(res).strip().splitlines()) == 1, _out(res)
        assert not work.exists()


def test_recurrent_with_a_body_input_pins_and_equals_fat(short_toml, rec, tmp_path):
    """HPT-like stems + a GRU: pinning drops the other body's stem, keeps the state, and the
    pinned graph equals the torch model step by step for both bodies."""
    from xcompile.frontends.graph import fat_graph
    from xcompile.frontends.interface import read_interface
    from xcompile.frontends.measure import graph_params
    from xcompile.frontends.pin import pin_graph
    from xcompile.onnx.recurrent import StatefulPolicy
    from xcompile.onnx.session import ort_session

    hgru, onnx_path, pt2_path = rec["hgru"]
    toml = rec["folder"] / "hgru.toml"
    res, _ = _build(pt2_path, toml, tmp_path, target=short_toml["a1"])
    assert res.exit_code == 0, _out(res)
    checks = json.loads(res.stdout)["stages"][1]["checks"]
    assert checks["max_abs_err"] <= 1e-5 and checks["recurrent_states"] == 1
    assert checks["params_pinned"] == hgru.one_body_params()
    for robot, body in (("a1", 1), ("spot", 0)):
        r = load_robot(robot)
        fg = fat_graph(onnx_path, read_interface(toml), r)
        pinned = pin_graph(fg)
        assert graph_params(pinned) == hgru.one_body_params()
        assert [i.name for i in pinned.graph.input] == ["obs", "h_in"]
        policy = StatefulPolicy.of_session(ort_session(pinned.SerializeToString()), "obs",
                                           "action", fg.states)
        xs = np.random.default_rng(9).standard_normal((30, 2, obs_dim(r))).astype(np.float32)
        got = np.stack(_episodes_in_lock_step(policy, xs, [30, 30]), 1)
        assert np.abs(got - _torch_steps(hgru, xs, torch.tensor([body]))).max() <= 1e-5


def test_pin_check_replays_closed_loop_with_the_state_carried(rec):
    """The closed-loop half of pin-embodiment's check: the fat graph's calls replayed through the
    pinned graph match to 1e-5; a twin whose state is never carried (each call a fresh episode)
    fails the same comparison."""
    from xcompile.evaluate import score_policy
    from xcompile.frontends.graph import fat_act, fat_graph
    from xcompile.frontends.interface import read_interface
    from xcompile.frontends.pin import pin_graph
    from xcompile.onnx.recurrent import StatefulPolicy, max_step_error, replay
    from xcompile.onnx.session import ort_session

    a1 = load_robot("a1")
    fg = fat_graph(rec["gru"][1], read_interface(rec["folder"] / "rec.toml"), a1)
    fat = fat_act(fg)
    fat.log = []
    score_policy(fat, a1, 2, seed=0, stream="pin-check")
    steps = fat.log
    assert len(steps) > 500 and {tuple(s.rows) for s in steps} >= {(0, 1)}
    pinned = StatefulPolicy.of_session(ort_session(pin_graph(fg).SerializeToString()), "obs",
                                       "action", fg.states)
    assert max_step_error(replay(pinned, steps, "obs"), steps) <= 1e-5

    class Forgetful(StatefulPolicy):
        calls = 0

        def set_rows(self, episodes):
            Forgetful.calls += 1
            super().set_rows([Forgetful.calls * 1000 + e for e in episodes])

    forgetful = Forgetful.of_session(ort_session(pin_graph(fg).SerializeToString()), "obs",
                                     "action", fg.states)
    assert max_step_error(replay(forgetful, steps, "obs"), steps) > 1e-2


def test_recurrent_inspect_and_damaged_contract(rec, tmp_path):
    gru, onnx_path, pt2_path = rec["gru"]
    toml = rec["folder"] / "rec.toml"
    res = runner.invoke(app, ["inspect", str(pt2_path), "--interface", str(toml), "--json"])
    assert res.exit_code == 0, _out(res)
    info = json.loads(res.stdout)
    assert info["recurrent"][0]["input"] == "h_in" and info["bodies"] == []
    assert [o["name"] for o in info["outputs"]] == ["action", "h_out"]
    # a pinned recurrent policy whose contract names a state input it does not have
    import onnx

    from xcompile.frontends.graph import fat_graph
    from xcompile.frontends.interface import read_interface
    from xcompile.frontends.pin import pin_graph
    from xcompile.onnx.contract import deployment_contract
    from xcompile.onnx.model import set_metadata
    from xcompile.onnx.recurrent import contract_value

    a1 = load_robot("a1")
    fg = fat_graph(onnx_path, read_interface(toml), a1)
    model = pin_graph(fg)
    bad = [type(s)("h_x", s.output, s.shape, s.dtype, s.reset) for s in fg.states]
    set_metadata(model, {**deployment_contract(a1, "", ["pin-embodiment"]),
                         "recurrent_state": contract_value(bad)})
    path = tmp_path / "damaged.onnx"
    onnx.save(model, str(path))
    res = runner.invoke(app, ["eval", str(path), "--target", "a1", "--episodes", "1"])
    assert res.exit_code == 2 and "names graph input 'h_x'" in _out(res), _out(res)
    assert len(_out(res).strip().splitlines()) == 1
