"""Checks on what a model file holds, made before any of it is used.

A fat checkpoint (`checkpoint.py`) and a one-robot torch policy (`slim.py`) come from strangers. Both
are checked here from their metadata, in milliseconds, before anything is built, allocated or
walked: an architecture config against the limits in `fat.py`, every stored tensor's type, dtype,
shape, strides and storage against what the config or spec says it must be, the total size against
the bytes the file actually holds, and free-form data with a budget (a pickle can share one list
many times over). Only then are weights checked for NaN/Inf. Every refusal is a `CheckpointError`
naming the field, its value and the limit; `show` keeps a file's values short in those messages.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import ValidationError

from xcompile.errors import CheckpointError
from xcompile.models.fat import (
    JOINT_STATE_DIM,
    MAX_EXTRA_DEPTH,
    MAX_EXTRA_ITEMS,
    MAX_EXTRA_TEXT,
    MAX_FAMILIES,
    MAX_NAME_LEN,
    MAX_PATH_LEN,
    MAX_STATE_TENSORS,
    FatConfig,
)

# Weights are stored in one of these and held as float32 once loaded.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_INT_BITS = 1024  # an int in free-form data wider than this is not data (json cannot print it)


# --------------------------------------------------------------------------------------------
# the architecture


def check_config(raw: Any, bad: str) -> FatConfig:
    """A fat architecture config, checked against the limits in fat.py before anything is built.

    Strict: a string, float, bool or tensor where an int belongs is refused, not coerced. `bad`
    starts every message ("checkpoint 'x.pt' has an invalid architecture config").
    """
    if not isinstance(raw, dict):
        raise CheckpointError(f"{bad}: it is a {type(raw).__name__}, not a dict; the file is "
                              "corrupt or was edited by hand")
    unknown = [k for k in raw if k not in FatConfig.model_fields]
    if unknown:
        raise CheckpointError(f"{bad}: unknown fields {names(unknown)}; a FatConfig has "
                              f"{', '.join(FatConfig.model_fields)}")
    dims = raw.get("global_dims")
    if isinstance(dims, dict) and len(dims) > MAX_FAMILIES:
        raise CheckpointError(f"{bad}: global_dims lists {len(dims):,} task families, more than "
                              f"the limit of {MAX_FAMILIES} (MAX_FAMILIES)")
    try:
        config = FatConfig.model_validate(raw, strict=True)
    except ValidationError as e:
        raise CheckpointError(f"{bad}: {validation_problems(e)}. The file is corrupt or was "
                              "edited by hand; use the file as xcompile saved it") from e
    if config.joint_state_dim != JOINT_STATE_DIM:
        raise CheckpointError(
            f"{bad}: joint_state_dim = {config.joint_state_dim}, but this xcompile's observations "
            f"carry {JOINT_STATE_DIM} state features per joint (q, qdot, last action)")
    return config


def validation_problems(e: ValidationError,
                        limits: dict[tuple[str, str], str] | None = None) -> str:
    """The first few problems pydantic found, as `field = value: what is wrong`; `limits` names
    the limit behind a (field, pydantic error type), e.g. ("n_joints", "less_than_equal")."""
    problems = []
    for err in e.errors(include_url=False)[:5]:
        loc = ".".join(p if isinstance(p, str) and len(p) <= 80 else show(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        limit = (limits or {}).get((str(err["loc"][0]), err["type"])) if err["loc"] else None
        if limit:
            msg += f" ({limit})"
        problems.append(f"{loc} = {show(err.get('input'))}: {msg}" if loc else msg)
    more = f" (and {e.error_count() - 5} more)" if e.error_count() > 5 else ""
    return "; ".join(problems) + more


def check_fits_file(n_values: int, n_bytes: int, where: str, source: str) -> None:
    """Refuse a `source` (config, spec) that describes more weights than the file can hold: a
    few bytes of numbers must not make the loader build a network of gigabytes."""
    if n_values * min(d.itemsize for d in WEIGHT_DTYPES) > n_bytes:
        raise CheckpointError(
            f"{where}: its {source} describes {n_values:,} parameters, more than its "
            f"{n_bytes:,} bytes can hold; the {source} or the file was edited by hand, or the "
            "file is truncated")


# --------------------------------------------------------------------------------------------
# stored tensors


def too_many_tensors(n: int, where: str, kind: str) -> str:
    return (f"{where} holds {n:,} tensors, more than the limit of {MAX_STATE_TENSORS:,} "
            f"(MAX_STATE_TENSORS); it is not a {kind}")


def check_state(state: Any, expected: dict[str, tuple[int, ...]], where: str, source: str,
                saver: str) -> dict[str, torch.Tensor]:
    """Each stored tensor is a plain dense CPU float tensor of the shape its `source` (config,
    spec) expects; returned in the order of `expected`.

    Checked on metadata only (type, layout, shape, strides, storage size): a 10^6 x 10^6 view of
    one stored float is refused here, before the NaN check would walk its 10^12 elements.
    """
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{where}: 'state_dict' must map names (strings) to tensors")
    if len(state) > MAX_STATE_TENSORS:
        raise CheckpointError(too_many_tensors(len(state), where, "model file"))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = "; ".join(f"{label} {names(keys)}" for label, keys in
                         (("missing", missing), ("unexpected", unexpected)) if keys)
        raise CheckpointError(
            f"{where}: the weights do not fit its own {source} ({what}); the file is corrupt or "
            "was edited by hand")
    for key, want in expected.items():
        t = state[key]
        problem = tensor_problem(t, dtypes=WEIGHT_DTYPES)
        if problem is None and tuple(t.shape) != want:
            problem = (f"has shape {shape(t.shape)}, but its {source} needs {shape(want)}: "
                       f"the weights do not fit its own {source}")
        problem = problem or layout_problem(t)
        if problem:
            raise CheckpointError(f"{where}: tensor {show(key)} {problem}; the file is corrupt "
                                  f"or was crafted: save it again with {saver}")
    return {k: state[k] for k in expected}


def tensor_problem(t: Any, dtypes: tuple[torch.dtype, ...] | None = None) -> str | None:
    """What makes `t` not a plain CPU tensor of data (of one of `dtypes`); None if it is one."""
    if not isinstance(t, torch.Tensor):
        return f"is a {type(t).__name__}, not a tensor"
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return f"is a tensor subclass ({type(t).__name__})"
    if t.layout != torch.strided:
        return f"is a {str(t.layout).removeprefix('torch.')} tensor, not a dense one"
    if t.device.type != "cpu":
        return f"is on the {t.device.type!r} device and holds no data"
    if t.is_quantized or (dtypes is not None and t.dtype not in dtypes):
        want = [str(d).removeprefix("torch.") for d in dtypes or ()]
        return f"has dtype {str(t.dtype).removeprefix('torch.')}" + (
            f"; weights must be {', '.join(want[:-1])} or {want[-1]}" if want else "")
    return None


def layout_problem(t: torch.Tensor) -> str | None:
    """Whether `t` is dense and row-major in a storage that holds all of it (None if so).

    torch.save of a view stores only the view's storage: `torch.zeros(1).expand(10**6, 10**6)`
    is 4 bytes on disk with strides (0, 0) and 10^12 elements. Such a tensor, a transposed or
    sliced view, or strides that do not fit the storage, is never what xcompile writes.
    """
    dense, step = [], 1
    for n in reversed(t.shape):
        dense.append(step)
        step *= n
    dense.reverse()
    strides = t.stride()
    if any(n > 1 and s != d for n, s, d in zip(t.shape, strides, dense)):
        return (f"has strides {strides} for shape {shape(t.shape)}: it is a view (expanded, "
                "transposed or sliced), not a dense tensor")
    need = (t.storage_offset() + t.numel()) * t.element_size()
    have = t.untyped_storage().nbytes()
    if t.storage_offset() < 0 or have < need:
        return f"needs {need:,} bytes at offset {t.storage_offset():,} but its storage holds {have:,}"
    return None


def check_finite(state: dict[str, torch.Tensor], where: str = "the model") -> None:
    def finite(v: torch.Tensor) -> bool:
        # In chunks: isfinite's temporaries on a whole 64 MB tensor would cost more memory than
        # the memory-mapped weights themselves.
        return all(bool(torch.isfinite(c).all()) for c in v.reshape(-1).split(1 << 20))

    bad = [k for k, v in state.items() if v.is_floating_point() and not finite(v)]
    if bad:
        raise CheckpointError(
            f"{where} has NaN or Inf weights in {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
            "training diverged or the file is corrupt: use an earlier checkpoint")


# --------------------------------------------------------------------------------------------
# free-form data and names


class Budget:
    """How much free-form data a file may still hold (shared by its parts)."""

    def __init__(self) -> None:
        self.items = MAX_EXTRA_ITEMS
        self.text = MAX_EXTRA_TEXT


def check_plain(obj: Any, what: str, where: str, budget: Budget, json_only: bool) -> None:
    """Refuse free-form data that is not plain, is nested too deep (or refers to itself), or is
    too large to walk: a pickle can share one list many times over, so what is walked, not what
    is stored, is counted. With `json_only`, only what a JSON header holds is allowed."""
    def fail(why: str) -> CheckpointError:
        return CheckpointError(f"{where}: {what} {why}; it is not plain data as xcompile writes "
                               "it: the file is corrupt or was crafted")

    stack = [(obj, 0)]
    while stack:
        x, depth = stack.pop()
        budget.items -= 1
        if budget.items < 0:
            raise fail(f"holds more than {MAX_EXTRA_ITEMS:,} values (MAX_EXTRA_ITEMS)")
        if depth > MAX_EXTRA_DEPTH:
            raise fail(f"is nested more than {MAX_EXTRA_DEPTH} deep (MAX_EXTRA_DEPTH) or "
                       "contains itself")
        if x is None or isinstance(x, (bool, float)):
            continue
        if isinstance(x, int):
            if x.bit_length() > MAX_INT_BITS:
                raise fail(f"holds an integer of {x.bit_length():,} bits")
        elif isinstance(x, str) or (isinstance(x, bytes) and not json_only):
            budget.text -= len(x)
            if budget.text < 0:
                raise fail(f"holds more than {MAX_EXTRA_TEXT:,} characters of text "
                           "(MAX_EXTRA_TEXT)")
        elif isinstance(x, (list, tuple, dict)) or (
                isinstance(x, (set, frozenset)) and not json_only):
            if len(x) > budget.items:
                raise fail(f"holds more than {MAX_EXTRA_ITEMS:,} values (MAX_EXTRA_ITEMS)")
            if isinstance(x, dict):
                if json_only and not all(isinstance(k, str) for k in x):
                    raise fail("has a dict whose keys are not all strings")
                stack.extend((v, depth + 1) for kv in x.items() for v in kv)
            else:
                stack.extend((v, depth + 1) for v in x)
        elif json_only:
            raise fail(f"holds a {type(x).__name__}; only numbers, strings, lists and dicts "
                       "are allowed here")
        elif isinstance(x, torch.Tensor):
            problem = tensor_problem(x) or layout_problem(x)
            if problem:
                raise fail(f"holds a tensor that {problem}")
        elif not isinstance(x, (complex, torch.dtype, torch.device)):
            raise fail(f"holds a {type(x).__name__}")


def check_json(obj: Any, what: str, where: str) -> None:
    """`check_plain` for data a JSON document could hold, with a budget of its own."""
    check_plain(obj, what, where, Budget(), json_only=True)


def check_text(x: Any, what: str, where: str, limit: int = MAX_NAME_LEN,
               allow_empty: bool = False) -> str:
    """`x` as a str of at most `limit` characters: a name or path, never coerced from another type."""
    if not isinstance(x, str):
        raise CheckpointError(f"{where}: {what} must be a string, not {show(x)}")
    if len(x) > limit or (not x and not allow_empty):
        size = f"{len(x):,} characters long" if x else "empty"
        raise CheckpointError(f"{where}: {what} is {size}; it must be 1 to {limit:,} characters "
                              f"{'(MAX_PATH_LEN)' if limit == MAX_PATH_LEN else '(MAX_NAME_LEN)'}")
    return str(x)


# --------------------------------------------------------------------------------------------
# a file's values in messages


def show(x: Any, limit: int = 80) -> str:
    """A short, safe description of a value from a file, for a message (never a 10 MB repr, or a
    repr of a 5000-digit int, which Python refuses)."""
    if isinstance(x, bool) or x is None or isinstance(x, float):
        return repr(x)
    if isinstance(x, int):
        return repr(x) if x.bit_length() <= 64 else f"an integer of {x.bit_length():,} bits"
    if isinstance(x, str):
        return repr(x) if len(x) <= limit else f"{x[:limit]!r}... ({len(x):,} characters)"
    if isinstance(x, torch.Tensor):
        return f"a {type(x).__name__} of shape {shape(x.shape)}"
    if isinstance(x, (list, tuple, dict, set, frozenset, bytes)):
        return f"a {type(x).__name__} of {len(x):,} items"
    return f"a {type(x).__name__}"


def shape(dims: Any) -> str:
    return "(" + ", ".join(str(int(n)) for n in dims) + ("," if len(dims) == 1 else "") + ")"


def names(keys: list[Any]) -> str:
    shown = ", ".join(show(k) for k in keys[:5])
    return f"[{shown}{', ...' if len(keys) > 5 else ''}]" + (
        f" ({len(keys):,} in all)" if len(keys) > 5 else "")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
