"""Students that keep state from one control step to the next: what distill makes of a teacher
whose actions depend on its history (a recurrent fat policy) when one observation is not enough.

Both take the observation and their state and return the action and the next state, the form a
recurrent ONNX policy has (`xcompile.onnx.recurrent`: state inputs and outputs, reset to zeros at
the start of every episode), so export-onnx, quantize, `xcompile eval` and the runtime loader carry
their state as they carry a foreign GRU's:

    "history_mlp"  `HistoryMLP`: an MLP over the last `history` observations, newest first; the
                   state is the `history - 1` observations before this one (zeros before the
                   episode began). The window is a fixed, short memory: exact for a teacher whose
                   memory is shorter, and trained like a feed-forward MLP on windows of the data.
    "gru"          `GRUStudent`: Linear -> activation -> GRU (width `hidden[0]`) -> an MLP head
                   over `hidden[1:]`; the state is the GRU's hidden vector. Unbounded memory,
                   trained by truncated back-propagation through time over whole episodes.

Both standardise the observation with buffers (`obs_mean`, `obs_std`) when `normalize`, and
`fold_normalization()` moves that into their first Linear, as `MLPPolicy` does.
`sequence_actions` runs either (or a feed-forward module) over whole episodes from their reset
state: the student's actions on recorded data, for fitting and for the held-out action error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from xcompile.models.mlp import ACTIVATIONS, MLPPolicy, fold_standardization, layer_stack
from xcompile.onnx.recurrent import StateSpec


class HistoryMLP(nn.Module):
    """(obs (B, obs_dim), hist (B, (history-1) * obs_dim)) -> (action, next hist)."""

    kind = "history_mlp"

    def __init__(self, obs_dim: int, hidden: Sequence[int], n_actions: int,
                 activation: str = "elu", history: int = 4, normalize: bool = False) -> None:
        super().__init__()
        if history < 2:
            raise ValueError("a history MLP looks at 2 or more observations")
        self.obs_dim, self.history = int(obs_dim), int(history)
        self.mlp = MLPPolicy(self.obs_dim * self.history, hidden, n_actions, activation,
                             normalize)
        self.hidden, self.n_actions = self.mlp.hidden, self.mlp.n_actions
        self.activation, self.normalize = activation, self.mlp.normalize

    def states(self) -> list[StateSpec]:
        return [StateSpec("hist_in", "hist_out", ((self.history - 1) * self.obs_dim,))]

    def forward(self, obs: Tensor, hist: Tensor) -> tuple[Tensor, Tensor]:
        window = torch.cat([obs, hist], dim=1)                 # newest first
        return self.mlp(window), window[:, :-self.obs_dim]     # the oldest one drops out

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "obs_dim": self.obs_dim, "history": self.history,
                "hidden": list(self.hidden), "n_actions": self.n_actions,
                "activation": self.activation, "normalize": self.normalize}

    def fold_normalization(self) -> HistoryMLP:
        out = HistoryMLP(self.obs_dim, self.hidden, self.n_actions, self.activation,
                         self.history, False)
        out.mlp = self.mlp.fold_normalization()
        return out.train(self.training)


class GRUStudent(nn.Module):
    """(obs (B, obs_dim), h (B, hidden[0])) -> (action, next h)."""

    kind = "gru"

    def __init__(self, obs_dim: int, hidden: Sequence[int], n_actions: int,
                 activation: str = "elu", normalize: bool = False) -> None:
        super().__init__()
        if activation not in ACTIVATIONS or not hidden or any(int(h) < 1 for h in hidden):
            raise ValueError("a GRU student needs a known activation and hidden widths >= 1")
        self.obs_dim, self.hidden, self.n_actions = int(obs_dim), [int(h) for h in hidden], \
            int(n_actions)
        self.activation, self.normalize = activation, bool(normalize)
        d = self.hidden[0]
        self.encoder = nn.Linear(self.obs_dim, d)
        self.act = ACTIVATIONS[activation]()
        self.rnn = nn.GRU(d, d, batch_first=True)    # PyTorch's GRU; gates r, z, n
        self.head = layer_stack([d, *self.hidden[1:]], self.n_actions, activation)
        if self.normalize:
            self.register_buffer("obs_mean", torch.zeros(self.obs_dim))
            self.register_buffer("obs_std", torch.ones(self.obs_dim))

    def states(self) -> list[StateSpec]:
        return [StateSpec("h_in", "h_out", (self.hidden[0],))]

    def _features(self, obs: Tensor) -> Tensor:
        if self.normalize:
            obs = (obs - self.obs_mean) / self.obs_std
        return self.act(self.encoder(obs))

    def forward(self, obs: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        # One step of the GRU written out, so that the exported graph is plain
        # MatMul/Add/Slice/Sigmoid/Tanh at any opset: what quantize and the loaders know
        g, d = self.rnn, self.hidden[0]
        gi = nn.functional.linear(self._features(obs), g.weight_ih_l0, g.bias_ih_l0)
        gh = nn.functional.linear(h, g.weight_hh_l0, g.bias_hh_l0)
        r = torch.sigmoid(gi[:, :d] + gh[:, :d])
        z = torch.sigmoid(gi[:, d:2 * d] + gh[:, d:2 * d])
        n = torch.tanh(gi[:, 2 * d:] + r * gh[:, 2 * d:])
        h = (1 - z) * n + z * h
        return self.head(h), h

    def sequence(self, obs: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Steps of `forward` over (B, T, obs_dim) from the state h (B, d), in one nn.GRU call
        (training's fast path): actions (B, T, n_actions) and the last state."""
        out, h_last = self.rnn(self._features(obs), h.unsqueeze(0))
        return self.head(out), h_last.squeeze(0)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "obs_dim": self.obs_dim, "hidden": list(self.hidden),
                "n_actions": self.n_actions, "activation": self.activation,
                "normalize": self.normalize}

    def fold_normalization(self) -> GRUStudent:
        out = GRUStudent(self.obs_dim, self.hidden, self.n_actions, self.activation, False)
        state = {k: v.clone() for k, v in self.state_dict().items()
                 if k not in ("obs_mean", "obs_std")}
        if self.normalize:
            state["encoder.weight"], state["encoder.bias"] = fold_standardization(
                state["encoder.weight"], state["encoder.bias"], self.obs_mean, self.obs_std)
        out.load_state_dict(state)
        return out.train(self.training)


def is_recurrent(module: Any) -> bool:
    """Whether `module` keeps state between calls (it says which: `states()`)."""
    return callable(getattr(module, "states", None))


def reset_states(module: nn.Module, batch: int) -> list[Tensor]:
    """Every state of a recurrent module at the start of `batch` episodes."""
    return [torch.as_tensor(np.broadcast_to(s.reset_value(), (batch, *s.shape)).copy())
            for s in module.states()]


def windows(episodes: Sequence[np.ndarray], history: int) -> np.ndarray:
    """Per step of every episode, the last `history` observations, newest first, zeros before
    the episode began: what a `HistoryMLP`'s inner MLP sees. (sum of steps, history * obs_dim)"""
    out = []
    for x in episodes:
        pad = np.concatenate([np.zeros((history - 1, x.shape[1]), x.dtype), x])
        out.append(np.concatenate([pad[history - 1 - k: len(pad) - k] for k in range(history)],
                                  axis=1))
    return np.concatenate(out)


def sequence_actions(module: nn.Module, episodes: Sequence[Tensor]) -> list[Tensor]:
    """`module`'s actions over each episode (a (steps, obs_dim) tensor), its state from the reset
    value on. Episodes run side by side, the shorter ones padded at their end."""
    if not is_recurrent(module):
        return [module(x) for x in episodes]
    if isinstance(module, HistoryMLP):
        win = torch.as_tensor(windows([x.detach().numpy() for x in episodes], module.history))
        acts = module.mlp(win)
        return list(torch.split(acts, [len(x) for x in episodes]))
    lengths = [len(x) for x in episodes]
    xs = nn.utils.rnn.pad_sequence(list(episodes), batch_first=True)
    (h,) = reset_states(module, len(episodes))
    acts, _ = module.sequence(xs, h)
    return [acts[i, :n] for i, n in enumerate(lengths)]
