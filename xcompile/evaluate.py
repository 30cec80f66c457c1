"""Closed-loop evaluation: the score every report uses.

A policy is any callable from a batch of flat observations (B, obs_dim) to actions (B, n). Episodes
run in lock-step over several simulators so that the policy is called on a batch (a fat network is
slow per call, not per row). Episode i of a call with seed `seed` and stream `stream` starts from
`xcompile.seeds.episode_seed(stream, seed, i)`: a score is reproducible, two policies are compared on
the same episodes, and each use of episodes (the report's scores, a pass's checks, training data,
benchmarks; see `xcompile.seeds.STREAMS`) runs on its own, so no number is read off the episodes
something was tuned on. `score_policy` is `evaluate` with torch on one thread, the way every pass
and measurement scores a policy.

`EvalResult.as_dict()` carries the score with its bootstrap 95% interval over episodes
(`xcompile.stats.mean_ci95`), the per-episode scores, and what the episodes did physically
(`RobotEnv.episode_metrics`): falls, velocity and yaw-rate tracking errors and the cost of
transport (locomotion); the distance to each goal at its end in mm and the time to within 1 cm
(reach).

Stateful policies (a recurrent network's hidden state) keep one state per episode and speak a small
protocol, two optional methods of the policy callable that `evaluate` and `rollout_gif` call:
`reset_states()` at the start of a rollout (every episode forgets its state) and, before each call,
`set_rows(episodes)`: row r of the batch continues episode `episodes[r]` (the index i below; an
episode seen for the first time starts from its reset state). Rows change as episodes end, so the
row alone does not say whose state it is. `xcompile.onnx.recurrent.StatefulPolicy` implements it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xcompile.errors import ContractError, XCompileError
from xcompile.seeds import episode_seed
from xcompile.sim.env import RobotEnv, make_env
from xcompile.sim.fault_suite import FaultsArg, episode_options, fixed_faults
from xcompile.sim.render import frame, write_gif
from xcompile.stats import mean_ci95
from xcompile.targets import RobotTarget

BatchPolicy = Callable[[np.ndarray], np.ndarray]


def begin_rollout(policy: BatchPolicy) -> None:
    """A stateful policy's `reset_states()` (see the module docstring); nothing for others."""
    reset = getattr(policy, "reset_states", None)
    if callable(reset):
        reset()


def announce_rows(policy: BatchPolicy, episodes: list[int]) -> None:
    """A stateful policy's `set_rows(episodes)` before a call; nothing for others."""
    set_rows = getattr(policy, "set_rows", None)
    if callable(set_rows):
        set_rows(episodes)


@dataclass
class EvalResult:
    robot: str
    seed: int
    scores: list[float]
    falls: int = 0
    invalid_actions: int = 0
    steps: int = 0
    returns: list[float] = field(default_factory=list)   # undiscounted env reward per episode
    nonfinite_action_episodes: int = 0   # episodes in which the policy emitted a NaN/Inf action
    observations: list[np.ndarray] = field(default_factory=list, repr=False)
    stream: str | None = None            # the seed stream the episodes came from (xcompile.seeds)
    # What each episode did physically (`RobotEnv.episode_metrics()` when it ended).
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def score(self) -> float:
        return float(np.mean(self.scores))

    @property
    def score_ci95(self) -> list[float] | None:
        """Bootstrap 95% interval [low, high] of the mean score (None for no episodes)."""
        return mean_ci95(self.scores)

    @property
    def success_rate(self) -> float:
        """Reach: the share of goals reached within the task's tolerance at their end.
        Locomotion: the share of episodes without a fall; quadrotor: without a crash."""
        goals = sum(m.get("goals", 0) for m in self.metrics)
        if goals:
            return sum(m["goals_within_tolerance"] for m in self.metrics) / goals
        return 1.0 - self.falls / len(self.scores) if self.scores else 0.0

    def metric_mean(self, key: str) -> float | None:
        """The mean of a physical figure over the episodes that have it (None: none has)."""
        vals = [m[key] for m in self.metrics if m.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    def physical_line(self) -> str:
        """What the episodes did, in a few words for the terminal."""
        n = len(self.scores)
        if any("reach_error_mm" in m for m in self.metrics):
            t = self.metric_mean("time_to_1cm_s")
            return (f"hand {self.metric_mean('reach_error_mm'):.1f} mm from the goal at its end, "
                    f"{100 * self.success_rate:.0f}% of goals within tolerance, "
                    + (f"{t:.2f} s to within 1 cm" if t is not None else "never within 1 cm"))
        if any("position_rmse_m" in m for m in self.metrics):
            t = self.metric_mean("settling_time_s")
            return (f"crashes {self.falls}/{n}, {100 * self.metric_mean('position_rmse_m'):.1f} cm "
                    "RMS from the setpoint, "
                    + (f"settled within 10 cm in {t:.2f} s" if t is not None else
                       "never settled within 10 cm"))
        if any("vel_error_mps" in m for m in self.metrics):
            return (f"falls {self.falls}/{n}, velocity off by {self.metric_mean('vel_error_mps'):.2f}"
                    f" m/s, yaw rate by {self.metric_mean('yaw_rate_error_rps'):.2f} rad/s")
        return f"falls {self.falls}/{n}"

    def as_dict(self) -> dict:
        d = {
            "robot": self.robot, "seed": self.seed, "stream": self.stream,
            "episodes": len(self.scores),
            "score": round(self.score, 4), "score_std": round(float(np.std(self.scores)), 4),
            "score_ci95": self.score_ci95,
            "falls": self.falls, "success_rate": round(self.success_rate, 4),
            "invalid_actions": self.invalid_actions, "scores": [round(s, 4) for s in self.scores],
            "nonfinite_action_episodes": self.nonfinite_action_episodes,
        }
        if self.returns:
            d["return_mean"] = round(float(np.mean(self.returns)), 4)
            d["returns"] = [round(r, 4) for r in self.returns]
        for key in ("vel_error_mps", "yaw_rate_error_rps", "energy_per_m_j", "cost_of_transport",
                    "reach_error_mm", "time_to_1cm_s", "position_rmse_m", "settling_time_s"):
            mean = self.metric_mean(key)
            if mean is not None:
                d[key] = round(mean, 4)
        if any("reach_error_mm" in m for m in self.metrics):
            d["reach_errors_mm"] = [round(m["reach_error_mm"], 2) for m in self.metrics]
            goals = sum(m["goals"] for m in self.metrics)
            d["goals"] = goals
            d["goals_within_1cm"] = sum(m["goals_within_1cm"] for m in self.metrics)
        if any("position_rmse_m" in m for m in self.metrics):
            d["crashes"] = self.falls
            d["setpoints"] = sum(m["setpoints"] for m in self.metrics)
            d["setpoints_settled"] = sum(m["setpoints_settled"] for m in self.metrics)
        return d

    def record_physics(self, i: int, env: RobotEnv) -> None:
        """Record episode `i`'s physical figures from `env`, whose episode has just ended."""
        self.metrics[i] = env.episode_metrics()

    def nonfinite_message(self) -> str | None:
        """A sentence for the user when the policy emitted NaN/Inf actions, else None."""
        if not self.nonfinite_action_episodes:
            return None
        return (f"the policy emitted NaN/Inf actions in {self.nonfinite_action_episodes} of "
                f"{len(self.scores)} episodes (each such episode ends there and scores 0)")


def _actions(policy: BatchPolicy, obs: np.ndarray, robot: RobotTarget) -> np.ndarray:
    """The policy's actions for a batch, checked to be (batch, n_joints)."""
    actions = np.asarray(policy(obs), dtype=np.float32)
    want = (len(obs), robot.n_joints)
    if actions.shape != want:
        raise ContractError(
            f"the policy returned actions of shape {actions.shape} for {len(obs)} observations; "
            f"robot '{robot.name}' needs shape {want} ({robot.n_joints} joints). The policy was "
            f"not made for this robot")
    return actions


def evaluate(policy: BatchPolicy, robot: RobotTarget, episodes: int = 20, seed: int = 0,
             faults: FaultsArg = None, parallel: int = 10, record_obs: bool = False,
             on_episode: Callable[[], None] | None = None, stream: str = "report",
             first_episode: int = 0,
             on_rows: Callable[[list[int]], None] | None = None) -> EvalResult:
    """Closed-loop score of `policy` over `episodes` episodes; episode i (0-based) starts from
    `episode_seed(stream, seed, first_episode + i)`. Every caller names the stream of its use
    (`xcompile.seeds.STREAMS`); `first_episode` lets one use draw several disjoint batches from
    its stream (distill's DAgger rounds). `on_rows(episodes)`, before each policy call, says which
    episode (i above) each row of the batch belongs to (DAgger's per-episode randomness); a
    stateful policy is told the same through its own protocol (the module docstring). `faults`:
    the same for every episode, or a `FaultSchedule` of episode first_episode + i."""
    seeds = [episode_seed(stream, seed, first_episode + i) for i in range(episodes)]
    res = EvalResult(robot=robot.name, seed=seed, scores=[0.0] * episodes,
                     returns=[0.0] * episodes, stream=stream)
    res.metrics = [{} for _ in range(episodes)]
    nonfinite: set[int] = set()
    envs = [make_env(robot, faults=fixed_faults(faults)) for _ in range(min(parallel, episodes))]
    begin_rollout(policy)
    try:
        for start in range(0, episodes, len(envs)):
            batch = list(range(start, min(start + len(envs), episodes)))
            obs = np.stack([envs[k].reset(seed=seeds[i], options=episode_options(
                faults, first_episode + i))[0] for k, i in enumerate(batch)])
            live = list(range(len(batch)))
            while live:
                if record_obs:
                    res.observations.append(obs[live].copy())
                if on_rows:
                    on_rows([batch[k] for k in live])
                announce_rows(policy, [batch[k] for k in live])
                actions = _actions(policy, obs[live], robot)
                finite = np.isfinite(actions).all(axis=1)
                still = []
                for row, k in enumerate(live):
                    if not finite[row]:
                        nonfinite.add(batch[k])   # counted here whatever the env does with it
                    o, r, term, trunc, info = envs[k].step(actions[row])
                    obs[k] = o
                    res.returns[batch[k]] += float(r)
                    res.steps += 1
                    if term or trunc:
                        res.scores[batch[k]] = float(info["score"])
                        res.falls += int(getattr(envs[k], "fell", False))
                        res.invalid_actions += int(info.get("invalid_action", False))
                        res.record_physics(batch[k], envs[k])
                        if on_episode:
                            on_episode()
                    else:
                        still.append(k)
                live = still
    finally:
        for e in envs:
            e.close()
    res.nonfinite_action_episodes = len(nonfinite)
    return res


@contextlib.contextmanager
def torch_single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block, restoring the thread count afterwards.

    Batch-1 calls of small networks are faster on one thread, and much faster on a busy machine
    where a second thread waits for a core."""
    import torch  # heavy: only where a torch policy runs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def score_policy(policy: BatchPolicy, robot: RobotTarget, episodes: int, seed: int,
                 stream: str = "report", **kw: Any) -> EvalResult:
    """`evaluate` (episodes from `stream`) with torch on one thread: the simulator and the policy
    take turns on one thread, and a second torch thread only waits for a core."""
    with torch_single_thread():
        return evaluate(policy, robot, episodes=episodes, seed=seed, stream=stream, **kw)


def check_gif_path(path: str | os.PathLike[str]) -> Path:
    """Refuse, before any simulation, a GIF path that cannot be written: its folder must exist and
    be writable, and the path must not be a folder. Returns the path."""
    path = Path(path)
    folder = path.parent
    if not path.name or path.name in (".", ".."):
        raise XCompileError(f"GIF path {str(path)!r} names no file; give a file name such as "
                            f"rollout.gif")
    if path.is_dir():
        raise XCompileError(f"GIF path {path} is a folder; give a file name such as "
                            f"{path / 'rollout.gif'}")
    if not folder.is_dir():
        raise XCompileError(f"cannot write the GIF {path}: the folder {folder} does not exist "
                            f"(create it first, or choose another path)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise XCompileError(f"cannot write the GIF {path}: the folder {folder} is not writable "
                            f"(choose another path)")
    return path


def rollout_gif(policy: BatchPolicy, robot: RobotTarget, path, seed: int = 0,
                every: int = 4, max_frames: int = 60, stream: str = "report",
                episode: int = 0) -> None:
    """Render episode `episode` of `stream` (seed `seed`; the episode `evaluate` runs as its
    episode `episode`) of `policy` to an animated GIF.

    The path is checked before simulating (`check_gif_path`) and the GIF is written atomically:
    a failure leaves no partial file."""
    path = check_gif_path(path)
    first = episode_seed(stream, seed, episode)   # refuses a bad stream or seed before simulating
    env = make_env(robot)
    try:
        obs, _ = env.reset(seed=first)
        frames = [frame(env)]
        t = 0
        begin_rollout(policy)
        while True:
            announce_rows(policy, [episode])
            obs, _, term, trunc, _ = env.step(_actions(policy, obs[None], robot)[0])
            t += 1
            if t % every == 0 and len(frames) < max_frames:
                frames.append(frame(env))
            if term or trunc:
                break
        write_gif(frames, path, fps=max(1, int(robot.control_hz / every)))
    finally:
        env.close()
