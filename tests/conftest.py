"""Shared tiny fixtures: a small random fat checkpoint that knows one quadruped and one arm."""

from __future__ import annotations

import pytest
import torch

from xcompile.models.checkpoint import save_checkpoint
from xcompile.models.descriptors import joint_descriptors
from xcompile.models.fat import FatConfig, FatPolicy
from xcompile.targets import load_robot

TINY = FatConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, desc_hidden=32, desc_layers=1)


@pytest.fixture(scope="session")
def tiny_fat_ckpt(tmp_path_factory) -> str:
    """Path to a tiny random fat checkpoint with bodies a1 (locomotion) and panda (reach)."""
    torch.manual_seed(0)
    model = FatPolicy(TINY)
    registry = []
    for name in ("a1", "panda"):
        r = load_robot(name)
        registry.append({"name": name, "family": r.family, "joints": list(r.joints.names),
                         "descriptors": joint_descriptors(r).tolist(), "urdf": r.urdf})
    path = tmp_path_factory.mktemp("ckpt") / "tiny_fat.pt"
    save_checkpoint(path, model, registry)
    return str(path)
