"""Model surgery for the passes that train a one-robot policy: reaching into `PinnedPolicy` and
`MLPPolicy` so that only part of a network trains (`split_for_tuning`), and an `MLPPolicy` whose
observation normalisation is set from data (`normalized_mlp`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from xcompile.errors import PassCheckError
from xcompile.models.fat import PinnedPolicy, split_obs
from xcompile.models.slim import MLPPolicy

Features = Callable[[torch.Tensor], torch.Tensor]


def split_for_tuning(module: nn.Module, trainable: str) -> tuple[Features, nn.Module]:
    """(features, tail) with tail(features(obs)) == module(obs); only `tail` trains.

    The tail shares its parameters with `module`, so training it tunes `module` in place.
    "all": features is the identity. "last": a PinnedPolicy's last transformer block, final norm
    and head; an MLPPolicy's last hidden layer and output layer."""
    if trainable == "all":
        return (lambda obs: obs), module
    if isinstance(module, PinnedPolicy):
        return _split_pinned(module)
    if isinstance(module, MLPPolicy):
        m = module
        k = max(0, len(m.net) - 3)

        def mlp_features(obs: torch.Tensor) -> torch.Tensor:
            if m.normalize:
                obs = (obs - m.obs_mean) / m.obs_std
            return m.net[:k](obs)

        return mlp_features, m.net[k:]
    raise PassCheckError(f"rl-finetune: trainable='last' does not know how to split a "
                         f"{type(module).__name__}; use trainable='all'")


def _split_pinned(m: PinnedPolicy) -> tuple[Features, nn.Module]:
    def features(obs: torch.Tensor) -> torch.Tensor:
        global_obs, joint_state = split_obs(obs, m.global_dim, m.n_joints)
        joints = torch.nn.functional.linear(joint_state, m.joint_weight) + m.joint_const
        x = torch.cat([m.global_encoder(global_obs).unsqueeze(1), joints], dim=1)
        for block in m.blocks[:-1]:
            x = block(x)
        # The tail's state skip needs each joint's raw state: carried as extra channels
        # (zeros on the global token) so features stay one tensor that can be cached.
        state = torch.cat([joint_state.new_zeros(x.shape[0], 1, joint_state.shape[-1]),
                           joint_state], dim=1)
        return torch.cat([x, state], dim=-1)

    class Tail(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block, self.ln_f, self.head, self.skip = m.blocks[-1], m.ln_f, m.head, m.skip
            self.d = m.joint_const.shape[-1]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, state = x[..., :self.d], x[:, 1:, self.d:]
            return (self.head(self.ln_f(self.block(h)[:, 1:])) + self.skip(state)).squeeze(-1)

    return features, Tail()


def normalized_mlp(obs_dim: int, n_act: int, hidden: list[int], activation: str,
                   obs: np.ndarray, min_std: float) -> MLPPolicy:
    """An MLPPolicy whose normalisation buffers hold the mean and std of `obs` (the std at least
    `min_std`, so a near-constant input is not amplified)."""
    mlp = MLPPolicy(obs_dim, hidden, n_act, activation, normalize=True)
    x = torch.as_tensor(obs)
    with torch.no_grad():
        mlp.obs_mean.copy_(x.mean(0))
        mlp.obs_std.copy_(x.std(0).clamp_min(min_std))
    return mlp
