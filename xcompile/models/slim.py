"""Weights-only torch policy files for one robot, and the small MLP policy that distillation makes.

A torch policy file is a `torch.save` of plain data and tensors only:

    {"format": "xcompile.torch-policy", "version": 1, "spec": {...}, "state_dict": {...}}

`spec["kind"]` says how to rebuild the module before its weights are loaded, so no code is ever
pickled and the file loads with `torch.load(weights_only=True)`:

    "pinned"  spec: config (a FatConfig as a dict), family, n_joints -> `PinnedPolicy`
    "mlp"     spec: obs_dim, hidden (list of widths), n_actions, activation, normalize -> `MLPPolicy`
    "history_mlp"  the same and history (observations it sees) -> `recurrent.HistoryMLP`
    "gru"     the mlp spec's keys (hidden[0]: the GRU cell's width) -> `recurrent.GRUStudent`

Other spec keys (robot, joint_order, ...) are kept as they are: passes record the robot a policy was
made for there, and `xcompile.policy.load_policy` checks it.

The file is input from strangers, read as a checkpoint is (`files.py`: no code runs, no zip bomb,
a bounded pickle). Before anything is built its spec is checked strictly (ints are ints, every size
within a named limit of `fat.py`: MAX_JOINTS, MAX_OBS_DIM, MAX_MLP_WIDTH, MAX_MLP_LAYERS, the
config limits, MAX_PARAMS), the weights it describes must fit in the file's bytes, and the module
is built on the meta device for the shapes that every stored tensor must then have exactly
(`untrusted.py`: dtype, dense strides, storage, finite values). Writes go to a temporary file that
is renamed into place. Every way a file can be wrong becomes a `CheckpointError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from xcompile.errors import CheckpointError
from xcompile.models.fat import (
    MAX_JOINTS,
    MAX_MLP_LAYERS,
    MAX_MLP_WIDTH,
    MAX_NAME_LEN,
    MAX_OBS_DIM,
    MAX_PARAMS,
    FatConfig,
    PinnedPolicy,
)
from xcompile.models.files import check_input, read_torch_file, torch_save_bounded, write_atomically
from xcompile.models.mlp import ACTIVATIONS, MLPPolicy
from xcompile.models.recurrent import GRUStudent, HistoryMLP
from xcompile.models.untrusted import (
    check_config,
    check_finite,
    check_fits_file,
    check_json,
    check_state,
    show,
    validation_problems,
)

FORMAT = "xcompile.torch-policy"
VERSION = 1
SAVER = "xcompile.models.slim.save_torch_policy"
def spec_of(module: nn.Module) -> dict[str, Any]:
    """The rebuild spec of a module this file format knows (PinnedPolicy or a student)."""
    if isinstance(module, (MLPPolicy, HistoryMLP, GRUStudent)):
        return module.spec()
    if isinstance(module, PinnedPolicy):
        return {"kind": "pinned", "config": module.fat_config.model_dump(), "family": module.family,
                "n_joints": module.n_joints}
    raise CheckpointError(f"cannot save a {type(module).__name__}: only PinnedPolicy and the "
                          "students (MLPPolicy, HistoryMLP, GRUStudent) have a torch-policy spec")


# --------------------------------------------------------------------------------------------
# the spec: checked strictly, before anything is built


class _Spec(BaseModel):
    """What every spec may say besides its shapes; its other keys are free-form, bounded data."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    # What `xcompile.policy` compares with the robot it is asked to drive.
    robot: Annotated[str, Field(min_length=1, max_length=MAX_NAME_LEN)] | None = None
    joint_order: list[Annotated[str, Field(min_length=1, max_length=MAX_NAME_LEN)]] | None = Field(
        None, max_length=MAX_JOINTS)
    family: Annotated[str, Field(min_length=1, max_length=MAX_NAME_LEN)] | None = None


class _MLPSpec(_Spec):
    kind: Literal["mlp"]
    obs_dim: int = Field(ge=1, le=MAX_OBS_DIM)
    hidden: list[Annotated[int, Field(ge=1, le=MAX_MLP_WIDTH)]] = Field(max_length=MAX_MLP_LAYERS)
    n_actions: int = Field(ge=1, le=MAX_JOINTS)
    activation: str = "elu"
    normalize: bool = False

    @field_validator("activation")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}")
        return v

    def size(self) -> int:
        """Values in the state dict of `MLPPolicy(self)`, by arithmetic."""
        widths = [self.obs_dim, *self.hidden, self.n_actions]
        return (sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))
                + (2 * self.obs_dim if self.normalize else 0))


class _HistorySpec(_MLPSpec):
    kind: Literal["history_mlp"]   # type: ignore[assignment]
    history: int = Field(ge=2, le=64)

    def size(self) -> int:
        widths = [self.obs_dim * self.history, *self.hidden, self.n_actions]
        return (sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))
                + (2 * self.obs_dim * self.history if self.normalize else 0))


class _GRUSpec(_MLPSpec):
    kind: Literal["gru"]           # type: ignore[assignment]
    hidden: list[Annotated[int, Field(ge=1, le=MAX_MLP_WIDTH)]] = Field(
        min_length=1, max_length=MAX_MLP_LAYERS)

    def size(self) -> int:
        d, widths = self.hidden[0], [*self.hidden, self.n_actions]
        return ((self.obs_dim + 1) * d + 3 * d * (2 * d + 2)
                + sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))
                + (2 * self.obs_dim if self.normalize else 0))


class _PinnedSpec(_Spec):
    kind: Literal["pinned"]
    config: dict[str, Any]
    family: str = Field(min_length=1, max_length=MAX_NAME_LEN)
    n_joints: int = Field(ge=1, le=MAX_JOINTS)


_SPECS: dict[str, type[_MLPSpec] | type[_PinnedSpec]] = {
    "mlp": _MLPSpec, "history_mlp": _HistorySpec, "gru": _GRUSpec, "pinned": _PinnedSpec}
_LIMITS = {("n_joints", "less_than_equal"): "MAX_JOINTS", ("n_actions", "less_than_equal"):
           "MAX_JOINTS", ("obs_dim", "less_than_equal"): "MAX_OBS_DIM",
           ("hidden", "less_than_equal"): "MAX_MLP_WIDTH", ("hidden", "too_long"): "MAX_MLP_LAYERS",
           ("joint_order", "too_long"): "MAX_JOINTS", ("robot", "string_too_long"): "MAX_NAME_LEN",
           ("family", "string_too_long"): "MAX_NAME_LEN"}


def _check_spec(spec: Any, where: str) -> tuple[_MLPSpec | _PinnedSpec, FatConfig | None, int]:
    """The spec checked against the limits, its fat config (pinned) and how many values its
    module's state dict holds, all without building anything."""
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where}: 'spec' must be a dict, not {show(spec)}")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in _SPECS:
        raise CheckpointError(f"{where}: unknown torch policy kind {show(kind)}; expected "
                              f"one of {sorted(_SPECS)}")
    model = _SPECS[kind]
    extra = {k: v for k, v in spec.items() if k not in model.model_fields}
    check_json(extra, "'spec'", where)
    try:
        checked = model.model_validate(spec)
    except ValidationError as e:
        raise CheckpointError(f"{where}: the {kind} spec is invalid: "
                              f"{validation_problems(e, _LIMITS)}") from e
    config = None
    if isinstance(checked, _PinnedSpec):
        config = check_config(checked.config, f"{where}: the pinned spec has an invalid config")
        if checked.family not in config.global_dims:
            raise CheckpointError(f"{where}: the pinned spec's family {show(checked.family)} is "
                                  f"not one of its config's families {config.families}")
        n = config.pinned_size(checked.family, checked.n_joints)
    else:
        n = checked.size()
    if n > MAX_PARAMS:
        raise CheckpointError(f"{where}: the {kind} spec describes a network of {n:,} parameters, "
                              f"more than the limit of {MAX_PARAMS:,} (MAX_PARAMS)")
    return checked, config, n


def _build(checked: _MLPSpec | _PinnedSpec, config: FatConfig | None) -> nn.Module:
    """The module a checked spec describes, on the meta device: shapes only, nothing allocated."""
    with torch.device("meta"):
        if isinstance(checked, _PinnedSpec) and config is not None:
            return PinnedPolicy.empty(config, checked.family, checked.n_joints)
        if isinstance(checked, _HistorySpec):
            return HistoryMLP(checked.obs_dim, checked.hidden, checked.n_actions,
                              checked.activation, checked.history, checked.normalize)
        if isinstance(checked, _GRUSpec):
            return GRUStudent(checked.obs_dim, checked.hidden, checked.n_actions,
                              checked.activation, checked.normalize)
        return MLPPolicy(checked.obs_dim, checked.hidden, checked.n_actions, checked.activation,
                         checked.normalize)


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------------
# files


def save_torch_policy(path: str | os.PathLike[str], module: nn.Module,
                      spec: dict[str, Any]) -> Path:
    """Write `module`'s weights and its rebuild `spec` to `path` atomically; a spec or weights that
    `read_torch_policy` would refuse are not written."""
    path = Path(path)
    where = f"cannot save torch policy {str(path)!r}"
    checked, config, _ = _check_spec(spec, where)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    if _shapes(module) != _shapes(_build(checked, config)):
        raise CheckpointError(f"{where}: the module's weights do not fit its spec")
    check_finite(state, where)
    payload = {"format": FORMAT, "version": VERSION, "spec": dict(spec), "state_dict": state}
    write_atomically(path, lambda tmp: torch_save_bounded(payload, tmp, path, "spec"))
    return path


def read_torch_policy(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated payload of a torch policy file (spec and state dict), without building it.

    Everything is checked here, so a caller may build the module (`build_from_spec`) and load
    `payload["state_dict"]` into it with nothing left to fail.
    """
    path = Path(path)
    where = f"torch policy {str(path)!r}"
    n_bytes = check_input(path, "torch policy")
    payload = read_torch_file(path, "torch policy", SAVER)
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if not isinstance(fmt, str) or fmt != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an xcompile torch policy (format tag "
                              f"{show(fmt)}, expected {FORMAT!r})")
    version = payload.get("version")
    if type(version) is not int or version != VERSION:
        raise CheckpointError(f"{where} has torch-policy version {show(version)}; this xcompile "
                              f"reads version {VERSION}")
    if "spec" not in payload or "state_dict" not in payload:
        raise CheckpointError(f"{where} lacks a 'spec' or a 'state_dict'; save it again")
    if not isinstance(payload["state_dict"], dict):
        raise CheckpointError(f"{where}: 'state_dict' must map names (strings) to tensors")
    checked, config, n_values = _check_spec(payload["spec"], where)
    check_fits_file(n_values, n_bytes, where, "spec")
    expected = _shapes(_build(checked, config))
    state = check_state(payload["state_dict"], expected, where, "spec", "save_torch_policy")
    check_finite(state, where)
    return {**payload, "state_dict": state}


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """A module of the shapes `spec` describes, its weights uninitialised: load a state dict
    (checked by `read_torch_policy`) into it. The spec is checked first, so it cannot ask for
    more than the limits allow."""
    checked, config, _ = _check_spec(spec, "torch policy spec")
    return _build(checked, config).to_empty(device="cpu")


def load_torch_policy(path: str | os.PathLike[str]) -> nn.Module:
    """Load a torch policy file; the module comes back in eval mode on the CPU."""
    payload = read_torch_policy(path)
    module = build_from_spec(payload["spec"])
    module.load_state_dict(payload["state_dict"], strict=True)   # shapes checked: cannot fail
    return module.eval()
