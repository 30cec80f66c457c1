"""The fat policy acts for bodies of any size, and pinning it to one body changes nothing but size."""

from __future__ import annotations

import pytest
import torch

from xcompile.errors import TargetError
from xcompile.models.descriptors import DESC_DIM
from xcompile.models.fat import (
    FatConfig,
    FatPolicy,
    count_params,
    param_usage,
    pin,
    split_obs,
)

SMALL = FatConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, desc_hidden=32)


@pytest.fixture(scope="module")
def fat() -> FatPolicy:
    torch.manual_seed(0)
    return FatPolicy(SMALL).eval()


def test_default_config_size() -> None:
    assert 1_000_000 < count_params(FatPolicy()) < 10_000_000


def test_split_obs_layout() -> None:
    g, n = 3, 2
    obs = torch.arange(g + 3 * n, dtype=torch.float32).unsqueeze(0)
    global_obs, js = split_obs(obs, g, n)
    assert global_obs.tolist() == [[0, 1, 2]]
    # joint 0: q at 3, qdot at 5, last action at 7
    assert js[0, 0].tolist() == [3, 5, 7]
    assert js[0, 1].tolist() == [4, 6, 8]


@pytest.mark.parametrize("n, family", [(7, "reach"), (12, "locomotion"), (6, "reach")])
def test_forward_any_joint_count(fat: FatPolicy, n: int, family: str) -> None:
    g = SMALL.global_dims[family]
    out = fat(torch.randn(4, g), torch.randn(4, n, 3), torch.randn(n, DESC_DIM), family)
    assert out.shape == (4, n)
    assert torch.isfinite(out).all()
    obs = torch.randn(4, SMALL.obs_dim(family, n))
    assert fat.act(obs, torch.randn(n, DESC_DIM), family).shape == (4, n)


def test_descriptors_matter(fat: FatPolicy) -> None:
    obs = torch.randn(2, SMALL.obs_dim("reach", 7))
    a = fat.act(obs, torch.randn(7, DESC_DIM), "reach")
    b = fat.act(obs, torch.randn(7, DESC_DIM), "reach")
    assert not torch.allclose(a, b)


def test_unknown_family_is_refused(fat: FatPolicy) -> None:
    with pytest.raises(TargetError, match="locomotion"):
        pin(fat, torch.randn(3, DESC_DIM), "swimming")


@pytest.mark.parametrize("n, family", [(12, "locomotion"), (7, "reach")])
def test_pinned_equals_fat(fat: FatPolicy, n: int, family: str) -> None:
    torch.manual_seed(1)
    desc = torch.randn(n, DESC_DIM)
    pinned = pin(fat, desc.numpy(), family)
    assert (pinned.n_joints, pinned.family) == (n, family)
    assert pinned.obs_dim == SMALL.obs_dim(family, n)
    obs = torch.randn(1000, pinned.obs_dim)
    with torch.no_grad():
        diff = (pinned(obs) - fat.act(obs, desc, family)).abs().max().item()
    assert diff <= 1e-5
    assert count_params(pinned) < count_params(fat)
    assert count_params(pinned) <= param_usage(fat, family)["used"]


def test_param_usage(fat: FatPolicy) -> None:
    u = param_usage(fat, "reach")
    assert u["used"] == u["shared"] + u["family"] < u["total"] == count_params(fat)
    assert 0 < u["fraction"] < 1


def test_pinned_exports_to_onnx(fat: FatPolicy, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pinned = pin(fat, torch.randn(6, DESC_DIM), "reach")
    path = tmp_path / "pinned.onnx"
    # Example batch 2: the exporter specialises sizes 0 and 1, which would fix the batch.
    torch.onnx.export(
        pinned, (torch.randn(2, pinned.obs_dim),), str(path), dynamo=True, external_data=False,
        opset_version=17, input_names=["obs"], output_names=["action"],
        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        obs = torch.randn(batch, pinned.obs_dim)
        (got,) = sess.run(None, {"obs": obs.numpy()})
        with torch.no_grad():
            want = pinned(obs).numpy()
        assert got.shape == (batch, 6)
        assert abs(got - want).max() <= 1e-5
