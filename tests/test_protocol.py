"""The evaluation protocol cannot be tuned to: every use of simulated episodes draws from its own
seed stream (xcompile/seeds.py), the streams never meet, each pass runs on the streams it names and
never on the report's, and scores come with bootstrap 95% intervals (xcompile/stats.py)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

from xcompile import measure as measure_mod
from xcompile.artifact import Artifact
from xcompile.errors import XCompileError
from xcompile.evaluate import EvalResult, evaluate
from xcompile.passes import distill as distill_mod
from xcompile.passes import emit_c as emit_mod
from xcompile.passes import pin_embodiment as pin_mod
from xcompile.passes import quantize as quantize_mod
from xcompile.passes import rl_finetune as rl_mod
from xcompile.passes.base import BuildContext, get_pass
from xcompile.seeds import MAX_EPISODES, MAX_SEED, STREAMS, episode_seed
from xcompile.sim.env import RobotEnv
from xcompile.sim.vec import LockstepEnvs
from xcompile.stats import mean_ci95, ratio_ci95
from xcompile.targets import load_hardware, load_robot

REPO = Path(__file__).resolve().parent.parent
ID_OF = {v: k for k, v in STREAMS.items()}


def zeros(n: int):
    return lambda o: np.zeros((len(o), n), dtype=np.float32)


def decode(seed: int) -> tuple[str, int, int]:
    """(stream, build seed, episode) of an episode seed made by `episode_seed`."""
    return ID_OF[seed >> 52], (seed >> 21) & MAX_SEED, seed & (MAX_EPISODES - 1)


# ------------------------------------------------------------------------------ the streams


def test_streams_never_overlap():
    seeds = [0, 1, 2, 3, MAX_SEED]
    episodes = [*range(101), MAX_EPISODES - 1]
    per = {name: {episode_seed(name, s, i) for s in seeds for i in episodes} for name in STREAMS}
    for name, got in per.items():            # within a stream: every (seed, episode) its own
        assert len(got) == len(seeds) * len(episodes), name
    for a, b in itertools.combinations(STREAMS, 2):
        assert not per[a] & per[b], (a, b)
    assert len(set(STREAMS.values())) == len(STREAMS) and 0 not in STREAMS.values()
    assert all(decode(x)[0] == name for name, got in per.items() for x in got)
    # The episodes scripts seeded 0, 1, 2, ... before the streams (the sample fat policy was
    # selected on those) are in no stream.
    assert min(min(got) for got in per.values()) >= 2**52


def test_out_of_range_is_refused():
    with pytest.raises(XCompileError, match="unknown seed stream"):
        episode_seed("heldout", 0, 0)
    for seed, i in ((-1, 0), (MAX_SEED + 1, 0), (0, MAX_EPISODES), (0, -1)):
        with pytest.raises(XCompileError, match="out of range"):
            episode_seed("report", seed, i)
    with pytest.raises(XCompileError, match="unknown seed stream"):
        evaluate(zeros(7), load_robot("panda"), episodes=1, stream="nope")


def _bench_common():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import common
    finally:
        sys.path.remove(str(REPO / "bench"))
    return common


def test_every_stream_the_code_names_exists_and_each_use_has_its_own():
    uses = {}
    for mod in (rl_mod, distill_mod, quantize_mod, pin_mod, emit_mod, measure_mod,
                _bench_common()):
        names = {k: v for k, v in vars(mod).items() if k.endswith("_STREAM")}
        assert names, f"{mod.__name__} names no seed stream"
        uses.update({f"{mod.__name__}.{k}": v for k, v in names.items()})
    assert all(v in STREAMS for v in uses.values()), uses
    assert len(set(uses.values())) == len(uses), uses       # no two uses share a stream
    # The uses the protocol lists, each on the stream written down for it.
    assert rl_mod.KEEP_STREAM == "finetune-keep" and rl_mod.TRAIN_STREAM == "finetune-train"
    assert rl_mod.SEARCH_STREAM == "gain-search"
    assert quantize_mod.CHOICE_STREAM == "quantize-choice"     # no longer rl-finetune's episodes
    assert measure_mod.REPORT_STREAM == "report"
    # The scripts that make the sample fat policy and its experts use the rest.
    assert set(uses.values()) == set(STREAMS) - {"expert-data", "expert-tuning", "fat-dagger"}


# ------------------------------------------------------------------------------ evaluate


def test_same_seed_and_stream_same_scores_other_stream_other_episodes():
    robot = load_robot("panda")
    a = evaluate(zeros(7), robot, episodes=2, seed=4, stream="report", record_obs=True)
    b = evaluate(zeros(7), robot, episodes=2, seed=4, stream="report", record_obs=True)
    assert a.scores == b.scores and a.returns == b.returns and a.stream == "report"
    np.testing.assert_array_equal(a.observations[0], b.observations[0])
    c = evaluate(zeros(7), robot, episodes=2, seed=4, stream="bench", record_obs=True)
    assert not np.array_equal(a.observations[0], c.observations[0])    # other initial states
    assert c.scores != a.scores
    # Episode i starts from episode_seed(stream, seed, first_episode + i), as a fresh env shows.
    env = RobotEnv(robot)
    try:
        first, _ = env.reset(seed=episode_seed("bench", 4, 1))
    finally:
        env.close()
    np.testing.assert_array_equal(c.observations[0][1], first)
    d = evaluate(zeros(7), robot, episodes=1, seed=4, stream="bench", first_episode=1,
                 record_obs=True)
    np.testing.assert_array_equal(d.observations[0][0], first)
    assert d.scores == c.scores[1:]


def test_lockstep_envs_draw_their_stream():
    robot = load_robot("panda")
    with pytest.raises(TypeError):
        LockstepEnvs(robot, 1, seed=0)                      # a training loop names its stream
    with LockstepEnvs(robot, 2, seed=5, stream="finetune-train") as envs:
        obs = envs.reset()
    env = RobotEnv(robot)
    try:
        for k in range(2):
            want, _ = env.reset(seed=episode_seed("finetune-train", 5, k))
            np.testing.assert_array_equal(obs[k], want)
    finally:
        env.close()


# ------------------------------------------------------------------------------ intervals


def test_mean_ci95():
    assert mean_ci95([]) is None
    assert mean_ci95([0.7] * 5) == [0.7, 0.7]
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.6, 20)
    narrow = mean_ci95(list(base))
    wide = mean_ci95(list(0.5 + 4 * (base - 0.5)))           # same mean, four times the spread
    for ci, x in ((narrow, base), (wide, 0.5 + 4 * (base - 0.5))):
        assert ci[0] <= float(np.mean(x)) <= ci[1]
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])
    assert mean_ci95(list(base)) == narrow                    # seeded: reproducible


def test_ratio_ci95():
    x = [0.2, 0.9, 1.0, 0.5, 0.7]
    assert ratio_ci95(x, x) == (1.0, [1.0, 1.0])
    r, ci = ratio_ci95([v / 2 for v in x], x)
    assert r == 0.5 and ci == [0.5, 0.5]                      # paired: a constant factor
    assert ratio_ci95(x, [0.0] * 5) == (None, None)
    assert ratio_ci95(x, x[:3]) == (None, None)


# ------------------------------------------------------------------------------ EvalResult


BASE_KEYS = {"robot", "seed", "stream", "episodes", "score", "score_std", "score_ci95", "falls",
             "success_rate", "invalid_actions", "scores", "nonfinite_action_episodes",
             "return_mean", "returns"}


def _check_common(d: dict, res: EvalResult, episodes: int) -> None:
    assert BASE_KEYS <= set(d)
    assert d["episodes"] == episodes == len(d["scores"]) == len(d["returns"])
    lo, hi = d["score_ci95"]
    assert lo <= d["score"] <= hi and d["score_ci95"] == res.score_ci95
    assert d["stream"] == "report" and d["seed"] == 0


def test_as_dict_reach():
    robot = load_robot("panda")
    res = evaluate(zeros(7), robot, episodes=2, seed=0)
    d = res.as_dict()
    _check_common(d, res, 2)
    assert "vel_error_mps" not in d and "cost_of_transport" not in d
    # The mean distance to each goal at its end, in mm, per episode and overall; a still arm
    # reaches few goals within the tolerance, and its score is low.
    assert len(d["reach_errors_mm"]) == 2 and d["reach_error_mm"] > 0
    assert d["reach_error_mm"] == pytest.approx(np.mean(d["reach_errors_mm"]), abs=0.01)
    assert d["goals"] == 2 * round(robot.task.episode_s / robot.task.goal_period_s)
    assert d["success_rate"] < 0.5 and d["score"] < 0.2


def test_as_dict_locomotion():
    robot = load_robot("a1")
    res = evaluate(zeros(12), robot, episodes=1, seed=0)
    d = res.as_dict()
    _check_common(d, res, 1)
    assert "reach_error_mm" not in d
    # Standing still against moving commands: large velocity errors and a low score; a body that
    # goes nowhere has no cost of transport.
    assert d["vel_error_mps"] > 0.1 and d["score"] < 0.6
    assert "yaw_rate_error_rps" in d and d["falls"] == 0 and d["success_rate"] == 1.0


def test_as_dict_without_physics():
    res = EvalResult(robot="x", seed=0, scores=[1.0, 0.0])   # as sim.experts builds one
    d = res.as_dict()
    assert d["score_ci95"] == [0.0, 1.0] and d["stream"] is None
    assert "reach_error_mm" not in d and "vel_error_mps" not in d


# ------------------------------------------------------------------------------ the passes


@pytest.fixture
def reset_seeds(monkeypatch) -> list[int]:
    """Every seed a RobotEnv is reset with while the test runs."""
    seen: list[int] = []
    orig = RobotEnv.reset

    def reset(self, *, seed=None, options=None):
        seen.append(seed)
        return orig(self, seed=seed, options=options)

    monkeypatch.setattr(RobotEnv, "reset", reset)
    return seen


def run_pass(name, art, robot, workdir: Path, hardware="cpu", history=(), **cfg):
    cls = get_pass(name)
    workdir.mkdir(parents=True)
    ctx = BuildContext(robot=robot, hardware=load_hardware(hardware), workdir=workdir, seed=3,
                       profile="fast", source_sha256="ab" * 32, history=list(history))
    conf = cls.Config(**cfg)
    result = cls().run(art, conf, ctx)
    return result, cls().check(art, result, conf, ctx)


def streams_of(seeds: list[int]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for s in seeds:
        stream, build_seed, i = decode(s)
        assert build_seed == 3
        out.setdefault(stream, []).append(i)
    return out


@pytest.fixture(scope="module")
def panda_pinned(tiny_fat_ckpt, tmp_path_factory):
    robot = load_robot("panda")
    tmp = tmp_path_factory.mktemp("protocol")
    fat = Artifact.create("fat-checkpoint", tiny_fat_ckpt, robot.name)
    result, _ = run_pass("pin-embodiment", fat, robot, tmp / "pin0", n_check_obs=16,
                         check_episodes=0)
    return robot, fat, result.artifact, tmp


def test_pin_checks_on_its_stream(panda_pinned, reset_seeds):
    robot, fat, _, tmp = panda_pinned
    run_pass("pin-embodiment", fat, robot, tmp / "pin1", n_check_obs=16, check_episodes=1)
    assert streams_of(reset_seeds) == {"pin-check": [0]}


def test_rl_finetune_trains_and_keeps_on_its_streams(panda_pinned, reset_seeds):
    robot, _, pinned, tmp = panda_pinned
    # One warm-up rollout of 550 steps: panda's 500-step episode ends once, so two training
    # episodes.
    result, checks = run_pass("rl-finetune", pinned, robot, tmp / "rl", env_steps=550, n_envs=1,
                              rollout_steps=550, epochs=1, minibatch=64, critic_warmup_iters=1,
                              eval_episodes=1, search_iterations=2, search_episodes=1)
    got = streams_of(reset_seeds)
    # The search: 2 iterations of 1 + 2 x 3 candidates (panda's 3 gains), each iteration on its
    # own episode; keep-better: start, calibrated and tuned on the same held-out episode.
    assert got == {"gain-search": [0] * 7 + [1] * 7, "finetune-train": [0, 1],
                   "finetune-keep": [0, 0, 0]}
    assert result.summary["heldout_stream"] == "finetune-keep"
    # The kept policy's held-out score is reproduced on the pass's stream.
    from xcompile.models.slim import load_torch_policy
    from xcompile.policy import torch_act

    kept = evaluate(torch_act(load_torch_policy(result.artifact.path)), robot, episodes=1,
                    seed=3, stream=rl_mod.KEEP_STREAM).score
    want = checks["score_start" if checks["kept"] == "start" else "score_tuned"]
    assert kept == pytest.approx(want, abs=1e-4)


def test_distill_rounds_and_rungs_never_share_episodes(panda_pinned, reset_seeds, monkeypatch):
    robot, _, pinned, tmp = panda_pinned
    calls = []
    orig = distill_mod._score

    def score(policy, cfg, ctx):      # the teacher scores 1, every student 0: both rungs run
        calls.append(orig(policy, cfg, ctx))
        return 1.0 if len(calls) == 1 else 0.0

    monkeypatch.setattr(distill_mod, "_score", score)
    monkeypatch.setattr(distill_mod, "student_latency_us", lambda *_: 1.0)
    run_pass("distill", pinned, robot, tmp / "distill", auto=True, ladder=[[8], [16]],
             min_score_fraction=1.0, rounds=2, episodes_per_round=1, fit_epochs=1,
             final_fit_epochs=0, eval_episodes=1, heldout_episodes=1)
    got = streams_of(reset_seeds)
    assert got == {"distill-heldout": [0], "distill-score": [0, 0, 0], "dagger": [0, 1, 2, 3]}


def test_quantize_calibrates_checks_and_chooses_on_its_streams(panda_pinned, reset_seeds):
    robot, _, pinned, tmp = panda_pinned
    onnx_res, _ = run_pass("export-onnx", pinned, robot, tmp / "export",
                           history=["pin-embodiment"])
    reset_seeds.clear()
    # Off the CPU runtime, `auto` decides in closed loop.
    result, _ = run_pass("quantize", onnx_res.artifact, robot, tmp / "q", hardware="jetson_orin",
                         history=["pin-embodiment", "export-onnx"], calibration_episodes=1,
                         heldout_episodes=1, auto_episodes=1, calibration_samples=64)
    got = streams_of(reset_seeds)
    assert result.summary.get("auto_scores")
    assert set(got) == {"calibration", "quantize-check", "quantize-choice"}
    assert got["calibration"] == [0] and got["quantize-check"] == [0]
    assert set(got["quantize-choice"]) == {0}
