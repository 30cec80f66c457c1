"""rl-finetune's first phase: a search over the gains on the policy's task inputs, for one body.

A fat policy answers a command or a goal with a strategy that fits every body on average. On one
body it often under- or over-shoots (a1 walks sideways slower than asked; xarm6 reaches short),
and the cheapest correction is the one a controls engineer makes on a real robot: calibrate the
gains. Here a gain multiplies one entry of the observation before the network reads it:

* locomotion: the command (vx, vy, yaw rate) and the measured base velocity (the feedback);
* reach: the goal minus the end effector (the error the arm closes);
* quadrotor: the position error and the velocity.

Method: a coordinate search with common random numbers. Every candidate runs deterministically
(the mean action) in closed loop on the task's own score, and all candidates of an iteration run
the same episodes, so a difference between them is the candidates', not the episodes'. Each
iteration tries every gain a step up and a step down from the current ones and moves each gain to
the top of the parabola through its three scores (`search_gains`); the step shrinks from one
iteration to the next, and each iteration runs new episodes of seed stream "gain-search"
(`xcompile.seeds`), which nothing else uses. Coordinates, not random directions: the gains differ
in how much they matter by an order of magnitude (on a1, 20% more forward command costs 0.06 of
score, 30% more sideways command gains 0.03), and a cross-entropy search over all of them at once
spent its budget learning to leave the sensitive ones alone. Gains stay within
[1/MAX_GAIN, MAX_GAIN]. rl-finetune's keep-better guard then decides on its own held-out episodes
whether the calibrated policy is kept.

Candidates are independent, so under a pool executor (`xcompile build --executor process`) an
iteration's 2 x gains + 1 candidates run as tasks on it, one per worker: the network goes to a
temporary torch-policy file each worker loads once (`GainTask`; nothing else is pickled but
gains and seeds), and each candidate runs the same episodes in the same batches as it would here,
so the scores, and the gains found, are the same on any executor.

The result is folded into the network exactly (`fold_input_gains`): the columns of the first
layer that read those entries are scaled, so the calibrated policy has the original's
architecture, size and speed, and export-onnx and distill take it unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xcompile.evaluate import score_policy
from xcompile.executors.factory import current_executor
from xcompile.executors.rollouts import PolicyRef
from xcompile.models.fat import PinnedPolicy
from xcompile.models.slim import MLPPolicy, save_torch_policy, spec_of
from xcompile.policy import torch_act
from xcompile.sim.tasks import obs_dim, obs_layout
from xcompile.stats import clearly_better, diff_ci95
from xcompile.targets import RobotTarget

SEARCH_STREAM = "gain-search"
MAX_GAIN = 2.0
SHRINK = 0.6        # each iteration's step is this times the last one's
SEARCH_STEP = 0.25  # the default first step of the log-gains (gains x 1.28 and / 1.28)
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


@dataclass(frozen=True)
class GainTask:
    """One candidate, as a worker runs it: `ref`'s policy reading `obs * gains`, on episodes
    first .. first+count-1 of `stream` (seed `seed`) under `faults`."""

    ref: PolicyRef
    gains: tuple[float, ...]
    first: int
    count: int
    seed: int
    stream: str
    faults: Any = None


def run_gain_task(task: GainTask) -> list[float]:
    """The candidate's per-episode scores (in whatever process the executor chose)."""
    loaded, robot = task.ref.load()
    return _scores(loaded.act, np.asarray(task.gains, dtype=np.float32), robot, task.count,
                   task.seed, task.stream, task.first, task.faults)


def _scores(act: Any, g: np.ndarray, robot: RobotTarget, episodes: int, seed: int, stream: str,
            first: int, faults: Any) -> list[float]:
    return score_policy(lambda obs: act(obs * g), robot, episodes, seed, stream=stream,
                        first_episode=first, faults=faults).scores


def _candidate_scorer(module: nn.Module, robot: RobotTarget, episodes: int, seed: int,
                      stream: str, faults: Any, tick: Any, stack: contextlib.ExitStack) -> Any:
    """score(gain vectors, first episode) -> each candidate's per-episode scores: as tasks on the
    current pool executor (the network as a temporary file that `stack` removes), else here."""
    ex = current_executor()
    if isinstance(ex, str) or ex.workers < 2:
        base = torch_act(module.eval())

        def here(gs: list[np.ndarray], first: int) -> list[list[float]]:
            out = []
            for g in gs:
                out.append(_scores(base, g, robot, episodes, seed, stream, first, faults))
                tick()
            return out
        return here
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="xcompile-gains-")))
    ref = PolicyRef.of(save_torch_policy(tmp / "policy.pt", module, spec_of(module)), robot)

    def pooled(gs: list[np.ndarray], first: int) -> list[list[float]]:
        tasks = [GainTask(ref, tuple(float(v) for v in g), first, episodes, seed, stream, faults)
                 for g in gs]
        return ex.map(run_gain_task, tasks, stateful=True, on_done=tick)
    return pooled


def search_gains(module: nn.Module, robot: RobotTarget, *, iterations: int, episodes: int,
                 step: float, seed: int, faults: Any = None, progress: Any = None,
                 stream: str = SEARCH_STREAM) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Coordinate search over the log-gains on `gain_indices(robot)`; returns (gains, one row per
    iteration).

    Iteration k runs the current gains and, for each gain in turn, the gain times exp(+h) and
    exp(-h) (h = `step` * SHRINK**k), all on episodes k*episodes .. (k+1)*episodes - 1 of
    `stream` (rl-finetune's "gain-search"; distill has its own) under the build's `seed`. Each
    gain then moves to the top of the parabola
    through its three scores when it opens downwards (at most h), else by h towards the better
    side when that side beat the current gains, else stays; all gains move at once. The
    candidates of an iteration run on the current pool executor when there is one (the module
    docstring); the result is the same."""
    idx = gain_indices(robot)
    d = len(idx)
    x, lim = np.zeros(d), float(np.log(MAX_GAIN))
    runs, total = 0, iterations * (1 + 2 * d)

    def vector(logg: np.ndarray) -> np.ndarray:
        g = np.ones(obs_dim(robot), dtype=np.float32)
        g[idx] = np.exp(np.clip(logg, -lim, lim))
        return g

    def tick(*_: Any) -> None:
        nonlocal runs
        runs += 1
        if progress:
            progress(runs, total)

    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        score = _candidate_scorer(module, robot, episodes, seed, stream, faults, tick, stack)
        for it in range(iterations):
            h = step * SHRINK ** it
            unit = np.eye(d) * h
            cands = [x] + [x + unit[j] for j in range(d)] + [x - unit[j] for j in range(d)]
            f = np.array([float(np.mean(s))
                          for s in score([vector(c) for c in cands], it * episodes)])
            f0, fp, fm = f[0], f[1:d + 1], f[d + 1:]
            slope, curv = (fp - fm) / 2, fp - 2 * f0 + fm      # per gain, in units of h
            with np.errstate(divide="ignore", invalid="ignore"):
                vertex = np.clip(-slope / curv, -1.0, 1.0)
            towards = np.sign(fp - fm) * (np.maximum(fp, fm) > f0)
            x = np.clip(x + h * np.where(curv < 0, vertex, towards), -lim, lim)
            rows.append({"iteration": it, "step": round(h, 4), "score_center": round(f0, 4),
                         "score_best": round(float(max(f0, fp.max(), fm.max())), 4),
                         "gains": np.round(np.exp(x), 4).tolist()})
    return np.exp(x), rows


def search_and_keep(module: nn.Module, robot: RobotTarget, *, iterations: int, episodes: int,
                    keep_episodes: int, seed: int, faults: Any, streams: tuple[str, str],
                    progress: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """`module` with the gains of `search_gains` (on stream `streams[0]`) when it then beats
    `module` on `keep_episodes` held-out episodes of `streams[1]` with the paired difference's
    95% interval above 0, else `module`; and the record (gains, kept, scores, the search's rows).
    A module whose gains cannot be folded comes back unchanged with an empty record."""
    idx = gain_indices(robot)
    if not idx or not can_fold(module, idx):
        return module, {}
    gains, rows = search_gains(module, robot, iterations=iterations, episodes=episodes,
                               step=SEARCH_STEP, seed=seed, faults=faults, progress=progress,
                               stream=streams[0])
    cand = fold_input_gains(module, idx, gains)
    plain, tuned = (score_policy(torch_act(m), robot, keep_episodes, seed, stream=streams[1],
                                 faults=faults).scores for m in (module, cand))
    kept = clearly_better(tuned, plain)
    return (cand if kept else module), {
        "gains": [float(g) for g in gains], "kept": kept, "search": rows,
        "score_without": round(float(np.mean(plain)), 4),
        "score_with": round(float(np.mean(tuned)), 4),
        "with_minus_without_ci95": diff_ci95(tuned, plain)[1]}
