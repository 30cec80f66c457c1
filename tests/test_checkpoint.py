"""The checkpoint round-trips exactly, and every bad file is refused with a CheckpointError.

A checkpoint is input from strangers: one that carries code must be refused without running it,
even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD set.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from xcompile.errors import CheckpointError
from xcompile.models.checkpoint import (
    FORMAT,
    body_entry,
    inspect_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from xcompile.models.descriptors import DESC_DIM
from xcompile.models.fat import FatConfig, FatPolicy

SMALL = FatConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, desc_hidden=16)


def _registry() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {"name": "a1", "family": "locomotion", "joints": [f"j{i}" for i in range(12)],
         "descriptors": torch.randn(12, DESC_DIM, generator=g).tolist(), "urdf": "a1.urdf"},
        {"name": "xarm6", "family": "reach", "joints": [f"j{i}" for i in range(6)],
         "descriptors": torch.randn(6, DESC_DIM, generator=g).tolist(), "urdf": "xarm6.urdf"},
    ]


@pytest.fixture(scope="module")
def model() -> FatPolicy:
    torch.manual_seed(0)
    return FatPolicy(SMALL).eval()


@pytest.fixture
def pt_file(tmp_path: Path, model: FatPolicy) -> Path:
    return save_checkpoint(tmp_path / "fat.pt", model, _registry(), {"seed": 0})


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip(tmp_path: Path, model: FatPolicy, suffix: str) -> None:
    path = save_checkpoint(tmp_path / f"fat{suffix}", model, _registry(), {"note": "x"})
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    ckpt = load_checkpoint(path)
    assert ckpt.config == SMALL and ckpt.extra == {"note": "x"} and not ckpt.model.training
    assert [e["name"] for e in ckpt.registry] == ["a1", "xarm6"]
    for entry in ckpt.registry:
        desc = torch.tensor(entry["descriptors"])
        obs = torch.randn(8, SMALL.obs_dim(entry["family"], len(entry["joints"])))
        with torch.no_grad():
            assert torch.equal(ckpt.model.act(obs, desc, entry["family"]),
                               model.act(obs, desc, entry["family"]))
    info = inspect_checkpoint(ckpt)
    assert info["format"] == FORMAT and info["bytes"] == path.stat().st_size
    assert len(info["sha256"]) == 64
    assert [b["n_joints"] for b in info["bodies"]] == [12, 6]
    assert all(0 < b["fraction_used"] < 1 for b in info["bodies"])


def test_body_entry(pt_file: Path) -> None:
    ckpt = load_checkpoint(pt_file)
    assert body_entry(ckpt, "xarm6")["family"] == "reach"
    with pytest.raises(CheckpointError, match="a1, xarm6"):
        body_entry(ckpt, "spot")


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.mark.parametrize("force_unsafe", [False, True])
def test_code_in_checkpoint_never_runs(tmp_path: Path, monkeypatch, model: FatPolicy,
                                       force_unsafe: bool) -> None:
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "SOMEFILE"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": 1, "config": SMALL.model_dump(),
                "state_dict": model.state_dict(), "registry": [],
                "extra": {"x": _Evil(f"touch {marker}")}}, path)
    with pytest.raises(CheckpointError, match=r"system.*carries code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_code_refused_even_when_scan_fails(tmp_path: Path, monkeypatch) -> None:
    # If the static scan cannot run, the explicit weights_only=True load is the second wall.
    def broken_scan(_path: str) -> list[str]:
        raise ValueError("scan unavailable")

    monkeypatch.setattr(torch.serialization, "get_unsafe_globals_in_checkpoint", broken_scan)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "SOMEFILE"
    path = tmp_path / "evil.pt"
    torch.save({"x": _Evil(f"touch {marker}")}, path)
    with pytest.raises(CheckpointError, match="will not be loaded"):
        load_checkpoint(path)
    assert not marker.exists()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "e.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(tmp_path: Path, model: FatPolicy, suffix: str) -> None:
    path = save_checkpoint(tmp_path / f"fat{suffix}", model, _registry())
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 20):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            load_checkpoint(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_text_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"notes{suffix}"
    path.write_text("hello, I am not a checkpoint\n")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_plain_torch_save_without_tag(tmp_path: Path) -> None:
    torch.save({"a": torch.zeros(3)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an xcompile"):
        load_checkpoint(tmp_path / "plain.pt")


def test_plain_safetensors_without_tag(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not an xcompile"):
        load_checkpoint(tmp_path / "plain.safetensors")


def test_unknown_version(tmp_path: Path, pt_file: Path) -> None:
    payload = torch.load(pt_file, weights_only=True)
    payload["version"] = 99
    torch.save(payload, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path / "v99.pt")


def test_missing_keys(tmp_path: Path, pt_file: Path) -> None:
    payload = torch.load(pt_file, weights_only=True)
    del payload["registry"]
    torch.save(payload, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="registry"):
        load_checkpoint(tmp_path / "partial.pt")


def test_weights_that_do_not_fit(tmp_path: Path, pt_file: Path) -> None:
    payload = torch.load(pt_file, weights_only=True)
    payload["state_dict"].pop("ln_f.weight")
    torch.save(payload, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "short.pt")


def test_nan_weights(tmp_path: Path, pt_file: Path, model: FatPolicy) -> None:
    payload = torch.load(pt_file, weights_only=True)
    payload["state_dict"]["ln_f.weight"][0] = float("nan")
    torch.save(payload, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(tmp_path / "nan.pt")
    broken = FatPolicy(SMALL)
    with torch.no_grad():
        broken.ln_f.bias.fill_(float("inf"))
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        save_checkpoint(tmp_path / "inf.safetensors", broken, _registry())


def test_bad_registry_refused_at_save(tmp_path: Path, model: FatPolicy) -> None:
    reg = _registry()
    reg[0]["descriptors"] = reg[0]["descriptors"][:3]
    with pytest.raises(CheckpointError, match="12 x"):
        save_checkpoint(tmp_path / "fat.pt", model, reg)
    assert not list(tmp_path.iterdir())
