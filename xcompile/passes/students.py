"""distill's students: how each kind is made, fitted to the teacher's labels and timed.

    "mlp"          `MLPPolicy` over the one observation: fitted by minibatches of steps.
    "history_mlp"  `HistoryMLP` over the last `history` observations: the same fit, on the
                   windows of every episode (zeros before it began, as the deployed state is).
    "gru"          `GRUStudent`: fitted on whole episodes side by side from the reset state,
                   truncated back-propagation through time (`TBPTT` steps per update, the state
                   carried across updates, detached).

Every fit is MSE to the teacher's actions with Adam (cosine learning rate for the final fit),
each step weighted when the caller gives weights (distill: `xcompile.sim.tasks.step_weights`,
rescaled to mean 1 over the data); the data are per episode, since a recurrent student's input at
a step depends on the steps before it.
Observation normalisation starts from the first round's data (std at least `min_std`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from xcompile.errors import PassCheckError
from xcompile.evaluate import torch_single_thread
from xcompile.models.mlp import MLPPolicy
from xcompile.models.recurrent import (
    GRUStudent,
    HistoryMLP,
    is_recurrent,
    reset_states,
    sequence_actions,
    windows,
)
from xcompile.sim.observations import random_obs
from xcompile.targets import RobotTarget

KINDS = ("mlp", "history_mlp", "gru")
TBPTT = 50          # GRU: steps per update
SEQ_BATCH = 8       # GRU: episodes per update (8 gave the most updates per second of 4, 8, 16)


def new_student(kind: str, obs_dim: int, n_act: int, hidden: list[int], activation: str,
                history: int, episodes: Sequence[np.ndarray], min_std: float) -> nn.Module:
    """A student of `kind` whose normalisation holds the statistics of what it sees on
    `episodes` (observations per episode)."""
    if kind == "history_mlp":
        s: nn.Module = HistoryMLP(obs_dim, hidden, n_act, activation, history, normalize=True)
        x, mean_of = torch.as_tensor(windows(episodes, history)), s.mlp
    elif kind == "gru":
        s = GRUStudent(obs_dim, hidden, n_act, activation, normalize=True)
        x, mean_of = torch.as_tensor(np.concatenate(episodes)), s
    else:
        s = MLPPolicy(obs_dim, hidden, n_act, activation, normalize=True)
        x, mean_of = torch.as_tensor(np.concatenate(episodes)), s
    with torch.no_grad():
        mean_of.obs_mean.copy_(x.mean(0))
        mean_of.obs_std.copy_(x.std(0).clamp_min(min_std))
    return s


def fit_student(student: nn.Module, obs: Sequence[np.ndarray], act: Sequence[np.ndarray],
                epochs: int, lr: float, batch: int, gen: torch.Generator,
                cosine: bool = False, weights: Sequence[np.ndarray] | None = None) -> float:
    """Fit `student` to the labels `act` of the episodes `obs` (each step's squared error times
    its entry of `weights`, per episode, rescaled to mean 1; None: all 1); the last epoch's mean
    loss."""
    w = None                 # one weight per step of every episode, in order
    if weights is not None:
        flat = np.concatenate(weights).astype(np.float32)
        w = torch.as_tensor(flat / max(float(flat.mean()), 1e-12))
    if isinstance(student, GRUStudent):
        ws = None if w is None else w.split([len(x) for x in obs])
        return _fit_sequences(student, obs, act, epochs, lr, gen, cosine, ws)
    y = torch.as_tensor(np.concatenate(act))
    if isinstance(student, HistoryMLP):
        return _fit_steps(student.mlp, torch.as_tensor(windows(obs, student.history)), y,
                          epochs, lr, batch, gen, cosine, w)
    return _fit_steps(student, torch.as_tensor(np.concatenate(obs)), y, epochs, lr, batch, gen,
                      cosine, w)


def action_error(student: nn.Module, obs: Sequence[np.ndarray], act: Sequence[np.ndarray]
                 ) -> float:
    """Mean |student - teacher| over every step of the episodes, the student's state carried."""
    with torch.inference_mode():
        got = sequence_actions(student, [torch.as_tensor(x) for x in obs])
    return float(torch.cat(got).sub(torch.as_tensor(np.concatenate(act))).abs().mean())


def latency_us(student: nn.Module, obs_dim: int, n: int = 300) -> float:
    """Median batch-1 latency of one call of `student`, torch eager on one thread."""
    x = torch.zeros(1, obs_dim)
    states = reset_states(student, 1) if is_recurrent(student) else []
    times = []
    with torch_single_thread(), torch.inference_mode():
        for i in range(n + 30):
            t = time.perf_counter_ns()
            student(x, *states)
            if i >= 30:
                times.append(time.perf_counter_ns() - t)
    return float(np.median(times) / 1e3)


def student_latency_us(robot: RobotTarget, kind: str, hidden: list[int], activation: str,
                       history: int, min_std: float) -> float:
    """`latency_us` of a new student of `kind` and these widths for `robot` (random weights)."""
    x = random_obs(robot, 8)
    s = new_student(kind, x.shape[1], robot.n_joints, hidden, activation, history, [x], min_std)
    return latency_us(s, x.shape[1])


def _schedule(opt: torch.optim.Optimizer, steps: int, lr: float, cosine: bool) -> Any:
    return (torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps), eta_min=lr * 0.05)
            if cosine else None)


def _finite(loss: float) -> float:
    if not math.isfinite(loss):
        raise PassCheckError(f"distill: the fit loss became {loss}; lower lr")
    return loss


def _fit_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
               batch: int, gen: torch.Generator, cosine: bool,
               w: torch.Tensor | None = None) -> float:
    """(Weighted) MSE fit on minibatches of steps."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = _schedule(opt, epochs * math.ceil(len(x) / batch), lr, cosine)
    model.train()
    loss_sum = 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        loss_sum, n_mb = 0.0, 0
        for s in range(0, len(x), batch):
            mb = perm[s:s + batch]
            err = ((model(x[mb]) - y[mb]) ** 2).mean(-1)
            loss = (err * w[mb]).mean() if w is not None else err.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            loss_sum, n_mb = loss_sum + loss.item(), n_mb + 1
        loss_sum /= max(1, n_mb)
    model.eval()
    return _finite(loss_sum)


def _fit_sequences(student: GRUStudent, obs: Sequence[np.ndarray], act: Sequence[np.ndarray],
                   epochs: int, lr: float, gen: torch.Generator, cosine: bool,
                   ws: Sequence[torch.Tensor] | None = None) -> float:
    """(Weighted) MSE fit on batches of whole episodes, truncated BPTT with an update every
    TBPTT steps."""
    xs, ys = [torch.as_tensor(x) for x in obs], [torch.as_tensor(y) for y in act]
    ws = ws if ws is not None else [torch.ones(len(x)) for x in xs]
    n = len(xs)
    updates = sum(math.ceil(max(len(xs[i]) for i in range(s, min(n, s + SEQ_BATCH))) / TBPTT)
                  for s in range(0, n, SEQ_BATCH))
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = _schedule(opt, epochs * updates, lr, cosine)
    student.train()
    loss_sum = 0.0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).tolist()
        loss_sum, n_up = 0.0, 0
        for s in range(0, n, SEQ_BATCH):
            idx = perm[s:s + SEQ_BATCH]
            x = nn.utils.rnn.pad_sequence([xs[i] for i in idx], batch_first=True)
            y = nn.utils.rnn.pad_sequence([ys[i] for i in idx], batch_first=True)
            w = nn.utils.rnn.pad_sequence([ws[i] for i in idx], batch_first=True)
            live = torch.arange(x.shape[1])[None] < torch.tensor([len(xs[i]) for i in idx])[:, None]
            (h,) = reset_states(student, len(idx))
            for t0 in range(0, x.shape[1], TBPTT):
                pred, h = student.sequence(x[:, t0:t0 + TBPTT], h)
                err = ((pred - y[:, t0:t0 + TBPTT]) ** 2).mean(-1) * w[:, t0:t0 + TBPTT]
                loss = err[live[:, t0:t0 + TBPTT]].mean()
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                opt.step()
                if sched is not None:
                    sched.step()
                h = h.detach()
                loss_sum, n_up = loss_sum + loss.item(), n_up + 1
        loss_sum /= max(1, n_up)
    student.eval()
    return _finite(loss_sum)
