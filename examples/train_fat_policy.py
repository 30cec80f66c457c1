"""Train the sample fat policy by imitation across the 8 built-in robots.

Teachers are the scripted experts of `xcompile.sim.experts` (a tuned trot for the quadrupeds,
resolved-rate reaching for the arms). The recipe, top to bottom:

1. EXPERT DATA — roll out each expert with Gaussian noise on its actions (DART, Laskey et al.
   2017) and label every visited state with the expert's clean action.
2. FIT — one transformer over all bodies; each step sums the action MSE over a batch of every body.
3. DAGGER — roll out the fat policy itself, label with the expert, add to the data, fit again
   (Ross et al. 2011). This fixes the states the policy drifts into and the expert never visits.
4. SAVE — checkpoint with the registry of bodies (descriptors from their URDFs).

Episodes come from the seed streams of `xcompile.seeds`: robot i's expert episodes are episodes
100000 i, 100000 i + 1, ... of stream "expert-data", its DAgger round r episodes 100000 i + 1000 r, ...
of stream "fat-dagger"; neither meets the episodes any build, report or benchmark scores on.

Seeded and reproducible on CPU (torch ops on 2 threads are deterministic here; PyBullet has no RNG).

    python examples/train_fat_policy.py --out fat.pt                    # ~1 h on 2 cores
    python examples/train_fat_policy.py --init fat.pt --reach-x 3 ...   # continue (examples/README.md)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from xcompile.evaluate import evaluate
from xcompile.models.checkpoint import load_checkpoint, save_checkpoint
from xcompile.models.descriptors import joint_descriptors
from xcompile.models.fat import FatConfig, FatPolicy, count_params
from xcompile.policy import fat_act
from xcompile.seeds import episode_seed
from xcompile.sim.env import RobotEnv
from xcompile.sim.experts import expert_action
from xcompile.targets import list_robots, load_robot


def collect(robot, episodes: int, seed: int, noise_rad: float, policy=None, parallel: int = 10):
    """Lock-step rollouts; returns (obs, expert labels). Executes the expert (+noise) or `policy`."""
    rng = np.random.default_rng(seed)
    envs = [RobotEnv(robot) for _ in range(min(parallel, episodes))]
    xs, ys = [], []
    sigma = noise_rad / robot.joints.action_scale
    for start in range(0, episodes, len(envs)):
        n = min(len(envs), episodes - start)
        obs = np.stack([envs[k].reset(seed=seed + start + k)[0] for k in range(n)])
        live = list(range(n))
        while live:
            labels = np.stack([expert_action(envs[k], obs[k]) for k in live])
            xs.append(obs[live].copy())
            ys.append(labels)
            if policy is None:
                acts = labels + sigma * rng.standard_normal(labels.shape)
            else:
                acts = policy(obs[live])
            still = []
            for row, k in enumerate(live):
                o, _, term, trunc, _ = envs[k].step(acts[row])
                obs[k] = o
                if not (term or trunc):
                    still.append(k)
            live = still
    for e in envs:
        e.close()
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.float32)


def fit(model, data, bodies, steps: int, lr: float, batch: int, gen: torch.Generator,
        log_every=100, weights=None):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    t0 = time.time()
    for step in range(steps):
        loss_total = 0.0
        opt.zero_grad()
        for name, (x, y) in data.items():
            idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
            pred = model.act(x[idx], bodies[name]["desc"], bodies[name]["family"])
            loss = torch.mean((pred - y[idx]) ** 2)
            (loss * (weights or {}).get(name, 1.0)).backward()
            loss_total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {loss_total / len(data):.5f}  "
                  f"({time.time() - t0:.0f}s)", flush=True)
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="examples/fat_policy.pt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--robots", nargs="*", default=list_robots())
    ap.add_argument("--init", default=None,
                    help="continue from this fat checkpoint (its architecture and weights) instead "
                         "of a fresh network")
    ap.add_argument("--expert-episodes", type=int, default=24)
    ap.add_argument("--dagger-rounds", type=int, default=2)
    ap.add_argument("--dagger-episodes", type=int, default=10)
    ap.add_argument("--reach-x", type=int, default=1,
                    help="the arms get this many times the expert and DAgger episodes (a reaching "
                         "policy has a whole workspace of goals to learn)")
    ap.add_argument("--reach-weight", type=float, default=1.0,
                    help="weight of the arms' action MSE in the fit (their actions are radians, "
                         "the quadrupeds' quarter radians, and reaching needs about 0.01 rad)")
    ap.add_argument("--steps", type=int, default=2000, help="fit steps for the first fit (0: none)")
    ap.add_argument("--dagger-steps", type=int, default=300, help="fit steps after each round")
    ap.add_argument("--batch", type=int, default=64, help="per body per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--noise-rad", type=float, default=0.05, help="DART noise on expert actions")
    ap.add_argument("--eval-episodes", type=int, default=10)
    ap.add_argument("--d-model", type=int, default=256, help="token width")
    ap.add_argument("--n-layers", type=int, default=6, help="transformer blocks")
    ap.add_argument("--n-heads", type=int, default=8, help="attention heads per block")
    ap.add_argument("--d-ff", type=int, default=768, help="hidden width of each block's MLP")
    a = ap.parse_args()

    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    robots = {n: load_robot(n) for n in a.robots}
    bodies = {n: {"desc": torch.as_tensor(joint_descriptors(r)), "family": r.family}
              for n, r in robots.items()}
    if a.init:
        start = load_checkpoint(a.init)
        missing = sorted(set(robots) - {b["name"] for b in start.registry})
        if missing:
            raise SystemExit(f"--init {a.init} was not trained on {', '.join(missing)}")
        model = start.model
        init_from = {"sha256": start.sha256, "trained_by": start.extra.get("trained_by"),
                     "args": start.extra.get("args"), "init": start.extra.get("init")}
    else:
        init_from = None
        model = FatPolicy(FatConfig(d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads,
                                    d_ff=a.d_ff))
    print(f"fat policy: {count_params(model):,} parameters", flush=True)

    weights = {n: a.reach_weight for n, r in robots.items() if r.family == "reach"}

    def episodes_x(robot) -> int:
        return a.reach_x if robot.family == "reach" else 1

    # EXPERT DATA
    raw: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, (n, r) in enumerate(robots.items()):
        t = time.time()
        raw[n] = collect(r, a.expert_episodes * episodes_x(r),
                         seed=episode_seed("expert-data", a.seed, 100_000 * i),
                         noise_rad=a.noise_rad)
        print(f"expert data {n}: {raw[n][0].shape[0]} samples ({time.time() - t:.0f}s)",
              flush=True)

    registry = [{"name": n, "family": r.family, "joints": list(r.joints.names),
                 "descriptors": bodies[n]["desc"].tolist(), "urdf": r.urdf}
                for n, r in robots.items()]

    def save():
        # Saved after every fit too, so a long run that is stopped still leaves a usable policy.
        save_checkpoint(a.out, model, registry, extra={
            "trained_by": "examples/train_fat_policy.py", "seed": a.seed,
            "args": {k: v for k, v in vars(a).items() if k != "out"}, "init": init_from})
        print(f"saved {a.out}", flush=True)

    def tensors():
        return {n: (torch.as_tensor(x), torch.as_tensor(y)) for n, (x, y) in raw.items()}

    # FIT
    if a.steps:
        print("fit", flush=True)
        fit(model, tensors(), bodies, a.steps, a.lr, a.batch, gen, weights=weights)
        save()

    # DAGGER
    for rnd in range(a.dagger_rounds):
        for i, (n, r) in enumerate(robots.items()):
            pol = fat_act(model, bodies[n]["desc"].numpy(), r.family)
            x, y = collect(r, a.dagger_episodes * episodes_x(r),
                           seed=episode_seed("fat-dagger", a.seed, 100_000 * i + 1000 * rnd),
                           noise_rad=0.0, policy=pol)
            raw[n] = (np.concatenate([raw[n][0], x]), np.concatenate([raw[n][1], y]))
        print(f"dagger round {rnd}: {sum(v[0].shape[0] for v in raw.values())} samples", flush=True)
        fit(model, tensors(), bodies, a.dagger_steps, a.lr * 0.5, a.batch, gen, weights=weights)
        save()

    # SAVE
    save()
    for n, r in robots.items():
        res = evaluate(fat_act(model, bodies[n]["desc"].numpy(), r.family), r,
                       episodes=a.eval_episodes, seed=0)
        print(f"eval {n}: score {res.score:.3f} falls {res.falls}", flush=True)


if __name__ == "__main__":
    main()
