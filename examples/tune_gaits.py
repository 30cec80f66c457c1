"""Tune the scripted trot of each quadruped by search on its own score.

Signs first (which way each joint folds is a property of the URDF), then the cross-entropy method
over the continuous gait shape. Prints a `Gait(...)` line per robot to paste into
xcompile/sim/experts.py. Seeded: the same command gives the same gaits.

    python examples/tune_gaits.py a1 aliengo --iters 8
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from xcompile.sim.env import RobotEnv
from xcompile.sim.experts import Gait, locomotion_action

FIELDS = ["stride", "lift", "k_speed", "k_pitch", "k_roll", "duty_shift"]
LOW = np.array([0.1, 0.0, -0.5, -1.0, -1.0, -1.0])
HIGH = np.array([1.2, 1.0, 1.0, 1.0, 1.0, 1.0])


def evaluate(env: RobotEnv, gait: Gait, seeds: range) -> float:
    scores = []
    for s in seeds:
        obs, _ = env.reset(seed=s)
        while True:
            obs, _, term, trunc, info = env.step(locomotion_action(env, obs, gait))
            if term or trunc:
                break
        scores.append(info["score"] - (0.5 if env.fell else 0.0))
    return float(np.mean(scores))


def tune(name: str, iters: int, pop: int, seed: int, n_seeds: int = 3) -> tuple[Gait, float]:
    env = RobotEnv(name)
    rng = np.random.default_rng(seed)
    seeds = range(1000, 1000 + n_seeds)
    best = max(
        (Gait(thigh_sign=ts, knee_sign=ks, stride=st, lift=lift) for ts in (1.0, -1.0)
         for ks in (1.0, -1.0) for st in (0.2, 0.5) for lift in (0.3, 0.6)),
        key=lambda g: evaluate(env, g, seeds),
    )
    mean = np.array([getattr(best, f) for f in FIELDS])
    std = (HIGH - LOW) / 4
    best_score = evaluate(env, best, seeds)
    for it in range(iters):
        cands = np.clip(mean + std * rng.standard_normal((pop, len(FIELDS))), LOW, HIGH)
        scores = []
        for c in cands:
            g = dataclasses.replace(best, **dict(zip(FIELDS, map(float, c))))
            scores.append(evaluate(env, g, seeds))
        elite = cands[np.argsort(scores)[-max(2, pop // 4):]]
        mean, std = elite.mean(0), elite.std(0) + 0.02
        if max(scores) > best_score:
            best_score = max(scores)
            best = dataclasses.replace(best, **dict(zip(FIELDS, map(float, cands[int(np.argmax(scores))]))))
        print(f"{name} iter {it}: best {best_score:.3f} mean-of-pop {np.mean(scores):.3f}", flush=True)
    env.close()
    return best, best_score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("robots", nargs="+")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--pop", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--episodes", type=int, default=3, help="episodes per candidate")
    a = ap.parse_args()
    for name in a.robots:
        gait, score = tune(name, a.iters, a.pop, a.seed, a.episodes)
        fields = ", ".join(f"{f.name}={round(getattr(gait, f.name), 3)}"
                           for f in dataclasses.fields(gait))
        print(f'RESULT "{name}": Gait({fields}),  # tuned score {score:.3f}', flush=True)


if __name__ == "__main__":
    main()
