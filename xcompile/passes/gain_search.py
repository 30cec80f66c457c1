"""rl-finetune's first phase: a search over the gains on the policy's task inputs, for one body.

A fat policy answers a command or a goal with a strategy that fits every body on average. On one
body it often under- or over-shoots (a1 walks sideways slower than asked; xarm6 reaches short),
and the cheapest correction is the one a controls engineer makes on a real robot: calibrate the
gains. Here a gain multiplies one entry of the observation before the network reads it:

* locomotion: the command (vx, vy, yaw rate) and the measured base velocity (the feedback);
* reach: the goal minus the end effector (the error the arm closes);
* quadrotor: the position error and the velocity.

Method: the cross-entropy method (Rubinstein 1999; as a policy search, Szita & Lorincz 2006) over
the log-gains, every candidate run deterministically (the mean action) in closed loop on the
task's own score. All candidates of a generation run the same episodes (common random numbers: a
difference between candidates is the candidates', not the episodes'), each generation new ones of
seed stream "gain-search" (`xcompile.seeds`), which nothing else uses. Gains stay within
[1/MAX_GAIN, MAX_GAIN]. rl-finetune's keep-better guard then decides on its own held-out episodes
whether the calibrated policy is kept.

The result is folded into the network exactly (`fold_input_gains`): the columns of the first
layer that read those entries are scaled, so the calibrated policy has the original's
architecture, size and speed, and export-onnx and distill take it unchanged.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from xcompile.evaluate import score_policy
from xcompile.models.fat import PinnedPolicy
from xcompile.models.slim import MLPPolicy
from xcompile.policy import torch_act
from xcompile.sim.tasks import obs_dim, obs_layout
from xcompile.targets import RobotTarget

SEARCH_STREAM = "gain-search"
MAX_GAIN = 2.0
MIN_SIGMA = 0.03    # log-gain std floor: the search keeps exploring a little
# The observation slices (names of `xcompile.sim.tasks.obs_layout`) whose entries get a gain.
GAIN_SLICES = {"locomotion": ("cmd_vx_vy_yaw", "lin_vel_b"),
               "reach": ("goal_minus_ee_b",),
               "quadrotor": ("position_minus_setpoint", "linear_velocity")}


def gain_indices(robot: RobotTarget) -> list[int]:
    """Indices into `robot`'s flat observation of the entries that get a gain."""
    names = GAIN_SLICES.get(robot.family, ())
    out, at = [], 0
    for name, width in obs_layout(robot):
        if name in names:
            out += list(range(at, at + width))
        at += width
    return out


def can_fold(module: nn.Module, idx: list[int]) -> bool:
    """Whether `fold_input_gains` knows how to fold gains on `idx` into `module`."""
    if isinstance(module, PinnedPolicy):
        return all(i < module.global_dim for i in idx)
    return isinstance(module, MLPPolicy)


def fold_input_gains(module: nn.Module, idx: list[int], gains: np.ndarray) -> nn.Module:
    """A copy of `module` that computes `module(obs * g)`, g = `gains` on entries `idx`, 1 else.

    PinnedPolicy: the global encoder's columns for those entries are scaled. MLPPolicy: its first
    Linear's columns, or with normalisation its mean and std divided by the gain
    ((g o - m) / s == (o - m / g) / (s / g))."""
    if not can_fold(module, idx):
        raise ValueError(f"cannot fold input gains into a {type(module).__name__}")
    out = copy.deepcopy(module)
    g = torch.as_tensor(np.asarray(gains, dtype=np.float32))
    cols = torch.as_tensor(idx, dtype=torch.long)
    with torch.no_grad():
        if isinstance(out, PinnedPolicy):
            out.global_encoder.weight[:, cols] *= g
        elif out.normalize:
            out.obs_mean[cols] /= g
            out.obs_std[cols] /= g
        else:
            out.net[0].weight[:, cols] *= g
    return out.eval()


def search_gains(module: nn.Module, robot: RobotTarget, *, generations: int, population: int,
                 episodes: int, sigma: float, seed: int, faults: Any = None,
                 progress: Any = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """CEM over log-gains on `gain_indices(robot)`; returns (gains, one row per generation).

    Generation k runs its `population` candidates (the current mean first) on episodes
    k*episodes .. (k+1)*episodes - 1 of stream "gain-search" under the build's `seed`; the best
    third (at least 2) sets the next mean and std."""
    idx = gain_indices(robot)
    d = len(idx)
    rng = np.random.default_rng(seed)
    mean, std = np.zeros(d), np.full(d, sigma)
    lim = float(np.log(MAX_GAIN))
    base = torch_act(module.eval())
    rows: list[dict[str, Any]] = []
    for gen in range(generations):
        cands = [mean] + [np.clip(mean + std * rng.standard_normal(d), -lim, lim)
                          for _ in range(population - 1)]
        scores = []
        for c in cands:
            g = np.ones(obs_dim(robot), dtype=np.float32)
            g[idx] = np.exp(c)
            res = score_policy(lambda obs, g=g: base(obs * g), robot, episodes, seed,
                               stream=SEARCH_STREAM, first_episode=gen * episodes, faults=faults)
            scores.append(res.score)
            if progress:
                progress(gen * population + len(scores), generations * population)
        order = np.argsort(scores)[::-1]
        elite = np.array([cands[i] for i in order[:max(2, population // 3)]])
        rows.append({"generation": gen, "score_mean_candidate": round(scores[0], 4),
                     "score_best": round(float(np.max(scores)), 4),
                     "best_gains": np.round(np.exp(cands[order[0]]), 4).tolist()})
        mean, std = elite.mean(0), np.maximum(elite.std(0), MIN_SIGMA)
    return np.exp(mean), rows

