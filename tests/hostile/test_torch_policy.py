"""Hostile torch policy files: a one-robot `.pt` policy's own numbers must not make xcompile build,
allocate or walk more than the file holds.

Each case starts from a valid pinned or MLP policy for a1, edits what a stranger could edit (the
spec's sizes and types, the config inside a pinned spec, the free-form spec keys, the stored
tensors, the archive itself) and must be refused with a `CheckpointError` that names what is wrong,
within milliseconds, by the loader and through `xcompile eval` (exit code 2, no traceback). The
limits live in `xcompile.models.fat`.
"""

from __future__ import annotations

import io
import os
import re
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from xcompile.cli import app
from xcompile.errors import CheckpointError
from xcompile.models.checkpoint import load_checkpoint
from xcompile.models.fat import MAX_PICKLE_BYTES, PinnedPolicy, pin
from xcompile.models.slim import (
    MLPPolicy,
    build_from_spec,
    load_torch_policy,
    read_torch_policy,
    save_torch_policy,
    spec_of,
)
from xcompile.policy import body_descriptors
from xcompile.sim.env import obs_dim
from xcompile.targets import load_robot

runner = CliRunner()
FAST_S = 10.0     # generous: every refusal here takes milliseconds
HUGE = (10**6, 10**6)


# --------------------------------------------------------------------------------------------
# valid files to start from


@pytest.fixture(scope="module")
def a1():
    return load_robot("a1")


@pytest.fixture(scope="module")
def files(tiny_fat_ckpt, a1, tmp_path_factory) -> dict[str, bytes]:
    """The bytes of a valid pinned policy and a valid MLP policy for a1."""
    tmp = tmp_path_factory.mktemp("torch_policy")
    contract = {"robot": a1.name, "joint_order": list(a1.joints.names)}
    ckpt = load_checkpoint(tiny_fat_ckpt)
    desc, known = body_descriptors(ckpt, a1)
    pinned = pin(ckpt.model, desc, a1.family)
    save_torch_policy(tmp / "pinned.pt", pinned, {**spec_of(pinned), **contract,
                                                  "known_body": known})
    torch.manual_seed(0)
    mlp = MLPPolicy(obs_dim(a1), [16, 16], a1.n_joints, "elu", normalize=True)
    save_torch_policy(tmp / "mlp.pt", mlp, {**mlp.spec(), **contract,
                                            "source_checkpoint_sha256": "0" * 64})
    return {"pinned": (tmp / "pinned.pt").read_bytes(), "mlp": (tmp / "mlp.pt").read_bytes()}


def _hostile(files: dict[str, bytes], kind: str, tmp_path: Path,
             edit: Callable[[dict], Any]) -> Path:
    payload = torch.load(io.BytesIO(files[kind]), map_location="cpu", weights_only=True)
    out = edit(payload)
    path = tmp_path / f"hostile_{kind}.pt"
    torch.save(payload if out is None else out, path)
    return path


def _refused(path: Path, needles: tuple[str, ...]) -> None:
    """The loader and `xcompile eval` both refuse `path` quickly, naming each of `needles`."""
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        load_torch_policy(path)
    assert time.perf_counter() - t0 < FAST_S, "the loader's refusal was slow"
    msg = str(info.value)
    assert [n for n in needles if n not in msg] == [] and len(msg) < 2000, msg

    t0 = time.perf_counter()
    res = runner.invoke(app, ["eval", str(path), "--target", "a1", "--episodes", "1"])
    out = res.output + (getattr(res, "stderr", "") or "")
    assert (res.exit_code, type(res.exception)) == (2, SystemExit), out
    assert time.perf_counter() - t0 < FAST_S, "the CLI's refusal was slow"
    assert "Traceback" not in out and "error:" in out, out
    flat = "".join(out.split())   # rich wraps long lines: compare without whitespace
    assert [n for n in needles if "".join(n.split()) not in flat] == [], out


# --------------------------------------------------------------------------------------------
# edits: (id, which file, edit of the raw payload, substrings the error must contain)


def _spec(**update: Any) -> Callable[[dict], None]:
    return lambda p: p["spec"].update(update)


def _cfg(**update: Any) -> Callable[[dict], None]:
    return lambda p: p["spec"]["config"].update(update)


def _tensor(key: str, make: Callable[[dict], Any]) -> Callable[[dict], None]:
    return lambda p: p["state_dict"].__setitem__(key, make(p["state_dict"]))


def _set(key: str, value: Any) -> Callable[[dict], None]:
    return lambda p: p.__setitem__(key, value)


def _drop(key: str, inside: str | None = None) -> Callable[[dict], None]:
    def edit(p: dict) -> None:
        (p[inside] if inside else p).pop(key)
    return edit


def _nested(levels: int, fanout: int) -> list:
    """`levels` deep; with fanout 2 each level holds two references to one list: 2^levels leaves."""
    x: list = [0]
    for _ in range(levels):
        x = [x] * fanout
    return x


def _cycle() -> list:
    a: list = []
    a.append(a)
    return a


def _nan(state: dict) -> torch.Tensor:
    t = state["head.weight"].clone()
    t[0, 0] = float("nan")
    return t


W = "net.0.weight"   # (16, 50) in the MLP

CASES: list[tuple[str, str, Callable[[dict], Any], tuple[str, ...]]] = [
    # a pinned spec: its own fields
    ("n_joints_huge", "pinned", _spec(n_joints=10**9),
     ("n_joints = 1000000000", "256", "MAX_JOINTS")),
    ("n_joints_600_digits", "pinned", _spec(n_joints=10**600), ("n_joints = an integer of",)),
    ("n_joints_zero", "pinned", _spec(n_joints=0), ("n_joints = 0",)),
    ("n_joints_bool", "pinned", _spec(n_joints=True), ("n_joints = True", "valid integer")),
    ("n_joints_string", "pinned", _spec(n_joints="12"), ("n_joints = '12'", "valid integer")),
    ("n_joints_float", "pinned", _spec(n_joints=12.0), ("n_joints = 12.0", "valid integer")),
    ("n_joints_tensor", "pinned", _spec(n_joints=torch.tensor(12)), ("n_joints = a Tensor",)),
    ("n_joints_other", "pinned", _spec(n_joints=11), ("has shape", "needs")),
    ("family_unknown", "pinned", _spec(family="flying"), ("'flying'", "not one of")),
    ("family_not_string", "pinned", _spec(family=["locomotion"]), ("family = a list",)),
    ("family_missing", "pinned", _drop("family", "spec"), ("family",)),
    # a pinned spec: the fat config inside it
    ("d_model_huge", "pinned", _cfg(d_model=10**9), ("d_model = 1000000000", "8192")),
    ("n_layers_huge", "pinned", _cfg(n_layers=10**6), ("n_layers = 1000000", "256")),
    ("desc_layers_huge", "pinned", _cfg(desc_layers=10**6), ("desc_layers = 1000000", "64")),
    ("fat_params_over_limit", "pinned", _cfg(desc_hidden=65536, desc_layers=64),
     ("parameters", "MAX_PARAMS")),
    ("config_bigger_than_the_file", "pinned",
     _cfg(d_model=1024, n_heads=8, d_ff=4096, n_layers=8),
     ("spec describes", "parameters, more than its")),
    ("d_model_string", "pinned", _cfg(d_model="32"), ("d_model = '32'", "valid integer")),
    ("config_not_dict", "pinned", _spec(config=[1, 2]), ("config",)),
    ("config_unknown_field", "pinned", _cfg(evil=1), ("evil",)),
    ("many_families", "pinned", _cfg(global_dims={f"f{i}": 1 for i in range(10**5)}),
     ("MAX_FAMILIES",)),
    # an MLP spec
    ("obs_dim_huge", "mlp", _spec(obs_dim=10**9), ("obs_dim = 1000000000", "MAX_OBS_DIM")),
    ("hidden_width_huge", "mlp", _spec(hidden=[10**9]),
     ("hidden.0 = 1000000000", "65536", "MAX_MLP_WIDTH")),
    ("hidden_many_layers", "mlp", _spec(hidden=[16] * 10**5), ("hidden", "MAX_MLP_LAYERS")),
    ("hidden_params_over_limit", "mlp", _spec(hidden=[65536] * 64),
     ("2,000,000,000", "MAX_PARAMS")),
    ("hidden_bigger_than_the_file", "mlp", _spec(hidden=[4096, 4096]),
     ("spec describes", "parameters, more than its")),
    ("hidden_string", "mlp", _spec(hidden="16"), ("hidden = '16'",)),
    ("hidden_bool", "mlp", _spec(hidden=[True, 16]), ("hidden.0 = True",)),
    ("hidden_self_referential", "mlp", _spec(hidden=_cycle()), ("hidden.0",)),
    ("n_actions_huge", "mlp", _spec(n_actions=10**6), ("n_actions = 1000000", "MAX_JOINTS")),
    ("obs_dim_float", "mlp", _spec(obs_dim=50.0), ("obs_dim = 50.0", "valid integer")),
    ("activation_unknown", "mlp", _spec(activation="evil"), ("activation = 'evil'",)),
    ("activation_not_string", "mlp", _spec(activation=5), ("activation = 5",)),
    ("normalize_string", "mlp", _spec(normalize="yes"), ("normalize = 'yes'",)),
    ("kind_unknown", "mlp", _spec(kind="transformer"), ("kind 'transformer'",)),
    ("kind_tensor", "mlp", _spec(kind=torch.tensor([1, 2])), ("kind a Tensor",)),
    ("spec_not_dict", "mlp", _set("spec", [1, 2, 3]), ("'spec' must be a dict",)),
    # the free-form spec keys a pass records
    ("robot_not_string", "mlp", _spec(robot=5), ("robot = 5",)),
    ("robot_huge", "mlp", _spec(robot="x" * 10**6), ("robot", "MAX_NAME_LEN")),
    ("joint_order_huge", "mlp", _spec(joint_order=["j"] * 10**5), ("joint_order", "MAX_JOINTS")),
    ("joint_order_not_list", "mlp", _spec(joint_order=7), ("joint_order = 7",)),
    ("extra_dag_bomb", "mlp", _spec(note=_nested(30, fanout=2)), ("'spec'", "MAX_EXTRA_ITEMS")),
    ("extra_deep", "mlp", _spec(note=_nested(100, fanout=1)), ("'spec'", "MAX_EXTRA_DEPTH")),
    ("extra_tensor", "mlp", _spec(note=torch.zeros(1).expand(*HUGE)), ("'spec'", "Tensor")),
    # the stored tensors
    ("tensor_huge_view", "mlp", _tensor(W, lambda s: torch.zeros(1).expand(*HUGE)),
     ("net.0.weight", "has shape (1000000, 1000000)")),
    ("tensor_stride_0", "mlp", _tensor(W, lambda s: torch.zeros(1).expand(16, 50)),
     ("net.0.weight", "strides (0, 0)")),
    ("tensor_transposed", "mlp", _tensor(W, lambda s: torch.zeros(50, 16).t()),
     ("net.0.weight", "strides")),
    ("tensor_wrong_shape", "mlp", _tensor(W, lambda s: torch.zeros(16, 49)),
     ("net.0.weight", "has shape (16, 49)", "(16, 50)")),
    ("tensor_int", "mlp", _tensor(W, lambda s: torch.zeros(16, 50, dtype=torch.int64)),
     ("net.0.weight", "dtype int64")),
    ("tensor_not_tensor", "mlp", _tensor(W, lambda s: [[0.0] * 50] * 16),
     ("net.0.weight", "is a list, not a tensor")),
    ("tensor_sparse", "mlp", _tensor(W, lambda s: torch.zeros(16, 50).to_sparse()),
     ("net.0.weight", "sparse")),
    ("tensor_nan", "pinned", _tensor("head.weight", _nan), ("NaN or Inf", "head.weight")),
    ("tensor_missing", "mlp", _drop(W, "state_dict"), ("do not fit", "missing")),
    ("tensor_unexpected", "mlp", _tensor("evil", lambda s: torch.zeros(1)),
     ("do not fit", "unexpected", "'evil'")),
    ("state_dict_not_dict", "mlp", _set("state_dict", [1, 2]), ("'state_dict' must map",)),
    # the envelope
    ("version_wrong", "mlp", _set("version", 2), ("version 2",)),
    ("version_bool", "mlp", _set("version", True), ("version True",)),
    ("version_tensor", "mlp", _set("version", torch.ones(2)), ("version a Tensor",)),
    ("no_spec", "mlp", _drop("spec"), ("lacks a 'spec'",)),

    # `xcompile eval` dispatches on the format tag: without the torch-policy tag a file goes to the
    # fat-checkpoint loader, which refuses it in its own words
    ("format_wrong", "mlp", _set("format", "evil"), ("is not an xcompile",)),
    ("not_a_dict", "mlp", lambda p: [p], ("is not an xcompile",)),
]


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("kind, edit, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_torch_policy_refused_fast(files, tmp_path, kind, edit, needles):
    _refused(_hostile(files, kind, tmp_path, edit), needles)


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_code_in_a_torch_policy_never_runs(files, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "RAN"
    path = _hostile(files, "mlp", tmp_path, _spec(note=_Evil(f"touch {marker}")))
    _refused(path, ("carries code",))
    assert not marker.exists()


def test_compressed_archive_refused(files, tmp_path):
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(io.BytesIO(files["mlp"])) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename),
                         compress_type=zipfile.ZIP_DEFLATED)
    _refused(path, ("compressed", "data.pkl"))


def test_oversized_pickle_refused(files, tmp_path):
    path = _hostile(files, "mlp", tmp_path, _spec(note="x" * (MAX_PICKLE_BYTES + 1)))
    _refused(path, ("MAX_PICKLE_BYTES",))


@pytest.mark.parametrize("name, content, needle", [
    ("empty.pt", b"", "empty (0 bytes)"), ("missing.pt", None, "does not exist"),
    ("junk.pt", b"not a zip", "not a PyTorch torch policy")])
def test_empty_missing_and_junk_files(tmp_path, name, content, needle):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(needle)):
        read_torch_policy(tmp_path / name)


# --------------------------------------------------------------------------------------------
# what stays valid, and the other entry points


def test_valid_files_load_and_act(files, tmp_path, a1):
    obs = torch.zeros(2, obs_dim(a1))
    for kind in ("pinned", "mlp"):
        path = tmp_path / f"{kind}.pt"
        path.write_bytes(files[kind])
        module = load_torch_policy(path)
        assert module(obs).shape == (2, a1.n_joints)
        assert set(read_torch_policy(path)["state_dict"]) == set(module.state_dict())


def test_half_precision_weights_still_load(files, tmp_path):
    def to_half(p: dict) -> None:
        p["state_dict"] = {k: v.half() for k, v in p["state_dict"].items()}

    module = load_torch_policy(_hostile(files, "mlp", tmp_path, to_half))
    assert all(v.dtype == torch.float32 for v in module.state_dict().values())


def test_valid_file_evaluates_through_the_cli(files, tmp_path):
    path = tmp_path / "mlp.pt"
    path.write_bytes(files["mlp"])
    res = runner.invoke(app, ["eval", str(path), "--target", "a1", "--episodes", "1"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("spec, needles", [
    ({"kind": "pinned", "config": {}, "family": "locomotion", "n_joints": 10**9},
     ("n_joints", "MAX_JOINTS")),
    ({"kind": "pinned", "config": {"desc_hidden": 65536, "desc_layers": 64},
      "family": "locomotion", "n_joints": 12}, ("MAX_PARAMS",)),
    ({"kind": "mlp", "obs_dim": 48, "hidden": [10**9], "n_actions": 12}, ("MAX_MLP_WIDTH",)),
    ({"kind": "mlp", "obs_dim": 48, "hidden": [65536] * 64, "n_actions": 12}, ("MAX_PARAMS",)),
    ({"kind": "mlp", "obs_dim": "48", "hidden": [16], "n_actions": 12}, ("obs_dim = '48'",)),
])
def test_build_from_spec_checks_before_building(spec, needles):
    # xcompile.policy builds from a spec itself: the spec alone must be refused before anything
    # is allocated.
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        build_from_spec(spec)
    assert time.perf_counter() - t0 < FAST_S
    for needle in needles:
        assert needle in str(info.value)


def test_save_refuses_what_load_would_refuse(tmp_path):
    mlp = MLPPolicy(48, [16], 12)
    with pytest.raises(CheckpointError, match="MAX_MLP_WIDTH"):
        save_torch_policy(tmp_path / "a.pt", mlp, {**mlp.spec(), "hidden": [10**9]})
    with pytest.raises(CheckpointError, match="do not fit its spec"):
        save_torch_policy(tmp_path / "b.pt", mlp, {**mlp.spec(), "hidden": [32]})
    with pytest.raises(CheckpointError, match="MAX_PICKLE_BYTES"):
        save_torch_policy(tmp_path / "c.pt", mlp, {**mlp.spec(),
                                                   "note": "x" * (MAX_PICKLE_BYTES + 1)})
    assert list(tmp_path.iterdir()) == []


def test_state_sizes_are_exact(tiny_fat_ckpt):
    from xcompile.models.slim import _check_spec

    config = load_checkpoint(tiny_fat_ckpt).config
    for family in config.families:
        for n in (1, 7):
            with torch.device("meta"):
                module = PinnedPolicy.empty(config, family, n)
            spec = spec_of(module)
            want = sum(v.numel() for v in module.state_dict().values())
            assert config.pinned_size(family, n) == want == _check_spec(spec, "x")[2]
    for normalize in (False, True):
        mlp = MLPPolicy(48, [16, 8], 12, normalize=normalize)
        want = sum(v.numel() for v in mlp.state_dict().values())
        assert _check_spec(mlp.spec(), "x")[2] == want
