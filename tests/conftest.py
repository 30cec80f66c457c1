"""Shared fixtures: a tiny random fat checkpoint that knows one quadruped and one arm, a small
trained one (tests/fixtures/competent_fat.pt) that does their tasks, for tests of closed-loop scores,
and RAPTOR converted to ONNX (tests that use it skip when foundation-policy is not installed)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xcompile.models.checkpoint import save_checkpoint
from xcompile.models.descriptors import joint_descriptors
from xcompile.models.fat import FatConfig, FatPolicy
from xcompile.targets import RobotTarget, load_robot

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One test worker per core (pyproject's addopts): each worker, and the processes its tests
    # start (OMP_NUM_THREADS), runs torch on one thread, as a second thread would wait for the
    # core another worker holds (and the suite's networks are small: one thread is faster anyway).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

COMPETENT_FAT = Path(__file__).resolve().parent / "fixtures" / "competent_fat.pt"
TINY = FatConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, desc_hidden=32, desc_layers=1)


def short_robot(name: str, episode_s: float) -> RobotTarget:
    """A built-in robot whose episodes last `episode_s` seconds instead of its task's 10-12: for
    tests of plumbing (a build runs, two executors agree), where the physics of a whole episode
    adds minutes and no meaning."""
    d = load_robot(name).model_dump()
    d["task"]["episode_s"] = episode_s
    return RobotTarget.model_validate(d)


@pytest.fixture(scope="session")
def short_toml(tmp_path_factory) -> dict[str, str]:
    """TOML files of a1 and panda whose episodes last 3 s (`short_robot`'s, for the command line):
    `--target` takes them where a test of a build's plumbing would otherwise simulate 10-12 s
    episodes. Each keeps its robot's name, so the tiny fat checkpoint serves it."""
    folder = tmp_path_factory.mktemp("short_targets")
    paths = {}
    for name in ("a1", "panda"):
        text = Path(load_robot(name).source).read_text()
        short = re.sub(r"(?m)^episode_s = .*$", "episode_s = 3.0", text)
        assert short != text, f"{name}.toml has no episode_s line to shorten"
        paths[name] = str(folder / f"{name}.toml")
        Path(paths[name]).write_text(short)
    return paths


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


@pytest.fixture(scope="session")
def competent_fat_ckpt() -> str:
    """Path to a small fat checkpoint trained to imitate the scripted experts on a1 (locomotion)
    and panda (reach): it scores about 1.0 on both, where the tiny random one scores 0, so a
    comparison of two stages' scores on it can fail. Made by tests/fixtures/make_competent_fat.py
    (its docstring says how, and what it scores); committed, never made by the tests."""
    assert COMPETENT_FAT.is_file(), (
        f"{COMPETENT_FAT} is missing: it is a committed test fixture "
        "(python tests/fixtures/make_competent_fat.py makes it again, ~4 min)")
    return str(COMPETENT_FAT)


@pytest.fixture(scope="session")
def bench_work(tmp_path_factory) -> Path:
    """The work folder the bench scripts of one test worker share (tests/bench_scripts.py)."""
    return tmp_path_factory.mktemp("bench-work")


@pytest.fixture(scope="session")
def raptor_dir(tmp_path_factory) -> Path:
    """A folder with raptor.onnx and raptor.toml, made by examples/raptor/convert.py from the
    installed foundation-policy package (the `dev` extra)."""
    if importlib.util.find_spec("foundation_policy") is None:
        pytest.skip("foundation-policy (RAPTOR) is not installed: pip install foundation-policy, "
                    "or the dev extra")
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path_factory.mktemp("raptor")
    proc = subprocess.run([sys.executable, str(repo / "examples" / "raptor" / "convert.py"),
                           str(out)], capture_output=True, text=True, cwd=repo, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "raptor.onnx").is_file() and (out / "raptor.toml").is_file()
    return out


# The files that take longest (minutes on 2 cores), run first: the test workers take files in
# collection order, and one of these started last leaves the other workers idle while it runs.
LONGEST_FIRST = ("test_rl_distill.py", "test_bench.py", "test_fidelity.py",
                 "test_recurrent_distill.py", "test_reliability.py", "test_gain_search.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: else as collected
