"""PPO for rl-finetune's second phase: the loop that trains a policy (in place) on the target's
own task, anchored to where it started. The pass around it (options, budgets, the gain search,
the keep-better guard, the report) is `xcompile.passes.rl_finetune`, whose docstring says what
the actor, critic and anchor are; `cfg` is its `RLFinetuneConfig`.

Laid out like CleanRL's `ppo_continuous_action.py`: NETWORK, then one LOOP with ROLLOUT / GAE /
UPDATE sections. PPO: Schulman et al. 2017 (clipped surrogate), GAE(lambda): Schulman et al. 2016.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from xcompile.errors import PassCheckError
from xcompile.executors.factory import current_executor
from xcompile.executors.pools import default_workers
from xcompile.models.tuning import split_for_tuning
from xcompile.passes.base import BuildContext
from xcompile.passes.training import fault_schedule
from xcompile.sim.env import obs_dim
from xcompile.sim.procvec import ProcessVecEnvs
from xcompile.sim.vec import LockstepEnvs

TRAIN_STREAM = "finetune-train"   # PPO's training episodes (xcompile.seeds)


# NETWORK
def make_critic(n_obs: int, hidden: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip([n_obs, *hidden[:-1]], hidden):
        layers += [nn.Linear(a, b), nn.Tanh()]
    layers.append(nn.Linear(hidden[-1], 1))
    return nn.Sequential(*layers)


# LOOP
def train_ppo(policy: Any, cfg: Any, ctx: BuildContext) -> list[dict[str, Any]]:
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
    envs = vec_envs(robot, n, ctx.seed, fault_schedule(cfg, ctx))
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


def vec_envs(robot: Any, n: int, seed: int, faults: Any) -> LockstepEnvs | ProcessVecEnvs:
    """The training envs: in this process, or, under a pool executor (`use_executor`, e.g.
    `xcompile build --executor process`), sliced over up to one process per local core. The same
    VecSteps either way (global episode seeds), so the same training run."""
    ex = current_executor()
    workers = 1 if isinstance(ex, str) else min(ex.workers, n, default_workers())
    if workers > 1:
        return ProcessVecEnvs(robot, n, seed, faults, stream=TRAIN_STREAM, workers=workers)
    return LockstepEnvs(robot, n, seed, faults, stream=TRAIN_STREAM)
