"""The plain MLP policy over a robot's flat observation (what distill makes by default), and the
activations the students know.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU,
}


def layer_stack(widths: list[int], n_out: int, activation: str) -> nn.Sequential:
    """Linear + activation between consecutive `widths`, then a Linear to `n_out`."""
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
    layers.append(nn.Linear(widths[-1], n_out))
    return nn.Sequential(*layers)


def fold_standardization(w: Tensor, b: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """The Linear (w, b) after a standardisation (x - mean) / std, as one Linear:
    W' = W / std, b' = b - W' @ mean."""
    w_folded = w / std.unsqueeze(0)
    return w_folded, b - w_folded @ mean


class MLPPolicy(nn.Module):
    """Flat observation (B, obs_dim) -> action (B, n_actions) through a plain MLP.

    With `normalize=True` the input is standardised by the buffers `obs_mean` and `obs_std` before
    the first layer; `fold_normalization()` returns an equivalent MLP with the standardisation
    folded into the first Linear's weights and bias (W' = W / std, b' = b - W' @ mean), which is
    what gets exported.
    """

    def __init__(self, obs_dim: int, hidden: list[int] | tuple[int, ...], n_actions: int,
                 activation: str = "elu", normalize: bool = False) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
        if obs_dim < 1 or n_actions < 1 or any(int(h) < 1 for h in hidden):
            raise ValueError("obs_dim, n_actions and every hidden width must be >= 1")
        self.obs_dim = int(obs_dim)
        self.hidden = [int(h) for h in hidden]
        self.n_actions = int(n_actions)
        self.activation = activation
        self.normalize = bool(normalize)
        self.net = layer_stack([self.obs_dim, *self.hidden], self.n_actions, activation)
        if self.normalize:
            self.register_buffer("obs_mean", torch.zeros(self.obs_dim))
            self.register_buffer("obs_std", torch.ones(self.obs_dim))

    def forward(self, obs: Tensor) -> Tensor:
        if self.normalize:
            obs = (obs - self.obs_mean) / self.obs_std
        return self.net(obs)

    def spec(self) -> dict[str, Any]:
        return {"kind": "mlp", "obs_dim": self.obs_dim, "hidden": list(self.hidden),
                "n_actions": self.n_actions, "activation": self.activation,
                "normalize": self.normalize}

    def fold_normalization(self) -> MLPPolicy:
        """An equivalent MLP without the normalisation step (it lives in the first layer)."""
        out = MLPPolicy(self.obs_dim, self.hidden, self.n_actions, self.activation, False)
        state = {k: v.clone() for k, v in self.state_dict().items()
                 if k not in ("obs_mean", "obs_std")}
        if self.normalize:
            state["net.0.weight"], state["net.0.bias"] = fold_standardization(
                state["net.0.weight"], state["net.0.bias"], self.obs_mean, self.obs_std)
        out.load_state_dict(state)
        return out.train(self.training)
