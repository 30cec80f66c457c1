"""DAgger's data collection for distill, cut into episode chunks on the build's executor.

A round's episodes run in consecutive chunks of `CHUNK` (10, the lock-step width of
`xcompile.evaluate.evaluate`), each a task of the current executor (`use_executor`; in this process
when none is set): in this process, a local process pool or Ray actors. A task carries no torch
module: the teacher is its artifact's file and the student is saved to a temporary file per round
(`save_torch_policy`), both as `PolicyRef`s that the worker loads itself (`load_policy`, the
checked loader) and keeps for the next task on the same file.

All randomness is per episode: episode i of `stream` draws the teacher's DART noise (round 0) or
its β-mixing coin flips (rounds >= 1) from its own generator, seeded from
`(episode_seed(stream, seed, i), MIX_KEY)` (so it is not the env's own random stream). An episode
always runs in chunk i // CHUNK, batched with the same other episodes, so the visited
observations, the teacher's labels and the scores are the same, bit for bit, on every executor and
worker count. The data come back per episode, in episode order.

A stateful teacher or student (a recurrent policy: `xcompile.evaluate`'s protocol) starts every
chunk from its reset state and is told, before each call, which episode each row continues; the
teacher labels every step of every episode, whoever acts, so its state follows the episode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xcompile.evaluate import announce_rows, begin_rollout, score_policy
from xcompile.executors.factory import current_executor
from xcompile.executors.pools import Executor, SerialExecutor
from xcompile.executors.rollouts import DEFAULT_CHUNK, PolicyRef
from xcompile.seeds import episode_seed
from xcompile.sim.fault_suite import FaultSchedule

CHUNK = DEFAULT_CHUNK
MIX_KEY = 0xDA66E          # second entropy word of an episode's mixing generator


@dataclass(frozen=True)
class CollectChunk:
    """One task: episodes first .. first+count-1 of `stream`, driven by the student (the teacher
    with probability `beta` per step) or, with no student, by the teacher plus N(0, noise_std)."""

    teacher: PolicyRef
    student: PolicyRef | None
    beta: float
    noise_std: float
    seed: int
    stream: str
    first: int
    count: int
    faults: FaultSchedule | None = None     # a robust build's episodes' faults


@dataclass
class Collected:
    obs: list[np.ndarray]       # per episode: (steps, obs_dim) float32, in episode order
    labels: list[np.ndarray]    # per episode: (steps, n_joints) float32, the teacher's actions
    scores: list[float]


def episode_rng(stream: str, seed: int, i: int) -> np.random.Generator:
    """The generator of episode i's teacher noise or β-mixing coin flips."""
    return np.random.default_rng([episode_seed(stream, seed, i), MIX_KEY])


def run_collect_chunk(task: CollectChunk) -> Collected:
    """Run one chunk (in whatever process the executor chose)."""
    teacher, robot = task.teacher.load()
    student = task.student.load()[0].act if task.student is not None else None
    rngs = [episode_rng(task.stream, task.seed, task.first + i) for i in range(task.count)]
    xs: list[list[np.ndarray]] = [[] for _ in range(task.count)]
    ys: list[list[np.ndarray]] = [[] for _ in range(task.count)]
    rows: list[int] = []
    for policy in (teacher.act, student):
        if policy is not None:
            begin_rollout(policy)

    def set_rows(episodes: list[int]) -> None:
        rows[:] = episodes
        for policy in (teacher.act, student):
            if policy is not None:
                announce_rows(policy, episodes)

    def act(obs: np.ndarray) -> np.ndarray:
        label = np.asarray(teacher.act(obs), dtype=np.float32)
        mine = None if student is None else np.asarray(student(obs), dtype=np.float32)
        out = label.copy()
        for r, i in enumerate(rows):
            xs[i].append(np.array(obs[r], dtype=np.float32))
            ys[i].append(label[r].copy())
            if mine is None:
                noise = rngs[i].standard_normal(label.shape[1]).astype(np.float32)
                out[r] = label[r] + task.noise_std * noise
            elif not rngs[i].random() < task.beta:
                out[r] = mine[r]
        return out

    res = score_policy(act, robot, task.count, task.seed, stream=task.stream,
                       first_episode=task.first, on_rows=set_rows, faults=task.faults)
    return Collected([np.stack(x) for x in xs], [np.stack(y) for y in ys], res.scores)


def collect(teacher: PolicyRef, student: PolicyRef | None, beta: float, noise_std: float,
            seed: int, episodes: int, stream: str, first_episode: int = 0,
            executor: Executor | None = None, faults: FaultSchedule | None = None) -> Collected:
    """Episodes first_episode .. +episodes-1 of `stream` on `executor` (default: the current
    one): the visited observations and the teacher's labels per episode, and the scores."""
    ex = executor or current_executor()
    if isinstance(ex, str):
        ex = SerialExecutor()
    tasks = [CollectChunk(teacher, student, beta, noise_std, seed, stream, first_episode + s,
                          min(CHUNK, episodes - s), faults) for s in range(0, episodes, CHUNK)]
    parts = ex.map(run_collect_chunk, tasks, stateful=True)
    return Collected([o for p in parts for o in p.obs], [y for p in parts for y in p.labels],
                     [s for p in parts for s in p.scores])
