"""rl-finetune and distill check meaning on tiny budgets: fine-tuning never lowers the held-out
score, DAgger's action error falls round over round, the student exports to ONNX and its folded
normalisation is exact, and a `--profile fast` build runs the whole default plan."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import short_robot
from xcompile.artifact import Artifact
from xcompile.evaluate import evaluate
from xcompile.models.slim import MLPPolicy, load_torch_policy, read_torch_policy
from xcompile.models.tuning import split_for_tuning
from xcompile.passes import distill as distill_mod
from xcompile.passes import ppo as ppo_mod
from xcompile.passes import rl_finetune as rl_mod
from xcompile.passes.base import BuildContext, get_pass, with_profile_defaults
from xcompile.policy import load_policy, torch_act
from xcompile.sim.observations import random_obs
from xcompile.targets import load_hardware, load_robot


def run_pass(name, art, robot, workdir: Path, profile="default", history=(), **cfg):
    cls = get_pass(name)
    workdir.mkdir(parents=True)
    ctx = BuildContext(robot=robot, hardware=load_hardware("cpu"), workdir=workdir,
                       profile=profile, source_sha256="ab" * 32, history=list(history))
    conf = cls.Config(**cfg)
    result = cls().run(art, conf, ctx)
    assert result.artifact.format == cls.output_format
    checks = cls().check(art, result, conf, ctx)
    SUMMARIES[result.artifact.path] = result.summary   # what the pass said, for the tests below
    return result.artifact, checks


SUMMARIES: dict[Path, dict] = {}


@pytest.fixture(scope="module")
def pinned_panda(tiny_fat_ckpt, tmp_path_factory):
    robot = load_robot("panda")
    tmp = tmp_path_factory.mktemp("panda")
    art = Artifact.create("fat-checkpoint", tiny_fat_ckpt, robot.name)
    pinned, _ = run_pass("pin-embodiment", art, robot, tmp / "pin", n_check_obs=64,
                         check_episodes=0)
    return robot, pinned, tmp


# ------------------------------------------------------------------------------ profiles


def test_profile_budgets_fill_only_unset_fields():
    cfg = rl_mod.RLFinetuneConfig(env_steps=24_576)    # equal to the class default, but given
    fast = with_profile_defaults(cfg, "fast", rl_mod.PROFILE_DEFAULTS)
    assert fast.env_steps == 24_576                        # explicit wins, even at the default
    assert fast.n_envs == rl_mod.PROFILE_DEFAULTS["fast"]["n_envs"]
    assert fast.eval_episodes == rl_mod.PROFILE_DEFAULTS["fast"]["eval_episodes"]
    thorough = with_profile_defaults(distill_mod.DistillConfig(), "thorough",
                                     distill_mod.PROFILE_DEFAULTS)
    assert thorough.auto and thorough.rounds == distill_mod.PROFILE_DEFAULTS["thorough"]["rounds"]
    for mod in (rl_mod, distill_mod):
        assert set(mod.PROFILE_DEFAULTS) == {"fast", "default", "thorough"}
        for table in mod.PROFILE_DEFAULTS.values():     # every entry is a valid option
            cls = rl_mod.RLFinetuneConfig if mod is rl_mod else distill_mod.DistillConfig
            cls.model_validate(table)


def test_arms_get_more_dagger_episodes_unless_the_user_says():
    def effective(cfg, family, profile):
        cfg = distill_mod.family_defaults(cfg, family, profile)
        return with_profile_defaults(cfg, profile, distill_mod.PROFILE_DEFAULTS)

    default = distill_mod.PROFILE_DEFAULTS["default"]["episodes_per_round"]
    cfg = distill_mod.DistillConfig()
    assert effective(cfg, "locomotion", "default").episodes_per_round == default
    assert effective(cfg, "reach", "default").episodes_per_round == 4 * default
    assert effective(cfg, "reach", "default").search_iterations == 0
    assert effective(cfg, "reach", "fast").episodes_per_round == \
        distill_mod.PROFILE_DEFAULTS["fast"]["episodes_per_round"]
    mine = distill_mod.DistillConfig(episodes_per_round=3)
    assert effective(mine, "reach", "default").episodes_per_round == 3
    assert effective(distill_mod.DistillConfig(), "quadrotor", "default").hidden == [32]


# ------------------------------------------------------------------------------ rl-finetune


def test_rl_finetune_never_lowers_heldout_score(pinned_panda):
    robot, pinned, tmp = pinned_panda
    # 2 iterations of 2 x 520 steps: a critic warm-up and one PPO update; every env ends an
    # episode (500 steps) in each.
    out, m = run_pass("rl-finetune", pinned, robot, tmp / "rl", env_steps=2080, n_envs=2,
                      rollout_steps=520, epochs=2, minibatch=64, critic_warmup_iters=1,
                      eval_episodes=2, lr=3e-4, search_iterations=0)
    assert m["kept"] in ("tuned", "start")
    assert m["env_steps"] == 2080
    lo = m["tuned_minus_start_ci95"][0]
    assert (m["kept"] == "tuned") == (lo > 0)       # kept only when clearly better
    # The kept policy scores what the check says on the pass's held-out episodes (its own seed
    # stream, build seed 0): never below the start.
    kept = evaluate(torch_act(load_torch_policy(out.path)), robot, episodes=2, seed=0,
                    stream=rl_mod.KEEP_STREAM).score
    assert kept == pytest.approx(m[f"score_{m['kept']}"], abs=1e-4)
    assert kept >= m["score_start"] - 1e-4
    # Same kind as the input (export-onnx takes it unchanged), robot recorded, meta names plots.
    assert read_torch_policy(out.path)["spec"]["kind"] == "pinned"
    assert load_policy(out.path, robot).kind == "torch"
    doc = SUMMARIES[out.path]
    assert (out.path.parent / "learning_curve.png").stat().st_size > 1000
    assert [r["phase"] for r in doc["curve"]] == ["warmup", "ppo"]
    losses = [r[k] for r in doc["curve"] for k in ("pg_loss", "v_loss", "anchor_loss")
              if r[k] is not None]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    last = doc["curve"][-1]            # 520 steps per env: each ends one 500-step episode
    assert last["episodes"] == 2 and 0 <= last["score"] <= 1 and last["return"] is not None


def _sabotaging_ppo(factor: float):
    """A stand-in for rl-finetune's PPO that hands the guard a worse candidate: the pinned
    network's two output layers (head and joint skip, whose sum is the action) scaled by
    `factor`, so every action is `factor` times the start's."""
    def ppo(policy, cfg, ctx):
        with torch.no_grad():
            for layer in (policy.head, policy.skip):
                for param in layer.parameters():
                    param.mul_(factor)
        return []
    return ppo


@pytest.mark.parametrize("robot_name", ["a1", "panda"])
def test_keep_better_guard_refuses_a_sabotaged_candidate(robot_name, competent_fat_ckpt,
                                                         tmp_path, monkeypatch):
    """The guard itself, on a policy that does its task: a candidate whose actions are scaled by
    0.7 scores lower on the held-out episodes, and the pass keeps (and saves) the start."""
    robot = load_robot(robot_name)
    fat = Artifact.create("fat-checkpoint", competent_fat_ckpt, robot.name)
    pinned, _ = run_pass("pin-embodiment", fat, robot, tmp_path / "pin", n_check_obs=16,
                         check_episodes=0)
    monkeypatch.setattr(ppo_mod, "train_ppo", _sabotaging_ppo(0.7))
    out, m = run_pass("rl-finetune", pinned, robot, tmp_path / "rl", eval_episodes=3,
                      search_iterations=0, env_steps=1024, n_envs=8, rollout_steps=128)
    assert m["score_start"] > 0.3                      # a policy that does its task
    assert m["score_tuned"] < m["score_start"]         # the candidate is worse
    assert m["kept"] == "start" and m["tuned_minus_start_ci95"][1] < 0
    x = torch.as_tensor(random_obs(robot, 32))
    with torch.no_grad():
        torch.testing.assert_close(load_torch_policy(out.path)(x),
                                   load_torch_policy(pinned.path)(x))


def test_keep_better_needs_the_paired_interval_above_zero():
    from xcompile.stats import clearly_better, diff_ci95

    start = [0.5, 0.6, 0.4, 0.55, 0.45, 0.5]
    assert clearly_better([s + 0.02 for s in start], start)          # every episode better
    noisy = [0.9, 0.3, 0.6, 0.35, 0.7, 0.3]                           # higher mean, by luck
    assert np.mean(noisy) > np.mean(start) and not clearly_better(noisy, start)
    assert not clearly_better(start, start)                           # a tie keeps the start
    d, ci = diff_ci95([s - 0.1 for s in start], start)
    assert d == pytest.approx(-0.1) and ci[1] < 0
    assert diff_ci95([], []) == (None, None) and not clearly_better([1.0], [])


def test_split_for_tuning_is_exact(pinned_panda):
    robot, pinned, _ = pinned_panda
    x = torch.as_tensor(random_obs(robot, 32))
    for module in (load_torch_policy(pinned.path),
                   MLPPolicy(x.shape[1], [16, 16], robot.n_joints, normalize=True)):
        for mode in ("all", "last"):
            features, tail = split_for_tuning(module, mode)
            with torch.no_grad():
                torch.testing.assert_close(tail(features(x)), module(x))
            assert all(any(p is q for q in module.parameters()) for p in tail.parameters())


# ------------------------------------------------------------------------------ distill


@pytest.fixture(scope="module")
def distilled(pinned_panda):
    robot, pinned, tmp = pinned_panda
    out, m = run_pass("distill", pinned, robot, tmp / "distill", hidden=[32, 32], rounds=3,
                      episodes_per_round=1, fit_epochs=15, final_fit_epochs=15,
                      eval_episodes=1, heldout_episodes=1)
    return robot, pinned, out, m, tmp


def test_dagger_action_error_falls_round_over_round(distilled):
    _, pinned, out, m, _ = distilled
    err = m["action_error_per_round"]
    assert len(err) == 3
    assert all(b < a for a, b in zip(err, err[1:])), err
    assert m["action_error_final"] <= err[-1] * 1.05
    assert m["samples"] == 3 * 1 * 500                       # panda: 500 steps per episode
    assert m["params_student"] == read_params(out) and m["compression"] > 0
    assert m["hidden"] == [32, 32]
    assert read_torch_policy(out.path)["spec"]["kind"] == "mlp"
    assert not read_torch_policy(out.path)["spec"]["normalize"]   # folded before saving


def read_params(art) -> int:
    return sum(p.numel() for p in load_torch_policy(art.path).parameters())


def test_student_folded_normalisation_is_exact(distilled):
    robot, _, out, m, _ = distilled
    folded = load_torch_policy(out.path)
    unfolded = load_torch_policy(out.path.parent / SUMMARIES[out.path]["unfolded"])
    assert unfolded.normalize and not folded.normalize
    assert float(unfolded.obs_std.min()) >= distill_mod.MIN_OBS_STD
    x = torch.as_tensor(np.concatenate([
        random_obs(robot, 512, seed=5),
        *evaluate(torch_act(unfolded), robot, episodes=1, seed=7, record_obs=True).observations]))
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), unfolded(x), atol=1e-5, rtol=0)
    assert m["fold_max_abs_err"] <= 1e-5


def test_student_exports_to_onnx(distilled):
    robot, _, out, _, tmp = distilled
    onnx_art, m = run_pass("export-onnx", out, robot, tmp / "export",
                           history=["pin-embodiment", "distill"])
    assert m["max_abs_err_b1"] <= 1e-4
    pol = load_policy(onnx_art.path, robot)
    obs = random_obs(robot, 8, seed=9)
    with torch.inference_mode():
        want = load_torch_policy(out.path)(torch.as_tensor(obs)).numpy()
    np.testing.assert_allclose(pol.act(obs), want, atol=1e-4)


def test_auto_picks_smallest_rung_that_meets_score_and_latency(pinned_panda, monkeypatch):
    robot, pinned, tmp = pinned_panda
    # Latency is faked so the outcome does not depend on the machine: rung [64] is over budget.
    monkeypatch.setattr(distill_mod, "student_latency_us",
                        lambda robot, kind, hidden, *_: 10.0 * hidden[0])   # cpu budget: 500 µs
    tiny = dict(rounds=1, episodes_per_round=1, fit_epochs=2, final_fit_epochs=0,
                eval_episodes=1, heldout_episodes=1)
    _, m = run_pass("distill", pinned, robot, tmp / "auto0", auto=True,
                    ladder=[[8], [16], [64]], min_score_fraction=0.0, **tiny)
    assert m["hidden"] == [8]                        # the first rung already meets 0 x teacher
    out, m = run_pass("distill", pinned, robot, tmp / "auto1", auto=True,
                      ladder=[[8], [16], [64]], min_score_fraction=1.0,
                      **tiny)
    s = SUMMARIES[out.path]
    if s["met_target"]:
        assert m["hidden"] in ([8], [16])
    else:                                            # none met it: best within budget, [64] refused
        assert s["tried"][-1] == {"hidden": [64], "latency_us": 640.0, "over_budget": True}
        assert m["hidden"] in ([8], [16])


# ------------------------------------------------------------------------------ whole build


# The robots' episodes cut to 3 s (from 10-12): 100-160 s each on a busy 2-core machine with
# the full episodes, a third of that with these; what it checks is that the plan runs end to end.
@pytest.mark.parametrize("name", ["a1", "panda"])
def test_fast_build_runs_the_default_plan(name, tiny_fat_ckpt, tmp_path):
    from xcompile.build import run_build
    from xcompile.manager.settings import resolve_settings
    from xcompile.passes import DEFAULT_PLAN

    s = resolve_settings(None, {}, {"profile": "fast"})
    assert s.pass_names == DEFAULT_PLAN
    res = run_build(tiny_fat_ckpt, short_robot(name, 3.0), None, s.plan, tmp_path / "out", tmp_path / "cache",
                   profile=s.profile, episodes=s.episodes, rollout=False)
    stages = {st["name"]: st for st in res.report["stages"]}
    assert {"rl-finetune", "distill", "export-onnx", "quantize"} <= set(stages)
    rl = stages["rl-finetune"]["checks"]
    assert rl["env_steps"] == rl_mod.PROFILE_DEFAULTS["fast"]["env_steps"]
    assert rl["kept"] == "start" or rl["tuned_minus_start_ci95"][0] > 0
    assert stages["distill"]["checks"]["samples"] > 0
    assert (res.out_dir / "learning_curve.png").is_file()
    # The report says what fine-tuning added over the pinned policy (a1 and panda are in the
    # tiny checkpoint's registry, so not zero-shot).
    (note,) = [n for n in res.report["notes"] if n.startswith("RL fine-tuning on")]
    assert "trained on" in note and f"{stages['pin-embodiment']['score']:.3f} → tuned" in note
    for st in res.stages[1:]:
        if st.artifact is not None and st.artifact.format in ("torch", "onnx"):
            assert load_policy(st.artifact.path, load_robot(name)).act(
                random_obs(load_robot(name), 2)).shape == (2, load_robot(name).n_joints)


def test_a_zero_shot_body_gets_ppo_with_a_loose_anchor_unless_the_user_says():
    def effective(cfg, profile, zero_shot):
        cfg = rl_mod.zero_shot_budget(cfg, profile, zero_shot)
        return with_profile_defaults(cfg, profile, rl_mod.PROFILE_DEFAULTS)

    known = effective(rl_mod.RLFinetuneConfig(), "default", False)
    unseen = effective(rl_mod.RLFinetuneConfig(), "default", True)
    assert known.env_steps == 0 and known.search_iterations > 0 and known.anchor_coef == 10.0
    assert unseen.env_steps >= 100_000 and unseen.search_iterations == 0
    assert unseen.anchor_coef < known.anchor_coef and unseen.lr > known.lr
    given = effective(rl_mod.RLFinetuneConfig(anchor_coef=10.0, env_steps=4096), "default", True)
    assert given.anchor_coef == 10.0 and given.env_steps == 4096 and given.lr == unseen.lr
    fast = effective(rl_mod.RLFinetuneConfig(), "fast", True)     # the smoke profile stays small
    assert fast == effective(rl_mod.RLFinetuneConfig(), "fast", False)
    for table in rl_mod.ZERO_SHOT_DEFAULTS.values():
        rl_mod.RLFinetuneConfig.model_validate(table)
