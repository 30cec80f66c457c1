"""Closed-loop evaluation: the score every report uses.

A policy is any callable from a batch of flat observations (B, obs_dim) to actions (B, n). Episodes
run in lock-step over several simulators so that the policy is called on a batch (a fat network is
slow per call, not per row). Episode i uses seed `seed + i`, so a score is reproducible and two
policies are compared on the same episodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from xcompile.sim.env import Faults, RobotEnv
from xcompile.targets import RobotTarget

BatchPolicy = Callable[[np.ndarray], np.ndarray]


@dataclass
class EvalResult:
    robot: str
    seed: int
    scores: list[float]
    falls: int = 0
    invalid_actions: int = 0
    steps: int = 0
    returns: list[float] = field(default_factory=list)   # undiscounted env reward per episode
    observations: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def score(self) -> float:
        return float(np.mean(self.scores))

    @property
    def success_rate(self) -> float:
        return float(np.mean([s >= 1.0 - 1e-9 for s in self.scores]))

    def as_dict(self) -> dict:
        return {
            "robot": self.robot, "seed": self.seed, "episodes": len(self.scores),
            "score": round(self.score, 4), "score_std": round(float(np.std(self.scores)), 4),
            "falls": self.falls, "success_rate": round(self.success_rate, 4),
            "invalid_actions": self.invalid_actions, "scores": [round(s, 4) for s in self.scores],
        }


def evaluate(policy: BatchPolicy, robot: RobotTarget, episodes: int = 20, seed: int = 0,
             faults: Faults | None = None, parallel: int = 10, record_obs: bool = False,
             on_episode: Callable[[], None] | None = None) -> EvalResult:
    res = EvalResult(robot=robot.name, seed=seed, scores=[0.0] * episodes,
                     returns=[0.0] * episodes)
    envs = [RobotEnv(robot, faults=faults) for _ in range(min(parallel, episodes))]
    try:
        for start in range(0, episodes, len(envs)):
            batch = list(range(start, min(start + len(envs), episodes)))
            obs = np.stack([envs[k].reset(seed=seed + i)[0] for k, i in enumerate(batch)])
            live = list(range(len(batch)))
            while live:
                if record_obs:
                    res.observations.append(obs[live].copy())
                actions = np.asarray(policy(obs[live]), dtype=np.float32)
                still = []
                for row, k in enumerate(live):
                    o, r, term, trunc, info = envs[k].step(actions[row])
                    obs[k] = o
                    res.returns[batch[k]] += float(r)
                    res.steps += 1
                    if term or trunc:
                        res.scores[batch[k]] = float(info["score"])
                        res.falls += int(getattr(envs[k], "fell", False))
                        res.invalid_actions += int(info.get("invalid_action", False))
                        if on_episode:
                            on_episode()
                    else:
                        still.append(k)
                live = still
    finally:
        for e in envs:
            e.close()
    return res


def rollout_gif(policy: BatchPolicy, robot: RobotTarget, path, seed: int = 0,
                every: int = 4, max_frames: int = 60) -> None:
    """Render one evaluation episode (seed `seed`) of `policy` to an animated GIF."""
    from xcompile.sim.render import frame, write_gif

    env = RobotEnv(robot)
    try:
        obs, _ = env.reset(seed=seed)
        frames = [frame(env)]
        t = 0
        while True:
            obs, _, term, trunc, _ = env.step(np.asarray(policy(obs[None]))[0])
            t += 1
            if t % every == 0 and len(frames) < max_frames:
                frames.append(frame(env))
            if term or trunc:
                break
        write_gif(frames, path, fps=max(1, int(robot.control_hz / every)))
    finally:
        env.close()
