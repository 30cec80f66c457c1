"""Sequences for checking a converted RAPTOR against the foundation-policy package, and the two
ways of running them with the GRU state carried from step to step.

Sequences are time-major, (steps, batch, 22), as the package's own example (`example/input` in
its checkpoint: 2 sequences of 500 steps). Used by tests/test_raptor.py and bench/raptor.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np


def package_checkpoint() -> Path:
    """foundation_policy/blob/checkpoint.h5 of the installed package (not imported)."""
    spec = importlib.util.find_spec("foundation_policy")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("foundation-policy is not installed: pip install foundation-policy")
    return Path(list(spec.submodule_search_locations)[0]) / "blob" / "checkpoint.h5"


def example_sequences(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The package's shipped example: inputs (500, 2, 22) and outputs (500, 2, 4), float32."""
    import h5py

    with h5py.File(path or package_checkpoint(), "r") as f:
        return (np.asarray(f["example"]["input"][()], np.float32),
                np.asarray(f["example"]["output"][()], np.float32))


def random_sequences(n: int, steps: int, seed: int) -> np.ndarray:
    """`n` sequences of `steps` observations, (steps, n, 22), from a seeded generator: each step
    drawn independently, on the scales of flight (unlike the package's example, whose inputs are
    standard normal throughout): position error N(0, 0.5 m), a uniformly random rotation matrix,
    linear velocity N(0, 1 m/s), body rates N(0, 2 rad/s), previous action U(-1, 1)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((steps, n, 4))
    w, x, y, z = np.moveaxis(q / np.linalg.norm(q, axis=-1, keepdims=True), -1, 0)
    rot = np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                    2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                    2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], axis=-1)
    obs = np.concatenate([0.5 * rng.standard_normal((steps, n, 3)), rot,
                          rng.standard_normal((steps, n, 3)), 2 * rng.standard_normal((steps, n, 3)),
                          rng.uniform(-1, 1, (steps, n, 4))], axis=-1)
    return obs.astype(np.float32)


def onnx_rollout(sess: Any, seqs: np.ndarray, h0: np.ndarray | None = None
                 ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run an onnxruntime session (obs, h_in -> action, h_out) over `seqs` step by step, h_out
    fed back as h_in (reset: zeros, or `h0`). Returns the actions (steps, batch, 4) and the
    state fed in at each step (what a batch-1 timing loop can replay)."""
    steps, batch, _ = seqs.shape
    width = next(i.shape[1] for i in sess.get_inputs() if i.name == "h_in")
    h = np.zeros((batch, width), np.float32) if h0 is None else h0
    actions, states = [], []
    for t in range(steps):
        states.append(h)
        a, h = sess.run(["action", "h_out"], {"obs": seqs[t], "h_in": h})
        actions.append(a)
    return np.stack(actions), states


def reference_rollout(seqs: np.ndarray) -> np.ndarray:
    """The package's own numpy implementation over `seqs`: reset, then one `evaluate_step` per
    step (its GRU keeps the state between calls), on float64 observations as its README's usage
    passes them (numpy then computes in float64 on the float32 weights). Returns the actions
    (steps, batch, 4) as float32."""
    from foundation_policy import Raptor  # loading it re-checks the package's example itself

    policy = Raptor()
    policy.reset()
    return np.stack([np.asarray(policy.evaluate_step(seqs[t].astype(np.float64)), np.float32)
                     for t in range(len(seqs))])
