"""Random observations shaped like the simulator's, for checks and latency measurements.

Each named slice of the flat observation (`env.obs_layout`) gets about the spread the simulator
gives it, so float comparisons and timings see realistic magnitudes.
"""

from __future__ import annotations

import numpy as np

from xcompile.sim.env import obs_layout
from xcompile.targets import RobotTarget

# Spread and offset of each observation slice, by its name in obs_layout (others: spread 0.5).
_OBS_SCALE = {"gravity_b": 0.3, "lin_vel_b": 0.4, "ang_vel_b_x0.25": 0.3, "cmd_vx_vy_yaw": 0.4,
              "gait_sin_cos": 0.7, "goal_minus_ee_b": 0.2, "ee_b": 0.4, "goal_b": 0.4,
              "q_minus_default": 0.3, "qdot_x0.1": 0.3, "last_action": 1.0}
_OBS_OFFSET = {"gravity_b": (0.0, 0.0, -1.0)}


def random_obs(robot: RobotTarget, n: int, seed: int = 0) -> np.ndarray:
    """`n` random float32 observations for `robot`, each slice scaled like real ones."""
    rng = np.random.default_rng(seed)
    parts = []
    for name, width in obs_layout(robot):
        scale = _OBS_SCALE.get(name, 0.5)
        offset = np.asarray(_OBS_OFFSET.get(name, (0.0,) * width), dtype=np.float64)
        parts.append(offset + scale * rng.standard_normal((n, width)))
    return np.concatenate(parts, axis=1).astype(np.float32)
