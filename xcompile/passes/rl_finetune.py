"""rl-finetune: PPO on the target's own task, starting from the given policy and anchored to it.

torch -> torch, of the same kind as the input (a pinned fat network stays a `PinnedPolicy`, an MLP
stays an `MLPPolicy`), so export-onnx takes the result unchanged. Cost: `env_steps` simulator steps
(about 400/s on a busy core) plus the PPO updates; `trainable="last"` caches the frozen front of the
network per sample and makes an update epoch a fraction of a full backward pass.

Method: PPO (Schulman et al. 2017) with the clipped surrogate and GAE(λ) (Schulman et al. 2016),
laid out like CleanRL's `ppo_continuous_action.py` (options, networks, one loop with ROLLOUT / GAE /
UPDATE sections). Body-specific optimisation that a fat network cannot afford for every body:

- actor: a Gaussian whose mean is the given network (all its weights, or with `trainable="last"`
  only its last block / last hidden layer and head) and whose log-std is one learned vector,
  independent of the state, starting at `init_std` action units. The log-std is not deployed.
- critic: a new MLP on the flat observation (standardised with the first rollout's statistics),
  warmed up for `critic_warmup_iters` rollouts of the starting policy (value regression only, the
  actor frozen) before the actor moves, so the first policy gradients are not pure noise.
- anchor: `anchor_coef * mean((mu - mu_start)^2)` over the batch observations, `mu_start` from a
  frozen copy of the starting network. With equal fixed stds this is the KL between the two
  Gaussians up to a factor: it keeps the policy near its start, so it improves rather than forgets.
- keep_better: at the end the start and the tuned policy (deterministic: the mean action) run the
  same `eval_episodes` held-out episodes of seed stream "finetune-keep" (`xcompile.seeds`; the
  training episodes come from "finetune-train", the report scores on "report", and no other pass
  checks on these); the tuned one is kept only if it is better with the paired difference's
  bootstrap 95% interval above 0 (`xcompile.stats.clearly_better`), not merely a higher mean: a
  higher mean on 6 episodes once kept a policy that lost on the report's 50.

Budgets come from `PROFILE_DEFAULTS[ctx.profile]` for every field the user did not set
(`with_profile_defaults`). `faults = "suite"` (`--robust`) trains and keeps-better under the fault
schedule of `xcompile.passes.training.fault_schedule`.

Writes `tuned.pt` and `learning_curve.png` (`learning_curve.py`); the summary carries the
learning curve (per iteration: env steps, score and return of the episodes that ended in it,
losses, KL, std). Network surgery for `trainable="last"`: `xcompile.models.tuning`.
Check: the saved policy gives finite actions; measurements score_start, score_tuned, kept, ...

An ONNX input (a foreign fat policy pinned to an ONNX graph) is not differentiable torch: the pass
is skipped with that reason (`ToolUnavailable`) and the plan goes on with the ONNX policy.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from xcompile.artifact import Artifact
from xcompile.errors import PassCheckError, ToolUnavailable
from xcompile.evaluate import EvalResult, score_policy
from xcompile.executors.factory import current_executor
from xcompile.executors.pools import default_workers
from xcompile.models.slim import load_torch_policy, save_torch_policy
from xcompile.models.tuning import split_for_tuning
from xcompile.passes.base import (
    BuildContext,
    Pass,
    PassConfig,
    PassResult,
    register_pass,
    seeded_torch,
)
from xcompile.passes.learning_curve import plot_learning_curve
from xcompile.passes.training import FAULTS_HELP, fault_schedule, start_training
from xcompile.policy import torch_act
from xcompile.sim.env import obs_dim
from xcompile.sim.observations import random_obs
from xcompile.sim.procvec import ProcessVecEnvs
from xcompile.sim.vec import LockstepEnvs
from xcompile.stats import clearly_better, diff_ci95
from xcompile.targets import HardwareTarget

TRAIN_STREAM = "finetune-train"   # PPO's training episodes (xcompile.seeds)
KEEP_STREAM = "finetune-keep"     # the keep-better comparison of start and tuned policy

# Budgets per build profile, for fields the user did not set (2 busy cores: fast is a ~10 s smoke
# run, default a minute or two, thorough a real fine-tune). lr, anchor_coef and init_std were
# chosen on a1 and panda: at lr 1e-4, anchor 2, std 0.15 the tuned reach policy fell from 1.0 to
# 0.78 held-out; at 3e-5 / 10 / 0.1 both kept the tuned policy.
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "fast": {"env_steps": 2_048, "n_envs": 8, "rollout_steps": 64, "epochs": 2,
             "critic_warmup_iters": 1, "eval_episodes": 2},
    "default": {"env_steps": 24_576, "n_envs": 8, "rollout_steps": 128, "epochs": 4,
                "critic_warmup_iters": 2, "eval_episodes": 10},
    "thorough": {"env_steps": 200_000, "n_envs": 16, "rollout_steps": 128, "epochs": 5,
                 "critic_warmup_iters": 4, "eval_episodes": 20},
}


# OPTIONS
class RLFinetuneConfig(PassConfig):
    env_steps: int = Field(24_576, ge=0, description="simulator steps of the whole run, critic "
                           "warm-up included (profile default: fast 2048, default 24576, "
                           "thorough 200000)")
    n_envs: int = Field(8, ge=1, description="simulators stepped in lock-step (one batched "
                        "forward pass per step; in worker processes under a pool executor)")
    rollout_steps: int = Field(128, ge=1, description="steps per simulator per PPO iteration "
                               "(batch = n_envs * rollout_steps)")
    epochs: int = Field(4, ge=1, description="passes over each batch per PPO iteration")
    minibatch: int = Field(256, ge=1, description="samples per gradient step")
    lr: float = Field(3e-5, gt=0, description="Adam learning rate of the actor (and log-std)")
    critic_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the critic")
    gamma: float = Field(0.99, gt=0, le=1, description="discount per control step")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    clip: float = Field(0.2, gt=0, description="PPO ratio clip epsilon")
    ent_coef: float = Field(0.0, ge=0, description="entropy bonus coefficient")
    anchor_coef: float = Field(10.0, ge=0, description="weight of mean((mu - mu_start)^2), mu in "
                               "action units: the behaviour-cloning anchor to the start policy")
    init_std: float = Field(0.1, gt=0, description="initial exploration std, in action units")
    trainable: Literal["all", "last"] = Field(
        "last", description="'all': every weight of the network trains; 'last': only its last "
        "block (pinned) or last hidden layer and head (MLP), the rest frozen and cached")
    critic_hidden: list[int] = Field([128, 128], min_length=1, description="critic MLP widths")
    critic_warmup_iters: int = Field(2, ge=0, description="rollouts of the start policy that "
                                     "train only the critic before the actor moves")
    max_grad_norm: float = Field(0.5, gt=0, description="gradient norm clip")
    target_kl: float | None = Field(0.05, gt=0, description="stop an iteration's epochs when "
                                    "the approximate KL to the rollout policy exceeds this "
                                    "(None: never)")
    eval_episodes: int = Field(10, ge=1, description="held-out episodes (seed stream "
                               "finetune-keep) that score start and tuned policy for keep_better")
    faults: Literal["none", "suite"] = Field("none", description=FAULTS_HELP)
    keep_better: bool = Field(True, description="keep the start policy unless the tuned one "
                              "scores higher on the held-out episodes with the paired "
                              "difference's 95% interval above 0")


# NETWORK
def make_critic(n_obs: int, hidden: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip([n_obs, *hidden[:-1]], hidden):
        layers += [nn.Linear(a, b), nn.Tanh()]
    layers.append(nn.Linear(hidden[-1], 1))
    return nn.Sequential(*layers)


# LOOP
def _ppo(policy: Any, cfg: RLFinetuneConfig, ctx: BuildContext) -> list[dict[str, Any]]:
    """Train `policy` (in place) with PPO; return the learning curve, one row per iteration."""
    robot = ctx.robot
    n_obs, n_act = obs_dim(robot), robot.n_joints
    features, tail = split_for_tuning(policy, cfg.trainable)
    start_tail = copy.deepcopy(tail).eval().requires_grad_(False)
    for p in policy.parameters():
        p.requires_grad_(False)
    for p in tail.parameters():
        p.requires_grad_(True)
    log_std = torch.nn.Parameter(torch.full((n_act,), math.log(cfg.init_std)))
    critic = make_critic(n_obs, cfg.critic_hidden)
    actor_opt = torch.optim.Adam([*tail.parameters(), log_std], lr=cfg.lr, eps=1e-5)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr, eps=1e-5)
    gen = torch.Generator().manual_seed(ctx.seed)
    obs_mean = torch.zeros(n_obs)
    obs_std = torch.ones(n_obs)
    ret_scale = 1.0

    def value(o: torch.Tensor) -> torch.Tensor:
        return critic((o - obs_mean) / obs_std).squeeze(-1)

    n, steps = cfg.n_envs, cfg.rollout_steps
    batch = n * steps
    iters = cfg.env_steps // batch
    curve: list[dict[str, Any]] = []
    recent_scores: list[float] = []
    done_steps = 0
    with torch.inference_mode():   # the split must be exact before we train through it
        x = torch.randn(4, n_obs)
        if not torch.allclose(tail(features(x)), policy(x), atol=1e-5):
            raise PassCheckError(f"rl-finetune: split {cfg.trainable!r} of "
                                 f"{type(policy).__name__} does not reproduce the policy")
    envs = _vec_envs(robot, n, ctx.seed, fault_schedule(cfg, ctx))
    try:
        next_obs = torch.as_tensor(envs.reset())
        for it in range(iters):
            warmup = it < cfg.critic_warmup_iters
            # ROLLOUT
            obs_b = torch.zeros(steps, n, n_obs)
            act_b = torch.zeros(steps, n, n_act)
            logp_b = torch.zeros(steps, n)
            rew_b = torch.zeros(steps, n)
            done_b = torch.zeros(steps, n)
            trunc_obs: list[tuple[int, int, np.ndarray]] = []
            feats: list[torch.Tensor] = []
            ended_scores: list[float] = []
            ended_returns: list[float] = []
            with torch.no_grad():
                std = log_std.exp()
                for t in range(steps):
                    f = features(next_obs)
                    mu = tail(f)
                    a = mu + std * torch.randn(mu.shape, generator=gen)
                    obs_b[t], act_b[t], feats = next_obs, a, [*feats, f]
                    logp_b[t] = torch.distributions.Normal(mu, std).log_prob(a).sum(-1)
                    st = envs.step(a.numpy())
                    rew_b[t] = torch.as_tensor(st.reward, dtype=torch.float32)
                    ended = st.terminated | st.truncated
                    done_b[t] = torch.as_tensor(ended, dtype=torch.float32)
                    for k in np.flatnonzero(st.truncated & ~st.terminated):
                        trunc_obs.append((t, int(k), st.final_obs[k]))
                    ended_scores += [float(s) for s in st.score[ended]]
                    ended_returns += [float(r) for r in st.ret[ended]]
                    next_obs = torch.as_tensor(st.obs)
            done_steps += batch
            if it == 0:     # critic input and target scales from the first (start-policy) batch
                flat = obs_b.reshape(-1, n_obs)
                obs_mean, obs_std = flat.mean(0), flat.std(0).clamp_min(1e-2)
                # about the size of a discounted return, so the critic regresses O(1) targets
                ret_scale = float(rew_b.abs().mean().clamp_min(1e-3)) / (1 - cfg.gamma)

            # GAE (returns bootstrapped at time limits: r += gamma * V(final obs))
            with torch.no_grad():
                values = value(obs_b.reshape(-1, n_obs)).reshape(steps, n) * ret_scale
                if trunc_obs:
                    v_final = value(torch.as_tensor(np.stack([o for *_, o in trunc_obs])))
                    for (t, k, _), v in zip(trunc_obs, v_final * ret_scale):
                        rew_b[t, k] += cfg.gamma * v
                last_value = value(next_obs) * ret_scale
                adv = torch.zeros(steps, n)
                gae = torch.zeros(n)
                for t in reversed(range(steps)):
                    nxt = last_value if t == steps - 1 else values[t + 1]
                    keep = 1.0 - done_b[t]
                    delta = rew_b[t] + cfg.gamma * nxt * keep - values[t]
                    gae = delta + cfg.gamma * cfg.gae_lambda * keep * gae
                    adv[t] = gae
                ret_b = adv + values
                b_feat = torch.cat(feats).detach()
                b_mu_start = start_tail(b_feat)

            # UPDATE
            b_obs, b_act = obs_b.reshape(-1, n_obs), act_b.reshape(-1, n_act)
            b_logp, b_adv = logp_b.reshape(-1), adv.reshape(-1)
            b_ret = ret_b.reshape(-1) / ret_scale
            stats: dict[str, list[float]] = {"pg_loss": [], "v_loss": [], "anchor_loss": [],
                                             "approx_kl": [], "clipfrac": []}
            for _epoch in range(cfg.epochs):
                perm = torch.randperm(batch, generator=gen)
                kl_epoch = []
                for s in range(0, batch, cfg.minibatch):
                    mb = perm[s:s + cfg.minibatch]
                    v_loss = 0.5 * ((value(b_obs[mb]) - b_ret[mb]) ** 2).mean()
                    critic_opt.zero_grad()
                    v_loss.backward()
                    torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.max_grad_norm)
                    critic_opt.step()
                    stats["v_loss"].append(v_loss.item())
                    if warmup:
                        continue
                    mu = tail(b_feat[mb])
                    dist = torch.distributions.Normal(mu, log_std.exp())
                    logratio = dist.log_prob(b_act[mb]).sum(-1) - b_logp[mb]
                    ratio = logratio.exp()
                    a_mb = b_adv[mb]
                    a_mb = (a_mb - a_mb.mean()) / (a_mb.std() + 1e-8)
                    pg_loss = torch.max(-a_mb * ratio,
                                        -a_mb * ratio.clamp(1 - cfg.clip, 1 + cfg.clip)).mean()
                    anchor = ((mu - b_mu_start[mb]) ** 2).mean()
                    entropy = dist.entropy().sum(-1).mean()
                    loss = pg_loss + cfg.anchor_coef * anchor - cfg.ent_coef * entropy
                    actor_opt.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_([*tail.parameters(), log_std],
                                                   cfg.max_grad_norm)
                    actor_opt.step()
                    with torch.no_grad():
                        kl = float(((ratio - 1) - logratio).mean())
                    kl_epoch.append(kl)
                    stats["pg_loss"].append(pg_loss.item())
                    stats["anchor_loss"].append(anchor.item())
                    stats["approx_kl"].append(kl)
                    stats["clipfrac"].append(float(((ratio - 1).abs() > cfg.clip).float().mean()))
                    if not math.isfinite(loss.item()):
                        raise PassCheckError(
                            f"rl-finetune: the loss became {loss.item()} at iteration {it}; "
                            "lower lr or raise anchor_coef")
                if cfg.target_kl is not None and kl_epoch and np.mean(kl_epoch) > cfg.target_kl:
                    break

            recent_scores = (recent_scores + ended_scores)[-20:]
            running = float(np.mean(recent_scores)) if recent_scores else float("nan")
            row: dict[str, Any] = {
                "iteration": it, "env_steps": done_steps, "phase": "warmup" if warmup else "ppo",
                "episodes": len(ended_scores),
                "score": float(np.mean(ended_scores)) if ended_scores else None,
                "return": float(np.mean(ended_returns)) if ended_returns else None,
                "running_score": running if recent_scores else None,
                "std": round(log_std.exp().mean().item(), 5)}
            for k, v in stats.items():
                row[k] = float(np.mean(v)) if v else None
            curve.append(row)
            ctx.progress(f"rl-finetune score {running:.2f}", done_steps / max(1, cfg.env_steps))
    finally:
        envs.close()
    policy.eval()
    for p in policy.parameters():
        p.requires_grad_(False)
    return curve


def _vec_envs(robot: Any, n: int, seed: int, faults: Any) -> LockstepEnvs | ProcessVecEnvs:
    """The training envs: in this process, or, under a pool executor (`use_executor`, e.g.
    `xcompile build --executor process`), sliced over up to one process per local core. The same
    VecSteps either way (global episode seeds), so the same training run."""
    ex = current_executor()
    workers = 1 if isinstance(ex, str) else min(ex.workers, n, default_workers())
    if workers > 1:
        return ProcessVecEnvs(robot, n, seed, faults, stream=TRAIN_STREAM, workers=workers)
    return LockstepEnvs(robot, n, seed, faults, stream=TRAIN_STREAM)


def _heldout(module: Any, cfg: RLFinetuneConfig, ctx: BuildContext) -> EvalResult:
    return score_policy(torch_act(module.eval()), ctx.robot, cfg.eval_episodes, ctx.seed,
                        stream=KEEP_STREAM, faults=fault_schedule(cfg, ctx))


@register_pass
class RLFinetune(Pass):
    name = "rl-finetune"
    version = 3
    input_format = "torch"
    output_format = "torch"
    input_formats = ("torch", "onnx")
    Config = RLFinetuneConfig
    summary = "PPO on the target's own task from the given policy, anchored to it; keeps the better"

    @classmethod
    def output_for(cls, fmt: str) -> str:
        return fmt      # an ONNX input is skipped, and the plan goes on with it

    def run(self, art: Artifact, cfg: PassConfig, ctx: BuildContext) -> PassResult:
        if art.format != "torch":
            raise ToolUnavailable(
                f"rl-finetune trains a differentiable torch policy, and its input here is an "
                f"{art.format} graph (a foreign fat policy pinned to ONNX); skipped")
        cfg, spec, t_start = start_training(art, cfg, RLFinetuneConfig, ctx, PROFILE_DEFAULTS)
        start = load_torch_policy(art.path)
        policy = load_torch_policy(art.path)
        with seeded_torch(ctx.seed):     # rollouts and updates alike on one thread
            curve = _ppo(policy, cfg, ctx)
        train_s = time.perf_counter() - t_start

        t_eval = time.perf_counter()
        res_start, res_tuned = (_heldout(m, cfg, ctx) for m in (start, policy))
        # Better with the paired interval above 0; a tie or a noisy gain keeps the start.
        diff, diff_ci = diff_ci95(res_tuned.scores, res_start.scores)
        kept = ("tuned" if clearly_better(res_tuned.scores, res_start.scores)
                or not cfg.keep_better else "start")
        eval_s = time.perf_counter() - t_eval

        path = save_torch_policy(ctx.workdir / "tuned.pt", policy if kept == "tuned" else start,
                                 spec)
        summary = {"kept": kept, "score_start": round(res_start.score, 4),
                   "score_tuned": round(res_tuned.score, 4),
                   "tuned_minus_start": diff, "tuned_minus_start_ci95": diff_ci,
                   "return_start": round(float(np.mean(res_start.returns)), 3),
                   "return_tuned": round(float(np.mean(res_tuned.returns)), 3),
                   "heldout_episodes": cfg.eval_episodes,
                   "heldout_stream": KEEP_STREAM, "heldout_seed": ctx.seed,
                   "env_steps": curve[-1]["env_steps"] if curve else 0,
                   "train_s": round(train_s, 2), "eval_s": round(eval_s, 2),
                   "final_std": curve[-1]["std"] if curve else cfg.init_std,
                   "config": cfg.model_dump(mode="json")}
        plot_learning_curve(curve, summary, ctx.workdir / "learning_curve.png",
                            f"rl-finetune on {ctx.robot.name}")
        out = Artifact.create("torch", path, ctx.robot.name,
                              meta={**art.meta, "kind": spec["kind"], "kept": kept},
                              lineage=(*art.lineage, self.name))
        return PassResult(out, {**summary, "curve": curve}, files=("learning_curve.png",))

    def check(self, inp: Artifact, result: PassResult, cfg: PassConfig,
              ctx: BuildContext) -> dict[str, Any]:
        out = result.artifact
        module = load_torch_policy(out.path)
        with torch.inference_mode():
            act = module(torch.as_tensor(random_obs(ctx.robot, 256, seed=ctx.seed + 2)))
        if not bool(torch.isfinite(act).all()):
            raise PassCheckError("rl-finetune: the tuned policy outputs NaN or Inf; lower lr "
                                 "or raise anchor_coef")
        s = result.summary
        losses = [r[k] for r in s["curve"] for k in ("pg_loss", "v_loss", "anchor_loss")
                  if r.get(k) is not None]
        if not all(math.isfinite(v) for v in losses):
            raise PassCheckError("rl-finetune: a training loss went NaN/Inf")
        return {"kept": s["kept"], "score_start": s["score_start"],
                "score_tuned": s["score_tuned"], "heldout_episodes": s["heldout_episodes"],
                "tuned_minus_start_ci95": s["tuned_minus_start_ci95"],
                "env_steps": s["env_steps"], "train_s": s["train_s"], "eval_s": s["eval_s"],
                "wall_s": round(s["train_s"] + s["eval_s"], 2), "final_std": s["final_std"]}

    @classmethod
    def notes(cls, stage: Mapping[str, Any], stages: list[Mapping[str, Any]], cfg: PassConfig,
              hardware: HardwareTarget) -> list[str]:
        """What fine-tuning added over the policy it started from, on the report's episodes."""
        done = [s for s in stages if not s["skipped"]]
        i = next(k for k, s in enumerate(done) if s["name"] == stage["name"])
        start = done[i - 1] if i > 0 else None
        if start is None or start["score"] is None or stage["score"] is None:
            return []
        known = next((s["checks"]["known_body"] for s in done if "known_body" in s["checks"]),
                     None)
        body = ("a body the fat policy was trained on" if known else
                "a body the fat policy never saw (zero-shot)" if known is False else "this body")
        c = stage["checks"]
        ci = c.get("tuned_minus_start_ci95")
        ci_txt = f", difference 95% [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
        kept = (f"; the pass kept the {c['kept']} policy (its own held-out episodes: start "
                f"{c['score_start']:.3f}, tuned {c['score_tuned']:.3f}{ci_txt})"
                if "kept" in c else "")
        body += " under the fault suite (--robust)" if getattr(cfg, "faults", "") == "suite" else ""
        return [f"RL fine-tuning on {body}: start ({start['name']}) {start['score']:.3f} → tuned "
                f"{stage['score']:.3f} ({stage['score'] - start['score']:+.3f}) on the report's "
                f"episodes{kept}"]
