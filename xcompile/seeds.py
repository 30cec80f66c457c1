"""Seed streams: every use of simulated episodes draws from its own stream, written down here.

A number that holds only on the episodes it was tuned on is not a result, so the episodes that
train, tune, check and report never overlap. Episode `i` of stream `name` in a build with seed
`seed` starts from

    episode_seed(name, seed, i) = STREAMS[name] * 2**52 + seed * 2**21 + i

(seed < 2**31, i < 2**21): distinct streams, seeds or episodes always give distinct integers, so
no two uses can meet, whatever the build seed. numpy and gymnasium take seeds of any size
(`np.random.SeedSequence`). Stream 0 is left unused: the episodes `0, 1, 2, …` that scripts seeded
before these streams existed (the sample fat policy's expert data among them) stay outside every
stream.
"""

from __future__ import annotations

from xcompile.errors import XCompileError

STREAMS: dict[str, int] = {
    # training data and training episodes
    "expert-data": 1,          # the sample fat policy's expert demonstrations
    "expert-tuning": 14,       # examples/tune_gaits.py's search over the experts' gait shapes
    "fat-dagger": 15,          # the sample fat policy's own DAgger rounds (and the test fixture's)
    "finetune-train": 2,       # rl-finetune's PPO episodes
    "gain-search": 16,         # rl-finetune's gain search (xcompile.passes.gain_search)
    "distill-search": 17,      # distill's gain search on the student
    "dagger": 3,               # distill's DAgger rounds
    "calibration": 4,          # quantize's int8 calibration episodes
    # checks a pass makes of its own result (each its own, so no pass tunes on another's)
    "finetune-keep": 5,        # rl-finetune's keep-better comparison
    "distill-heldout": 6,      # distill's held-out teacher-labelled states
    "distill-score": 7,        # distill's teacher/student scores (ladder choice)
    "distill-keep": 18,        # distill's keep-better comparison of the student's gains
    "quantize-check": 8,       # quantize's action-error check
    "quantize-choice": 9,      # quantize's closed-loop choice of what stays in float
    "pin-check": 10,           # pin-embodiment's closed-loop equality check
    "emit-c-check": 13,        # emit-c's comparison of C with onnxruntime
    # what people read
    "report": 11,              # a build's stage scores and `xcompile eval`
    "bench": 12,               # bench/ scripts
}
MAX_SEED = 2**31 - 1
MAX_EPISODES = 2**21


def episode_seed(stream: str, seed: int, i: int) -> int:
    """The seed of episode `i` of `stream` in a build seeded `seed`."""
    if stream not in STREAMS:
        raise XCompileError(f"unknown seed stream {stream!r}; streams: {', '.join(STREAMS)}")
    if not 0 <= seed <= MAX_SEED or not 0 <= i < MAX_EPISODES:
        raise XCompileError(f"seed {seed} / episode {i} out of range (seed 0..{MAX_SEED}, "
                            f"episode 0..{MAX_EPISODES - 1})")
    return (STREAMS[stream] << 52) + (seed << 21) + i
