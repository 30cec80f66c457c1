"""`LockstepEnvs` with its simulators in worker processes: PPO's environment stepping on several cores.

Same API and same results as `xcompile.sim.vec.LockstepEnvs` (the same `VecStep` for the same
actions, bit for bit): each of `workers` spawned processes owns a contiguous slice of the `n`
envs (each its own PyBullet client); per step this process sends each worker its slice of the
actions and gets back (obs, reward, terminated, truncated, score) per env. Episode seeds stay
global: a worker never picks one. When envs end, this process numbers the new episodes in env
order (episode k over all envs, in the order they start, is `episode_seed(stream, seed, k)`, as in
`LockstepEnvs`) and sends each worker the seeds of its envs to reset, a second round trip only on
steps where an episode ended (SAME_STEP autoreset: the `VecStep` carries the new episode's first
observation and the old one's last in `final_obs`).

Why not gymnasium's AsyncVectorEnv: it runs one process per env (8 PyBullet processes on 2 cores
for the default 8 envs, where a slice per core is what pays), and its autoreset draws the next
episode inside the env's own process, so the global episode numbering would need its reset mask
mode and a wrapper around every env anyway. This is the same Pipe pattern in ~150 lines.

The robot travels as JSON and is validated again in the worker (`check_robot_urdf`, the one gate
to PyBullet); nothing else is pickled but actions and observations.
"""

from __future__ import annotations

import math
import multiprocessing
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from xcompile.errors import XCompileError
from xcompile.seeds import episode_seed
from xcompile.sim.env import Faults, RobotEnv, make_env
from xcompile.sim.fault_suite import FaultsArg, episode_options, fixed_faults
from xcompile.sim.vec import VecStep, obs_dim_of
from xcompile.targets import RobotTarget, check_robot_urdf

_JOIN_S = 5.0


def _worker(conn: Connection, robot_json: str, faults: dict[str, Any] | None, count: int) -> None:
    """One worker: `count` envs, stepped on ("step", actions), reset on ("reset", [(k, seed, opts)])."""
    envs: list[RobotEnv] = []
    try:
        robot = RobotTarget.model_validate_json(robot_json)
        check_robot_urdf(robot)
        envs = [make_env(robot, faults=Faults(**faults) if faults else None)
                for _ in range(count)]
        conn.send(("ok", obs_dim_of(envs[0])))
        while True:
            cmd, arg = conn.recv()
            if cmd == "close":
                break
            if cmd == "reset":
                conn.send(("ok", [envs[k].reset(seed=s, options=o)[0] for k, s, o in arg]))
                continue
            out = []
            for k, env in enumerate(envs):
                o, r, te, tr, info = env.step(arg[k])
                score = float(info["score"]) if te or tr else math.nan
                out.append((o, r, bool(te), bool(tr), score))
            conn.send(("ok", out))
    except (EOFError, KeyboardInterrupt):
        pass                        # the main process went away, or Ctrl-C reached us too
    except Exception as e:          # noqa: BLE001 (sent to the main process, which raises it)
        first = (str(e).strip().splitlines() or [repr(e)])[0]
        try:
            conn.send(("error", f"{type(e).__name__}: {first}"))
        except OSError:
            pass
    finally:
        for env in envs:
            env.close()
        conn.close()


class ProcessVecEnvs:
    """`LockstepEnvs(robot, n, seed, faults, stream=...)` over `workers` processes."""

    def __init__(self, robot: RobotTarget, n: int, seed: int, faults: FaultsArg = None, *,
                 stream: str, workers: int = 2):
        if n < 1:
            raise ValueError("ProcessVecEnvs needs n >= 1")
        episode_seed(stream, seed, 0)     # refuses an unknown stream or a bad seed up front
        self.robot, self.stream, self.seed, self.n = robot, stream, seed, n
        self.episodes_started = 0
        self.faults = faults
        self._ret = np.zeros(n)
        parts = np.array_split(np.arange(n), max(1, min(workers, n)))
        self.slices = [(int(p[0]), int(p[-1]) + 1) for p in parts]
        mp = multiprocessing.get_context("spawn")   # PyBullet/torch threads do not survive fork
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        try:
            for a, b in self.slices:
                parent, child = mp.Pipe()
                p = mp.Process(target=_worker, daemon=True, name=f"xcompile-env-{a}-{b}",
                               args=(child, robot.model_dump_json(),
                                     asdict(fixed) if (fixed := fixed_faults(faults)) else None,
                                     b - a))
                p.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(p)
            dims = [self._recv(i) for i in range(len(self._conns))]
        except BaseException:
            self.close()
            raise
        self.obs = np.zeros((n, dims[0]), dtype=np.float32)

    @property
    def workers(self) -> int:
        return len(self.slices)

    def __enter__(self) -> ProcessVecEnvs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self, i: int) -> Any:
        try:
            status, payload = self._conns[i].recv()
        except (EOFError, OSError):
            raise XCompileError(f"a simulator worker process ({self._procs[i].name}) died; "
                                "run without --executor process to see why") from None
        if status != "ok":
            raise XCompileError(f"a simulator worker process failed: {payload}")
        return payload

    def _reset_envs(self, ks: list[int]) -> None:
        """Start the next episodes on envs `ks` (ascending: the global episode order)."""
        todo: dict[int, list[tuple[int, int]]] = {}
        for k in ks:
            w = next(i for i, (a, b) in enumerate(self.slices) if a <= k < b)
            i = self.episodes_started
            self.episodes_started += 1
            self._ret[k] = 0.0
            todo.setdefault(w, []).append((k - self.slices[w][0],
                                           episode_seed(self.stream, self.seed, i),
                                           episode_options(self.faults, i)))
        for w, items in todo.items():
            self._conns[w].send(("reset", items))
        for w, items in todo.items():
            for (local, _, _), o in zip(items, self._recv(w)):
                self.obs[self.slices[w][0] + local] = o

    def reset(self) -> np.ndarray:
        self._reset_envs(list(range(self.n)))
        return self.obs.copy()

    def step(self, actions: np.ndarray) -> VecStep:
        v = VecStep.blank(self.obs)
        for conn, (a, b) in zip(self._conns, self.slices):
            conn.send(("step", actions[a:b]))
        ended: list[int] = []
        for w, (a, _) in enumerate(self.slices):
            for j, (o, r, te, tr, sc) in enumerate(self._recv(w)):
                k = a + j
                v.reward[k], v.terminated[k], v.truncated[k] = r, te, tr
                self._ret[k] += r
                v.final_obs[k] = o
                self.obs[k] = o
                if te or tr:
                    v.score[k], v.ret[k] = sc, self._ret[k]
                    ended.append(k)
        if ended:
            self._reset_envs(ended)
        v.obs = self.obs.copy()
        return v

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(("close", None))
            except OSError:
                pass
        for p in self._procs:
            p.join(_JOIN_S)
            if p.is_alive():
                p.terminate()
                p.join(_JOIN_S)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []
