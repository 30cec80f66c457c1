"""Closed-loop evaluation split into tasks, on any executor, with the same scores on every one.

`evaluate_file` scores a policy file on a robot like `xcompile.evaluate.score_policy` (torch on one
thread, the episodes of a seed stream), but cuts the episodes into consecutive groups of `chunk`
(default 10, the lock-step width of `evaluate`) and hands each group to a worker as a task:

    (policy reference, first episode, episode count, seed, stream)

Episode i is always `xcompile.seeds.episode_seed(stream, seed, i)` and always runs in the group
`i // chunk` (in lock-step batches of up to 10, as `evaluate` runs them), batched with the same
other episodes, so the per-episode scores (and returns, falls, observations) are identical whatever
the executor and however many workers run the groups. With a chunk that is a multiple of 10 (the
default) they are also identical to `score_policy`'s (the build report's). Only the chunk changes
the batches the policy is called on, and a batched network's rows can differ in their last bits
with the batch (the sample fat policy's do), so another `chunk` may move a score slightly.

A task carries no torch module and no closure: a `PolicyRef` is the policy file's absolute path
and the robot target as JSON. The worker validates the robot again (`check_robot_urdf`, the one gate
to PyBullet), loads the file with `xcompile.policy.load_policy` (which treats it as untrusted) and
keeps it for the next task on the same file (keyed by path, size and mtime).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xcompile.errors import XCompileError
from xcompile.evaluate import EvalResult, score_policy
from xcompile.executors.factory import make_executor
from xcompile.executors.pools import Executor
from xcompile.policy import LoadedPolicy, load_policy
from xcompile.seeds import MAX_EPISODES, episode_seed
from xcompile.targets import RobotTarget, check_robot_urdf

DEFAULT_CHUNK = 10          # evaluate()'s lock-step width: the same batches as score_policy
_LOADED: dict[tuple[Any, ...], LoadedPolicy] = {}
_MAX_LOADED = 8


@dataclass(frozen=True)
class PolicyRef:
    """A policy a worker can load itself: an absolute file path and the robot as JSON."""

    path: str
    robot_json: str

    @classmethod
    def of(cls, path: str | os.PathLike[str], robot: RobotTarget) -> PolicyRef:
        return cls(os.path.abspath(path), robot.model_dump_json())

    def robot(self) -> RobotTarget:
        robot = RobotTarget.model_validate_json(self.robot_json)
        check_robot_urdf(robot)
        return robot

    def load(self) -> tuple[LoadedPolicy, RobotTarget]:
        """The loaded policy (cached in this process) and its robot."""
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int] = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = (-1, -1)            # load_policy says what is wrong with the path
        key = (self.path, *stamp, hashlib.sha256(self.robot_json.encode()).hexdigest())
        robot = self.robot()
        if key not in _LOADED:
            while len(_LOADED) >= _MAX_LOADED:
                _LOADED.pop(next(iter(_LOADED)))
            _LOADED[key] = load_policy(self.path, robot)
        return _LOADED[key], robot


@dataclass(frozen=True)
class EpisodeChunk:
    """One task: episodes first .. first+count-1 of `stream` (seed `seed`) of `ref`'s policy."""

    ref: PolicyRef
    first: int
    count: int
    seed: int
    stream: str
    record_obs: bool = False


def run_chunk(task: EpisodeChunk) -> EvalResult:
    """Run one chunk (in whatever process the executor chose)."""
    loaded, robot = task.ref.load()
    return score_policy(loaded.act, robot, task.count, task.seed, stream=task.stream,
                        first_episode=task.first, record_obs=task.record_obs)


def merge_results(parts: list[EvalResult], robot: str, seed: int, stream: str) -> EvalResult:
    """One EvalResult from consecutive chunks, in episode order."""
    res = EvalResult(robot=robot, seed=seed, scores=[], stream=stream)
    for p in parts:
        res.scores += p.scores
        res.returns += p.returns
        res.falls += p.falls
        res.invalid_actions += p.invalid_actions
        res.steps += p.steps
        res.nonfinite_action_episodes += p.nonfinite_action_episodes
        res.observations += p.observations
        res.metrics += p.metrics
    return res


def chunks(ref: PolicyRef, episodes: int, seed: int, stream: str, chunk: int,
           record_obs: bool = False) -> list[EpisodeChunk]:
    if not 1 <= episodes <= MAX_EPISODES:
        raise XCompileError(f"episodes must be from 1 to {MAX_EPISODES}, got {episodes}")
    if chunk < 1:
        raise XCompileError(f"chunk must be at least 1 episode, got {chunk}")
    episode_seed(stream, seed, episodes - 1)        # a bad stream or seed: refused here
    return [EpisodeChunk(ref, s, min(chunk, episodes - s), seed, stream, record_obs)
            for s in range(0, episodes, chunk)]


def evaluate_file(path: str | os.PathLike[str], robot: RobotTarget, episodes: int = 20,
                  seed: int = 0, stream: str = "report", *,
                  executor: str | Executor = "serial", workers: int | None = None,
                  ray_address: str | None = None, chunk: int = DEFAULT_CHUNK,
                  record_obs: bool = False,
                  on_episodes: Callable[[int], None] | None = None) -> EvalResult:
    """Closed-loop score of the policy file at `path` on `robot` over `episodes` episodes of
    `stream`, run in chunks of `chunk` episodes on `executor` (a name from
    `xcompile.executors.EXECUTORS`, made here and closed again, or an open Executor, kept open).
    `on_episodes(n)` is called as each chunk of n episodes finishes."""
    if not Path(path).exists():
        raise XCompileError(f"{path}: no such file")
    tasks = chunks(PolicyRef.of(path, robot), episodes, seed, stream, chunk, record_obs)
    own = isinstance(executor, str)
    ex = make_executor(executor, workers, ray_address) if isinstance(executor, str) else executor
    try:
        parts = ex.map(run_chunk, tasks, stateful=True,
                       on_done=(lambda i, r: on_episodes(tasks[i].count)) if on_episodes
                       else None)
    finally:
        if own:
            ex.close()
    return merge_results(parts, robot.name, seed, stream)
