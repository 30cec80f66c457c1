"""Measurements: sane latencies, MACs that agree across formats, params and bytes, scores."""

from __future__ import annotations

import pytest
from sabotage import sabotage_onnx

from xcompile import measure
from xcompile.artifact import Artifact
from xcompile.models.checkpoint import load_checkpoint
from xcompile.models.fat import count_params
from xcompile.passes.base import BuildContext, get_pass
from xcompile.sim.env import obs_dim
from xcompile.targets import load_hardware, load_robot

N = 300   # latency calls: enough for a sane p50/p99 on a tiny model, quick on a shared machine


def build_stages(ckpt: str, tmp) -> tuple:
    """fat, pinned and onnx artifacts of the fat checkpoint `ckpt` for a1."""
    robot = load_robot("a1")
    fat = Artifact.create("fat-checkpoint", ckpt, "a1")
    arts = {"fat": fat}
    for key, name, src, cfg in (("pinned", "pin-embodiment", "fat",
                                 {"n_check_obs": 64, "check_episodes": 0}),
                                ("onnx", "export-onnx", "pinned", {"n_check_obs": 64})):
        cls = get_pass(name)
        ctx = BuildContext(robot=robot, hardware=load_hardware("cpu"), workdir=tmp / key)
        ctx.workdir.mkdir()
        arts[key] = cls().run(arts[src], cls.Config(**cfg), ctx).artifact
    return robot, arts


@pytest.fixture(scope="module")
def stages(tiny_fat_ckpt, tmp_path_factory):
    """fat, pinned and onnx artifacts for a1 (tiny random fixture: sizes, MACs, latency)."""
    return build_stages(tiny_fat_ckpt, tmp_path_factory.mktemp("measure"))


@pytest.fixture(scope="module")
def competent_stages(competent_fat_ckpt, tmp_path_factory):
    """The same for the competent fixture, which walks (scores ~1 on a1; the tiny one scores 0):
    for comparisons of scores, which must be able to fail."""
    return build_stages(competent_fat_ckpt, tmp_path_factory.mktemp("measure-competent"))


def test_params_and_bytes(stages, tiny_fat_ckpt):
    robot, arts = stages
    pb = {k: measure.count_params_bytes(a) for k, a in arts.items()}
    assert pb["fat"]["params"] == count_params(load_checkpoint(tiny_fat_ckpt).model)
    assert 0 < pb["pinned"]["params"] < pb["fat"]["params"]
    # The ONNX graph holds the pinned weights plus a few scalar constants, less the tensors the
    # exporter shares because they are equal (a random model's LayerNorms are all ones/zeros).
    assert 0.9 * pb["pinned"]["params"] < pb["onnx"]["params"] <= pb["pinned"]["params"] + 16
    for k, a in arts.items():
        assert pb[k]["bytes"] == a.path.stat().st_size > 0


def test_macs(stages):
    robot, arts = stages
    m = {k: measure.macs(a, robot) for k, a in arts.items()}
    assert all(v > 0 for v in m.values())
    assert m["pinned"] < m["fat"]            # the descriptor encoder is folded away
    assert m["onnx"] == m["pinned"]          # graph count agrees with torch's flop counter


def test_latency_and_floor(stages):
    robot, arts = stages
    lat = {k: measure.latency(a, robot, n=N) for k, a in arts.items()}
    for k, v in lat.items():
        assert 0 < v["p50_us"] <= v["p99_us"] < 1e6, (k, v)
    assert lat["fat"]["runtime"] == lat["pinned"]["runtime"] == "torch"
    assert lat["onnx"]["runtime"] == "onnxruntime"
    floor = measure.ort_floor_us(obs_dim(robot), n=N)
    assert 0 < floor < lat["onnx"]["p50_us"]
    assert measure.latency(arts["onnx"], robot, n=N) is lat["onnx"]   # cached by artifact id


def test_measure_artifact_row(stages):
    robot, arts = stages
    row = measure.measure_artifact(arts["onnx"], robot, episodes=2, seed=0, latency_n=N)
    assert set(row) == {"format", "params", "bytes", "macs", "latency_p50_us", "latency_p99_us",
                        "runtime", "score", "score_std", "score_ci95", "scores", "episodes",
                        "nonfinite_action_episodes"}
    assert row["format"] == "onnx" and row["episodes"] == 2
    assert 0.0 <= row["score"] <= 1.0 and row["score_std"] >= 0.0
    lo, hi = row["score_ci95"]
    assert lo <= row["score"] <= hi
    res = measure.score(arts["onnx"], robot, 2, 0)
    assert len(res.scores) == 2 and res.observations       # observations recorded
    # Per-episode scores in episode order, on the report's seed stream: the same episodes as
    # `xcompile eval --seed 0` (default stream report), so stages pair up episode by episode.
    assert res.stream == "report"
    assert row["scores"] == [round(s, 4) for s in res.scores]
    assert row["score"] == pytest.approx(sum(row["scores"]) / 2, abs=1e-4)
    unscored = measure.measure_artifact(arts["onnx"], robot, episodes=0, latency_n=N)
    assert set(unscored) == set(row) - {"nonfinite_action_episodes"}
    assert unscored["score_ci95"] is None and unscored["scores"] is None


SCORE_EPISODES = 4     # episodes 0..3 of the report stream (`xcompile eval --episodes 4`)
SAME_SCORE = 0.02      # |mean score difference| of one policy in two runtimes


def test_same_policy_same_score(competent_stages, tmp_path):
    """The same policy in torch and in ONNX scores the same on the same seeded episodes, and a
    non-trivial score: a copy of the ONNX with its actions x 0.7 does not."""
    robot, arts = competent_stages
    onnx = measure.score(arts["onnx"], robot, SCORE_EPISODES, 0)
    pinned = measure.score(arts["pinned"], robot, SCORE_EPISODES, 0)
    assert onnx.score > 0.5 and pinned.score > 0.5, (onnx.scores, pinned.scores)
    assert pinned.score == pytest.approx(onnx.score, abs=SAME_SCORE)
    bad = sabotage_onnx(arts["onnx"].path, tmp_path / "sabotaged.onnx", scale=0.7)
    twin = measure.score(Artifact.create("onnx", bad, "a1"), robot, SCORE_EPISODES, 0)
    assert abs(twin.score - pinned.score) > SAME_SCORE, (twin.scores, pinned.scores)
