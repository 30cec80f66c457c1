"""Weights-only torch policy files for one robot, and the small MLP policy that distillation makes.

A torch policy file is a `torch.save` of plain data and tensors only:

    {"format": "xcompile.torch-policy", "version": 1, "spec": {...}, "state_dict": {...}}

`spec["kind"]` says how to rebuild the module before its weights are loaded, so no code is ever
pickled and the file loads with `torch.load(weights_only=True)`:

    "pinned"  spec: config (a FatConfig as a dict), family, n_joints -> `PinnedPolicy`
    "mlp"     spec: obs_dim, hidden (list of widths), n_actions, activation, normalize -> `MLPPolicy`

Other spec keys (robot, joint_order, ...) are kept as they are: passes record the robot a policy was
made for there, and `xcompile.policy.load_policy` checks it. Writes go to a temporary file that is
renamed into place. Every way a file can be wrong becomes a `CheckpointError`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from xcompile.errors import CheckpointError

FORMAT = "xcompile.torch-policy"
VERSION = 1
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU,
}


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
        widths = [self.obs_dim, *self.hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(widths[-1], self.n_actions))
        self.net = nn.Sequential(*layers)
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
            w, b = state["net.0.weight"], state["net.0.bias"]
            w_folded = w / self.obs_std.unsqueeze(0)
            state["net.0.weight"] = w_folded
            state["net.0.bias"] = b - w_folded @ self.obs_mean
        out.load_state_dict(state)
        return out.train(self.training)


def spec_of(module: nn.Module) -> dict[str, Any]:
    """The rebuild spec of a module this file format knows (PinnedPolicy or MLPPolicy)."""
    from xcompile.models.fat import PinnedPolicy

    if isinstance(module, MLPPolicy):
        return module.spec()
    if isinstance(module, PinnedPolicy):
        return {"kind": "pinned", "config": module.fat_config.model_dump(), "family": module.family,
                "n_joints": module.n_joints}
    raise CheckpointError(f"cannot save a {type(module).__name__}: only PinnedPolicy and "
                          "MLPPolicy have a torch-policy spec")


def save_torch_policy(path: str | os.PathLike[str], module: nn.Module,
                      spec: dict[str, Any]) -> Path:
    """Write `module`'s weights and its rebuild `spec` to `path` atomically."""
    path = Path(path)
    if spec.get("kind") not in ("pinned", "mlp"):
        raise CheckpointError(f"spec kind must be 'pinned' or 'mlp', got {spec.get('kind')!r}")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to save a policy with NaN or Inf weights in {bad[:5]}")
    payload = {"format": FORMAT, "version": VERSION, "spec": dict(spec), "state_dict": state}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_torch_policy(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated payload of a torch policy file (spec and state dict), without building it."""
    from xcompile.models.checkpoint import _read_torch  # the one safe .pt reader (static scan)

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"torch policy {str(path)!r} does not exist (or is not a file)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"torch policy {str(path)!r} is empty (0 bytes); save it again")
    payload = _read_torch(path)  # torch.load(weights_only=True) after a static globals scan
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an xcompile torch policy (format tag "
                              f"{payload.get('format')!r}, expected {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{str(path)!r} has torch-policy version {payload.get('version')!r};"
                              f" this xcompile reads version {VERSION}")
    spec, state = payload.get("spec"), payload.get("state_dict")
    if not isinstance(spec, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} lacks a 'spec' dict or a 'state_dict'; save it again")
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r}: 'state_dict' must map names to tensors")
    return payload


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """An empty module of the shapes `spec` describes."""
    from xcompile.models.fat import FatConfig, PinnedPolicy

    kind = spec.get("kind")
    try:
        if kind == "pinned":
            config = FatConfig.model_validate(spec["config"])
            return PinnedPolicy.empty(config, str(spec["family"]), int(spec["n_joints"]))
        if kind == "mlp":
            return MLPPolicy(int(spec["obs_dim"]), [int(h) for h in spec["hidden"]],
                             int(spec["n_actions"]), str(spec.get("activation", "elu")),
                             bool(spec.get("normalize", False)))
    except (KeyError, TypeError, ValueError, ValidationError) as e:
        raise CheckpointError(f"torch policy spec of kind {kind!r} is invalid: {e}") from e
    raise CheckpointError(f"unknown torch policy kind {kind!r}; expected 'pinned' or 'mlp'")


def load_torch_policy(path: str | os.PathLike[str]) -> nn.Module:
    """Load a torch policy file; the module comes back in eval mode on the CPU."""
    payload = read_torch_policy(path)
    module = build_from_spec(payload["spec"])
    try:
        module.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{str(path)!r}: the weights do not fit the spec ({first}); the "
                              "file is corrupt or was edited by hand") from e
    return module.eval()
