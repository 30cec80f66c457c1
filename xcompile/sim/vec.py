"""Several RobotEnvs stepped in lock-step, for training loops that need rewards step by step.

One process, no subprocesses (the policy's batched forward pass is where batching pays);
`xcompile.sim.procvec.ProcessVecEnvs` is the same, VecStep for VecStep, with the envs in worker
processes (what rl-finetune uses under a pool executor). An env whose episode ends is reset in
the same step with the next unused seed (gymnasium's SAME_STEP autoreset), and its last
observation is returned in `final_obs` so a learner can bootstrap a truncated episode. Episode k
(counting over all envs, in the order they start) starts from
`xcompile.seeds.episode_seed(stream, seed, k)`, so a run is reproducible and its episodes are
none that another use (a check, the report) runs on.

`xcompile.evaluate.evaluate` is the scoring loop; this is the training one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xcompile.seeds import episode_seed
from xcompile.sim.env import RobotEnv, make_env
from xcompile.sim.fault_suite import FaultsArg, episode_options, fixed_faults
from xcompile.targets import RobotTarget


@dataclass
class VecStep:
    obs: np.ndarray          # (n, obs_dim) observation to act on next (after any reset)
    reward: np.ndarray       # (n,) float
    terminated: np.ndarray   # (n,) bool
    truncated: np.ndarray    # (n,) bool
    final_obs: np.ndarray    # (n, obs_dim) last observation of an episode that ended, else obs
    score: np.ndarray        # (n,) info["score"] of an episode that ended, else NaN
    ret: np.ndarray          # (n,) undiscounted return of an episode that ended, else NaN

    @classmethod
    def blank(cls, obs: np.ndarray) -> VecStep:
        """A step of len(obs) envs to fill in: no reward, nothing ended (score, ret NaN)."""
        n = len(obs)
        return cls(obs, np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool),
                   np.empty_like(obs), np.full(n, np.nan), np.full(n, np.nan))


class LockstepEnvs:
    def __init__(self, robot: RobotTarget, n: int, seed: int, faults: FaultsArg = None, *,
                 stream: str):
        if n < 1:
            raise ValueError("LockstepEnvs needs n >= 1")
        episode_seed(stream, seed, 0)     # refuses an unknown stream or a bad seed up front
        self.robot = robot
        self.stream = stream
        self.seed = seed
        self.faults = faults
        self.envs = [make_env(robot, faults=fixed_faults(faults)) for _ in range(n)]
        self.episodes_started = 0
        self._ret = np.zeros(n)
        self.obs = np.zeros((n, obs_dim_of(self.envs[0])), dtype=np.float32)

    def __enter__(self) -> LockstepEnvs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reset_one(self, k: int) -> np.ndarray:
        i = self.episodes_started
        obs, _ = self.envs[k].reset(seed=episode_seed(self.stream, self.seed, i),
                                    options=episode_options(self.faults, i))
        self.episodes_started += 1
        self._ret[k] = 0.0
        return obs

    def reset(self) -> np.ndarray:
        for k in range(len(self.envs)):
            self.obs[k] = self._reset_one(k)
        return self.obs.copy()

    def step(self, actions: np.ndarray) -> VecStep:
        v = VecStep.blank(self.obs)
        for k, env in enumerate(self.envs):
            o, r, te, tr, info = env.step(actions[k])
            v.reward[k], v.terminated[k], v.truncated[k] = r, te, tr
            self._ret[k] += r
            v.final_obs[k] = o
            if te or tr:
                v.score[k], v.ret[k] = float(info["score"]), self._ret[k]
                o = self._reset_one(k)
            self.obs[k] = o
        v.obs = self.obs.copy()
        return v

    def close(self) -> None:
        for e in self.envs:
            e.close()


def obs_dim_of(env: RobotEnv) -> int:
    shape = env.observation_space.shape
    assert shape is not None
    return int(shape[0])
