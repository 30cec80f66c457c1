"""The fat policy: one transformer that acts for many robot bodies, and its pinned form for one body.

Each joint is a token. Its identity is the joint's descriptor vector (read from the URDF, see
`descriptors.py`), encoded by a small MLP, plus a projection of its state (position, velocity,
last action). One extra token carries the task's global observation (base state, command or
target), encoded per task family. Pre-LayerNorm transformer blocks mix the tokens; a per-family
head reads one action per joint token, plus a per-family linear skip from the joint's own state.
Nothing is indexed by joint position or body id, so any number of joints works and a body never
seen in training is described like a known one.

`pin` is the first compiler pass in miniature: partial evaluation on one body. Everything that
depends only on the body (descriptor embeddings, the family's embedding) is computed once and
stored as constants; other families' weights and the descriptor encoder are dropped. The pinned
module takes the robot's flat observation vector and returns the same actions as the fat network
(to float rounding). Attention is written with plain ops, not `nn.MultiheadAttention`, so both
forms export to ONNX without fused kernels or data-dependent branches.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from xcompile.errors import TargetError
from xcompile.models.descriptors import DESC_DIM

JOINT_STATE_DIM = 3  # q - q_default, 0.1 * qdot, last action

# --------------------------------------------------------------------------------------------
# Limits on untrusted input, all in one place.
#
# A checkpoint (or a pinned torch policy) comes from strangers, and its few bytes of config say how
# big a network to build and how much to walk: a config of n_layers = 10**6 or d_model = 10**9
# must be refused, not built. These bound what a config, a checkpoint's body registry and its
# file may describe; they are checked before anything is built, allocated or walked, and an error
# names the field, its value and the limit. Each is far above any policy this tool is for (the
# sample checkpoint: d_model 256, 6 blocks, 4.6M parameters, 8 bodies of at most 12 joints, a
# 24 kB pickle) and far below what would exhaust a workstation's memory or take a minute to check.
MAX_D_MODEL = 8192             # token width
MAX_LAYERS = 256               # transformer blocks
MAX_D_FF = 65536               # hidden width of a block's MLP (8 x MAX_D_MODEL)
MAX_DESC_HIDDEN = 65536        # hidden width of the descriptor encoder
MAX_DESC_LAYERS = 64           # hidden layers of the descriptor encoder
MAX_FEATURE_DIM = 1024         # joint_state_dim and desc_dim (3 and 14 today)
MAX_GLOBAL_DIM = 65536         # length of one family's global observation
MAX_FAMILIES = 64              # task families (2 today)
MAX_PARAMS = 2_000_000_000     # whole network, computed from the config: 8 GB of float32
MAX_NAME_LEN = 256             # a family, body or joint name
MAX_PATH_LEN = 4096            # a body's URDF path (PATH_MAX)
MAX_BODIES = 1024              # bodies in a checkpoint's registry
MAX_JOINTS = 256               # joints of one body
MAX_DESCRIPTOR_VALUES = 500_000  # descriptor numbers in a whole registry: 1024 bodies of ~35
                                 # joints; pickled, they stay well under MAX_PICKLE_BYTES
MAX_STATE_TENSORS = 10_000     # tensors in a state dict (the largest config above has ~3,600)
MAX_PICKLE_BYTES = 8 << 20     # a .pt's pickled structure (tensor data is apart): ~10 s to unpickle
MAX_EXTRA_ITEMS = 100_000      # values in a checkpoint's free-form 'extra' (and extra registry keys)
MAX_EXTRA_DEPTH = 32           # nesting of those values
MAX_EXTRA_TEXT = 16 << 20      # characters of all their strings together
# A one-robot torch policy file (slim.py): a pinned policy is bounded by the config limits above
# and MAX_JOINTS; a distilled MLP (built-ins: 2 hidden layers of 64-256) by these and MAX_PARAMS.
MAX_OBS_DIM = MAX_GLOBAL_DIM + JOINT_STATE_DIM * MAX_JOINTS   # an MLP's input width (built-ins: <= 50)
MAX_MLP_WIDTH = 65536          # one hidden layer of an MLP
MAX_MLP_LAYERS = 64            # hidden layers of an MLP

# A family names a ModuleDict/ParameterDict entry: no dots, not empty, and not one of the dicts'
# own attributes ("keys", "to", "forward", ...), which torch refuses with a KeyError.
_FAMILY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_RESERVED_NAMES = frozenset(dir(nn.ModuleDict())) | frozenset(dir(nn.ParameterDict()))


class FatConfig(BaseModel):
    """Architecture of the fat policy; stored in every checkpoint."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Sized for CPU training: the per-sample cost is in the blocks, so they stay small; the
    # descriptor encoder runs once per body per batch, so it can be wide (pinning folds it away).
    d_model: int = Field(128, gt=0, le=MAX_D_MODEL, description="token width")
    n_layers: int = Field(3, ge=1, le=MAX_LAYERS, description="number of transformer blocks")
    n_heads: int = Field(4, ge=1, le=MAX_D_MODEL,
                         description="attention heads per block; must divide d_model")
    d_ff: int = Field(384, gt=0, le=MAX_D_FF, description="hidden width of each block's MLP")
    desc_hidden: int = Field(512, gt=0, le=MAX_DESC_HIDDEN,
                             description="hidden width of the descriptor encoder")
    desc_layers: int = Field(3, ge=1, le=MAX_DESC_LAYERS,
                             description="hidden layers of the descriptor encoder")
    joint_state_dim: int = Field(JOINT_STATE_DIM, gt=0, le=MAX_FEATURE_DIM,
                                 description="per-joint state features (q, qdot, last action)")
    desc_dim: int = Field(DESC_DIM, gt=0, le=MAX_FEATURE_DIM,
                          description="length of a joint descriptor")
    global_dims: dict[str, Annotated[int, Field(gt=0, le=MAX_GLOBAL_DIM)]] = Field(
        default_factory=lambda: {"locomotion": 14, "reach": 9}, max_length=MAX_FAMILIES,
        description="task family -> length of its global observation",
    )

    @model_validator(mode="after")
    def _check(self) -> FatConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        if not self.global_dims:
            raise ValueError("global_dims needs at least one task family")
        for f in self.global_dims:
            if (len(f) > MAX_NAME_LEN or not _FAMILY_NAME.fullmatch(f)
                    or f in _RESERVED_NAMES):
                raise ValueError(
                    f"task family name {f[:MAX_NAME_LEN]!r} is not usable: a family is a letter or "
                    f"'_' then letters, digits, '_' or '-', at most {MAX_NAME_LEN} characters, "
                    "and not a name torch's module dicts reserve (such as 'keys' or 'to')")
        n = self.param_count()
        if n > MAX_PARAMS:
            raise ValueError(
                f"the config describes a network of {n:,} parameters, more than the limit of "
                f"{MAX_PARAMS:,} (MAX_PARAMS): d_model={self.d_model}, n_layers={self.n_layers}, "
                f"d_ff={self.d_ff}, desc_hidden={self.desc_hidden}, "
                f"desc_layers={self.desc_layers}")
        return self

    def param_count(self) -> int:
        """Parameters of `FatPolicy(self)`, by arithmetic: nothing is built or allocated."""
        d, n_fam, js = self.d_model, len(self.global_dims), self.joint_state_dim
        n = sum((g + 1) * d for g in self.global_dims.values())      # global encoders
        n += n_fam * d                                                # family embeddings
        n += (js + 1) * d                                             # joint state projection
        widths = [self.desc_dim] + [self.desc_hidden] * self.desc_layers + [d]
        n += sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))  # descriptor encoder
        n += self.n_layers * self._block_size() + 2 * d              # blocks, ln_f
        n += n_fam * ((d + 1) + js)                                   # heads, skips
        return n

    def _block_size(self) -> int:
        d = self.d_model
        return (2 * 2 * d                                             # two LayerNorms
                + (d + 1) * 3 * d + (d + 1) * d                       # qkv, out
                + (d + 1) * self.d_ff + (self.d_ff + 1) * d)          # fc1, fc2

    def pinned_size(self, family: str, n_joints: int) -> int:
        """Values in the state dict of a `PinnedPolicy` of this config (its parameters and its
        `joint_const` buffer), by arithmetic: nothing is built or allocated."""
        d, js = self.d_model, self.joint_state_dim
        return ((self.global_dims[family] + 1) * d      # global encoder (family embedding folded in)
                + js * d + n_joints * d                  # joint_weight, joint_const
                + self.n_layers * self._block_size() + 2 * d   # blocks, ln_f
                + (d + 1) + js)                          # head, skip

    @property
    def families(self) -> list[str]:
        return sorted(self.global_dims)

    def obs_dim(self, family: str, n_joints: int) -> int:
        """Length of the flat observation of a body of `family` with `n_joints` joints."""
        return self.global_dims[family] + self.joint_state_dim * n_joints


def split_obs(obs: Tensor, family_dim: int, n: int) -> tuple[Tensor, Tensor]:
    """Split a flat observation (B, G + 3n) into global (B, G) and joint state (B, n, 3).

    The flat layout is `[global | q - q_default | 0.1*qdot | last_action]`, each joint block in
    policy joint order. Shapes are static in G and n (reshape with -1 for the batch) so the split
    traces into ONNX with a dynamic batch.
    """
    global_obs = obs[:, :family_dim]
    joint_state = obs[:, family_dim:].reshape(-1, JOINT_STATE_DIM, n).transpose(1, 2)
    return global_obs, joint_state


class Block(nn.Module):
    """Pre-LayerNorm transformer block with attention written out in plain ops."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        # Python constants, so tracing exporters see a fixed scale rather than shape arithmetic.
        self.head_dim = d_model // n_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.ln1(x)).reshape(b, t, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, dh)
        att = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.out(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def _check_family(cfg: FatConfig, family: str) -> None:
    if family not in cfg.global_dims:
        raise TargetError(
            f"task family {family!r} is not one this fat policy was built for; "
            f"it knows {cfg.families}. Pick a target of one of those families."
        )


class FatPolicy(nn.Module):
    """The multi-body policy: (global obs, joint states, joint descriptors, family) -> actions."""

    def __init__(self, config: FatConfig | None = None) -> None:
        super().__init__()
        cfg = config or FatConfig()
        self.config = cfg
        d = cfg.d_model
        self.global_encoder = nn.ModuleDict(
            {f: nn.Linear(g, d) for f, g in sorted(cfg.global_dims.items())})
        self.family_embed = nn.ParameterDict(
            {f: nn.Parameter(torch.randn(d) * 0.02) for f in cfg.families})
        self.joint_state_proj = nn.Linear(cfg.joint_state_dim, d)
        widths = [cfg.desc_dim] + [cfg.desc_hidden] * cfg.desc_layers
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.GELU()]
        self.desc_encoder = nn.Sequential(*layers, nn.Linear(cfg.desc_hidden, d))
        self.blocks = nn.ModuleList(
            Block(d, cfg.n_heads, cfg.d_ff) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.heads = nn.ModuleDict({f: nn.Linear(d, 1) for f in cfg.families})
        # A linear path from each joint's own state straight to its action, per family (zero at
        # start). Reaching's action is "current angle + a small correction": through the final
        # LayerNorm the network can only copy the angle approximately, and that copy error, not
        # the correction, was what held the arms off their goals. With the skip the blocks learn
        # only the correction (as in residual policy learning).
        self.skips = nn.ModuleDict(
            {f: nn.Linear(cfg.joint_state_dim, 1, bias=False) for f in cfg.families})
        for skip in self.skips.values():
            nn.init.zeros_(skip.weight)

    def forward(self, global_obs: Tensor, joint_state: Tensor, desc: Tensor,
                family: str) -> Tensor:
        """global_obs (B, G), joint_state (B, n, 3), desc (n, D) -> action (B, n)."""
        _check_family(self.config, family)
        g = self.global_encoder[family](global_obs) + self.family_embed[family]
        joints = self.joint_state_proj(joint_state) + self.desc_encoder(desc)
        x = torch.cat([g.unsqueeze(1), joints], dim=1)
        for block in self.blocks:
            x = block(x)
        out = self.heads[family](self.ln_f(x[:, 1:])) + self.skips[family](joint_state)
        return out.squeeze(-1)

    def act(self, obs_flat: Tensor, desc: Tensor | np.ndarray, family: str) -> Tensor:
        """Act on flat observations (B, obs_dim) of one body."""
        _check_family(self.config, family)
        desc_t = _as_desc(desc, self.config, obs_flat)
        global_obs, joint_state = split_obs(
            obs_flat, self.config.global_dims[family], desc_t.shape[0])
        return self(global_obs, joint_state, desc_t, family)


def _as_desc(desc: Tensor | np.ndarray, cfg: FatConfig, like: Tensor | None = None) -> Tensor:
    t = torch.as_tensor(desc, dtype=torch.float32)
    if like is not None:
        t = t.to(like.device)
    if t.ndim != 2 or t.shape[1] != cfg.desc_dim:
        raise ValueError(f"descriptors must be (n_joints, {cfg.desc_dim}), got {tuple(t.shape)}")
    return t


class PinnedPolicy(nn.Module):
    """The fat policy partially evaluated on one body: flat obs (B, obs_dim) -> action (B, n)."""

    def __init__(self, fat: FatPolicy, desc: Tensor | np.ndarray, family: str) -> None:
        super().__init__()
        cfg = fat.config
        _check_family(cfg, family)
        desc_t = _as_desc(desc, cfg, next(fat.parameters()))
        self.fat_config = cfg  # kept so the pinned module can be saved and rebuilt (slim.py)
        self.family = family
        self.n_joints = int(desc_t.shape[0])
        self.global_dim = cfg.global_dims[family]
        self.obs_dim = cfg.obs_dim(family, self.n_joints)

        with torch.no_grad():
            enc = copy.deepcopy(fat.global_encoder[family])
            # The family embedding is a constant added after the encoder: fold it into the bias.
            enc.bias.add_(fat.family_embed[family])
            joint_const = fat.desc_encoder(desc_t) + fat.joint_state_proj.bias
        self.global_encoder = enc
        self.joint_weight = nn.Parameter(fat.joint_state_proj.weight.detach().clone())
        # A buffer, not a parameter: it describes the body, so fine-tuning should not move it.
        self.register_buffer("joint_const", joint_const.detach().clone())
        self.blocks = copy.deepcopy(fat.blocks)
        self.ln_f = copy.deepcopy(fat.ln_f)
        self.head = copy.deepcopy(fat.heads[family])
        self.skip = copy.deepcopy(fat.skips[family])

    @classmethod
    def empty(cls, config: FatConfig, family: str, n_joints: int) -> PinnedPolicy:
        """A pinned policy of the right shapes with throwaway weights, to `load_state_dict` into."""
        _check_family(config, family)
        if n_joints < 1:
            raise ValueError(f"n_joints must be >= 1, got {n_joints}")
        return cls(FatPolicy(config), torch.zeros(n_joints, config.desc_dim), family)

    def forward(self, obs: Tensor) -> Tensor:
        global_obs, joint_state = split_obs(obs, self.global_dim, self.n_joints)
        g = self.global_encoder(global_obs)
        joints = F.linear(joint_state, self.joint_weight) + self.joint_const
        x = torch.cat([g.unsqueeze(1), joints], dim=1)
        for block in self.blocks:
            x = block(x)
        return (self.head(self.ln_f(x[:, 1:])) + self.skip(joint_state)).squeeze(-1)


def pin(fat: FatPolicy, desc: Tensor | np.ndarray, family: str) -> PinnedPolicy:
    """Partially evaluate `fat` on the body described by `desc` (n, D) doing `family`."""
    return PinnedPolicy(fat, desc, family).eval()


def count_params(module: nn.Module) -> int:
    """Number of parameters (not buffers) in `module`."""
    return sum(p.numel() for p in module.parameters())


def param_usage(fat: FatPolicy, family: str) -> dict[str, int | float]:
    """How much of `fat` a body of `family` uses: shared parts plus its family's own parts."""
    _check_family(fat.config, family)
    shared = sum(count_params(m) for m in (fat.joint_state_proj, fat.desc_encoder, fat.blocks,
                                            fat.ln_f))
    own = (count_params(fat.global_encoder[family]) + fat.family_embed[family].numel()
           + count_params(fat.heads[family]) + count_params(fat.skips[family]))
    total = count_params(fat)
    return {"shared": shared, "family": own, "used": shared + own, "total": total,
            "fraction": (shared + own) / total}
