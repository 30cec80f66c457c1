"""The body registry of a fat checkpoint: which bodies it was trained on, each checked.

A registry entry names a body, its task family, its joints (in policy order), one descriptor row per
joint and its URDF. It comes from the file like everything else, so each entry is checked against the
checkpoint's config and the limits in `fat.py` (MAX_BODIES, MAX_JOINTS, MAX_DESCRIPTOR_VALUES,
MAX_NAME_LEN, MAX_PATH_LEN); names are strings, never coerced; descriptors are finite floats;
any other field of an entry must be plain JSON data within the free-form budget.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import numpy as np
import torch

from xcompile.errors import CheckpointError
from xcompile.models.fat import (
    MAX_BODIES,
    MAX_DESCRIPTOR_VALUES,
    MAX_JOINTS,
    MAX_PATH_LEN,
    FatConfig,
)
from xcompile.models.untrusted import Budget, check_plain, check_text, show, tensor_problem

REGISTRY_KEYS = ("name", "family", "joints", "descriptors", "urdf")


def check_registry(registry: Any, config: FatConfig, where: str = "the registry"
                   ) -> list[dict[str, Any]]:
    """Check each body entry against the config; return clean plain-Python copies."""
    if not isinstance(registry, list):
        raise CheckpointError(f"{where}: the body registry must be a list of entries")
    if len(registry) > MAX_BODIES:
        raise CheckpointError(f"{where}: the registry lists {len(registry):,} bodies, more than "
                              f"the limit of {MAX_BODIES:,} (MAX_BODIES)")
    out, names, n_values, budget = [], set(), 0, Budget()
    for i, entry in enumerate(registry):
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: registry entry {i} is not a dict")
        missing = [k for k in REGISTRY_KEYS if k not in entry]
        if missing:
            raise CheckpointError(f"{where}: registry entry {i} lacks {missing}")
        name = check_text(entry["name"], f"registry entry {i}: 'name'", where)
        family = check_text(entry["family"], f"body {name!r}: 'family'", where)
        if name in names:
            raise CheckpointError(f"{where}: body {name!r} appears twice in the registry")
        names.add(name)
        if family not in config.global_dims:
            raise CheckpointError(f"{where}: body {name!r} has family {family!r}, not one of "
                                  f"the config's families {config.families}")
        joints = entry["joints"]
        if not isinstance(joints, (list, tuple)) or not 1 <= len(joints) <= MAX_JOINTS:
            n = f"{len(joints):,} joints" if isinstance(joints, (list, tuple)) else show(joints)
            raise CheckpointError(f"{where}: 'joints' of body {name!r} must list 1 to "
                                  f"{MAX_JOINTS} joint names (MAX_JOINTS), not {n}")
        joints = [check_text(j, f"body {name!r}: joint {k}", where) for k, j in enumerate(joints)]
        if len(set(joints)) != len(joints):
            raise CheckpointError(f"{where}: body {name!r} names a joint twice")
        n_values += len(joints) * config.desc_dim
        if n_values > MAX_DESCRIPTOR_VALUES:
            raise CheckpointError(
                f"{where}: the registry's descriptors hold more than {MAX_DESCRIPTOR_VALUES:,} "
                "numbers (MAX_DESCRIPTOR_VALUES)")
        desc = _descriptor_rows(entry["descriptors"], len(joints), config.desc_dim, name, where)
        urdf = entry["urdf"]
        if isinstance(urdf, os.PathLike):
            urdf = str(urdf)
        urdf = check_text(urdf, f"body {name!r}: 'urdf'", where, MAX_PATH_LEN, allow_empty=True)
        clean = {"name": name, "family": family, "joints": joints, "descriptors": desc,
                 "urdf": urdf}
        for k, v in entry.items():
            if k not in clean:
                if not isinstance(k, str):
                    raise CheckpointError(f"{where}: body {name!r} has a field named "
                                          f"{show(k)}; field names are strings")
                check_plain(v, f"field {show(k)} of body {name!r}", where, budget,
                             json_only=True)
        out.append({k: clean.get(k, v) for k, v in entry.items()})
    return out


def _descriptor_rows(x: Any, n: int, width: int, name: str, where: str) -> list[list[float]]:
    """Descriptors as an n x width list of finite floats (from lists, an array or a tensor)."""
    wrong = CheckpointError(f"{where}: descriptors of body {name!r} must be {n} x {width} "
                            "(one row per joint)")
    if isinstance(x, torch.Tensor):
        if x.device.type not in ("cpu", "meta"):   # a caller's GPU tensor (a file's are on the CPU)
            x = x.detach().cpu()
        problem = tensor_problem(x)
        if problem is None and tuple(x.shape) != (n, width):
            raise wrong
        if problem or x.is_complex():
            raise CheckpointError(f"{where}: descriptors of body {name!r} {problem or 'are complex'}")
        x = x.tolist()          # at most MAX_JOINTS x MAX_FEATURE_DIM values, whatever the strides
    elif isinstance(x, np.ndarray):
        if x.shape != (n, width):
            raise wrong
        x = x.tolist()
    if not isinstance(x, (list, tuple)) or len(x) != n:
        raise wrong
    rows = []
    for row in x:
        if not isinstance(row, (list, tuple)) or len(row) != width:
            raise wrong
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in row):
            raise CheckpointError(f"{where}: descriptors of body {name!r} are not numbers")
        try:
            values = [float(v) for v in row]
        except (OverflowError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: descriptors of body {name!r} hold numbers too large "
                                  "for a float") from e
        if not all(math.isfinite(v) for v in values):
            raise CheckpointError(f"{where}: descriptors of body {name!r} hold NaN or Inf")
        rows.append(values)
    return rows

