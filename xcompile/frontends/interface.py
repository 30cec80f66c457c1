"""The interface description of a foreign fat policy: how to drive it for one body.

A small TOML file (`--interface fat.toml`):

    format = "xcompile-interface/1"
    observation = "obs"          # graph input: the flat observation (batch first)
    action = "action"            # graph output: the action, in the target's joint order
    family = "locomotion"        # the task family it serves

    [bodies.a1]                  # one table per body it serves: a value for every other input
    body_id = [1]                # a list literal (dtype and shape from the graph input)
    [bodies.spot]
    body_id = [0]

    [recurrent]                  # optional: a stateful policy (a GRU's hidden state)
    [[recurrent.state]]          # one table per state
    input = "h_in"               # graph input that takes the state (batch, *shape)
    output = "h_out"             # graph output that gives the next state
    shape = [16]                 # per batch row
    dtype = "float32"
    reset = "zeros"              # or the values: the state at the start of every episode

The observation is xcompile's own flat layout for the target's family (`xcompile.sim.env`,
`obs_layout`) and the action is the target's (joint order, `default_pose + action_scale * a`,
clipped), as in the deployment contract. State inputs are not embodiment inputs. A graph with no
embodiment input (a policy that infers its body) needs no `[bodies.*]` table and then serves any
target of its family. `read_interface` validates the file on its own (pydantic);
`check_interface` checks it against the graph's inputs and outputs and the robot target. Every
refusal is one `InterfaceError` line that names the field and what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xcompile.errors import InterfaceError  # noqa: F401  (re-exported: its home was here)
from xcompile.onnx.recurrent import DTYPES, MAX_STATE_VALUES, StateSpec
from xcompile.targets import RobotTarget
from xcompile.targets.loader import tomllib

FORMAT = "xcompile-interface/1"
MAX_INTERFACE_BYTES = 1 << 20      # a description, not a data file
MAX_BODIES = 1024
MAX_VALUES = 65536                 # elements of one body's value for one input
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"     # robot names, as targets spell them


class StateEntry(BaseModel):
    """One `[[recurrent.state]]` table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(min_length=1, max_length=256,
                       description="graph input that takes the state (batch, *shape)")
    output: str = Field(min_length=1, max_length=256,
                        description="graph output that gives the next state")
    shape: list[Annotated[int, Field(ge=1, le=MAX_STATE_VALUES)]] = Field(
        max_length=8, description="the state's shape per batch row, a list of integers")
    dtype: Literal["float32", "float16", "float64"] = Field(
        "float32", description="the state's element type")
    reset: Any = Field("zeros", description='"zeros" or a list of numbers: the state at the start '
                       "of every episode")


class Recurrent(BaseModel):
    """The `[recurrent]` table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state: list[StateEntry] = Field(min_length=1, max_length=64,
                                    description="[[recurrent.state]] tables, one per state")


class ObsSlice(BaseModel):
    """One `obs_layout` entry: a named slice of the flat observation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=256)
    size: Annotated[int, Field(ge=1, le=MAX_VALUES)]


class ActionSpec(BaseModel):
    """The `[action_spec]` table: what the policy's action means."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    order: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        max_length=1024, description="the action's entries in order (joint or rotor names)")
    range: tuple[float, float] | None = Field(None, description="[lo, hi] of a valid action")
    clip: float | None = Field(None, gt=0, description="actions are clipped to [-clip, clip]")


class Interface(BaseModel):
    """A validated interface description (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["xcompile-interface/1"] = Field(description="the format and its version")
    observation: str = Field(min_length=1, max_length=256,
                             description="graph input that takes the flat observation")
    action: str = Field(min_length=1, max_length=256, description="graph output: the action")
    family: Literal["locomotion", "reach", "quadrotor"] = Field(
        description="the task family it serves")
    bodies: dict[str, dict[str, Any]] = Field(
        default_factory=dict, max_length=MAX_BODIES,
        description="body name -> {graph input: value} for every embodiment input")
    recurrent: Recurrent | None = Field(
        None, description="[[recurrent.state]] tables: the state a recurrent policy carries")
    # What the policy expects of the world, checked against the target when given:
    control_period_s: float | None = Field(None, gt=0, description="seconds per policy step")
    frame: Literal["FLU"] | None = Field(None, description="axis convention (quadrotor: FLU)")
    obs_layout: list[ObsSlice] | None = Field(
        None, max_length=256, description="the observation's slices in order ({name, size})")
    action_spec: ActionSpec | None = Field(None, description="[action_spec]: order, range, clip")
    source: dict[str, Any] | None = Field(None, description="[source]: provenance, kept as is")


@dataclass(frozen=True)
class GraphInput:
    """A graph input or output: name, element type (numpy) and shape (int or a symbol name)."""

    name: str
    dtype: Any
    shape: tuple[int | str, ...]


def _where(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc) or "(file)"


def read_interface(path: str | Path) -> Interface:
    """The interface description at `path`, validated on its own; InterfaceError otherwise."""
    path = Path(path)
    try:
        if not path.is_file():
            raise InterfaceError(f"interface file {str(path)!r} does not exist (or is not a "
                                 "file); check the --interface path")
        data = path.read_bytes()[:MAX_INTERFACE_BYTES + 1]
    except OSError as e:
        raise InterfaceError(f"{path}: cannot read the interface file ({e.strerror or e})") \
            from None
    if len(data) > MAX_INTERFACE_BYTES:
        raise InterfaceError(f"{path}: more than {MAX_INTERFACE_BYTES} bytes; an interface "
                             "description is a short TOML file")
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InterfaceError(f"{path}: not valid TOML ({e})") from None
    return parse_interface(raw, str(path))


def parse_interface(raw: Mapping[str, Any], where: str = "the interface") -> Interface:
    if raw.get("format") not in (None, FORMAT):
        raise InterfaceError(f"{where}: format: expected {FORMAT!r}, got {raw['format']!r:.80}")
    try:
        iface = Interface.model_validate(dict(raw))
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = _where(err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        model = _model_at(err["loc"][:-1])
        if err["type"] == "missing" and model is not None:
            msg = "missing: expected " + (model.model_fields[str(err["loc"][-1])].description
                                          or "a value")
        elif err["type"] == "extra_forbidden" and model is not None:
            msg = (f"unknown field; expected one of {', '.join(model.model_fields)}")
        raise InterfaceError(f"{where}: {loc}: {msg}") from None
    for body, table in iface.bodies.items():
        if not re.match(NAME, body):
            raise InterfaceError(f"{where}: bodies.{body[:80]}: not a robot name "
                                 "([A-Za-z0-9][A-Za-z0-9_.-]{0,63})")
        if not isinstance(table, dict):
            raise InterfaceError(f"{where}: bodies.{body}: expected a table of graph input "
                                 "values ([bodies." + body + "])")
        for name, value in table.items():
            _as_array(value, np.float64, f"{where}: bodies.{body}.{name}")
    state_specs(iface, where)
    return iface


def _model_at(loc: Sequence[Any]) -> type[BaseModel] | None:
    """The pydantic model at `loc` (a field path below Interface; list indices skipped)."""
    nested: dict[str, type[BaseModel]] = {"recurrent": Recurrent, "state": StateEntry,
                                          "obs_layout": ObsSlice, "action_spec": ActionSpec}
    model: type[BaseModel] = Interface
    for part in loc:
        if isinstance(part, int):
            continue
        if str(part) not in model.model_fields or str(part) not in nested:
            return None
        model = nested[str(part)]
    return model


def state_specs(iface: Interface, where: str = "the interface") -> list[StateSpec]:
    """The interface's recurrent states ([] for a feed-forward policy), checked on their own."""
    if iface.recurrent is None:
        return []
    specs, seen = [], set()
    for i, st in enumerate(iface.recurrent.state):
        at = f"{where}: recurrent.state.{i}"
        for field, name in (("input", st.input), ("output", st.output)):
            if name in ("obs", "action"):
                raise InterfaceError(f"{at}.{field}: {name!r} is a name the pinned policy gives "
                                     "its observation or action; a state needs another name")
            if name in (iface.observation, iface.action):
                raise InterfaceError(f"{at}.{field}: {name!r} is the observation or the action, "
                                     "not a state")
            if (field, name) in seen:
                raise InterfaceError(f"{at}.{field}: {name!r} is already another state's {field}")
            seen.add((field, name))
        size = int(np.prod(st.shape, dtype=np.int64))
        if size > MAX_STATE_VALUES:
            raise InterfaceError(f"{at}.shape: {size} values per row, more than the limit of "
                                 f"{MAX_STATE_VALUES}")
        reset: str | tuple[float, ...] = "zeros"
        if st.reset != "zeros" and not isinstance(st.reset, list):
            raise InterfaceError(f'{at}.reset: expected "zeros" or a list of numbers, got '
                                 f"{st.reset!r:.40}")
        if isinstance(st.reset, list):
            values = _as_array(st.reset, np.float64, f"{at}.reset")
            if values.size != size:
                raise InterfaceError(f"{at}.reset: {values.size} values, but the state has shape "
                                     f"{st.shape} ({size} values); give {size} numbers or "
                                     '"zeros"')
            reset = tuple(float(v) for v in values)
        assert st.dtype in DTYPES
        specs.append(StateSpec(st.input, st.output, tuple(st.shape), st.dtype, reset))
    return specs


def _as_array(value: Any, dtype: Any, what: str) -> np.ndarray:
    """`value` (a number or nested list of numbers) as an array of `dtype`."""
    def flat(v: Any, depth: int = 0) -> list[Any]:
        if depth > 8:
            raise InterfaceError(f"{what}: nested more than 8 levels deep")
        if isinstance(v, list):
            return [x for item in v for x in flat(item, depth + 1)]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InterfaceError(f"{what}: expected a number or a list of numbers, got "
                                 f"{type(v).__name__} {v!r:.40}")
        return [v]

    values = flat(value)
    if len(values) > MAX_VALUES:
        raise InterfaceError(f"{what}: {len(values)} values, more than the limit of {MAX_VALUES}")
    arr = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise InterfaceError(f"{what}: values must be finite numbers")
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        if not np.all(arr == np.round(arr)):
            raise InterfaceError(f"{what}: expected integers (the graph input is "
                                 f"{np.dtype(dtype).name}), got {values[:4]}")
    return arr.astype(dtype)


def check_interface(iface: Interface, inputs: Sequence[GraphInput], outputs: Sequence[GraphInput],
                    robot: RobotTarget, obs_width: int, where: str) -> dict[str, np.ndarray]:
    """Check `iface` against the graph and the robot; return {input: value} for `robot`."""
    from xcompile.frontends.conventions import check_conventions

    if robot.family != iface.family:
        raise InterfaceError(f"{where}: family: the fat policy serves {iface.family!r}, but "
                             f"target {robot.name!r} does {robot.family!r}; pick a "
                             f"{iface.family} target")
    ins, outs = _named_io(iface, inputs, outputs, where)
    obs = ins[iface.observation]
    if obs.dtype != np.float32 or len(obs.shape) != 2:
        raise InterfaceError(f"{where}: observation: graph input {obs.name!r} is "
                             f"{np.dtype(obs.dtype).name} of shape {list(obs.shape)}; expected "
                             "float32 of shape [batch, width]")
    if obs.shape[1] != obs_width:
        raise InterfaceError(f"{where}: observation: graph input {obs.name!r} has width "
                             f"{obs.shape[1]}, but target {robot.name!r} ({robot.family}) gives "
                             f"{obs_width} (xcompile's flat {robot.family} observation)")
    _dynamic_batch(obs, f"{where}: observation", "input")
    act = outs[iface.action]
    if len(act.shape) != 2 or (isinstance(act.shape[1], int)
                               and act.shape[1] != robot.n_joints):
        raise InterfaceError(f"{where}: action: graph output {act.name!r} has shape "
                             f"{list(act.shape)}; expected [batch, {robot.n_joints}] (the joints "
                             f"of {robot.name})")
    states = check_states(iface, ins, outs, where)
    check_conventions(iface, robot, where)     # frontends/conventions.py
    skip = {iface.observation, *(st.input for st in states)}
    for body, table in iface.bodies.items():
        _body_values(table, ins, skip, f"{where}: bodies.{body}")
    if not iface.bodies:
        return _body_values({}, ins, skip, f"{where}: bodies")
    if robot.name not in iface.bodies:
        raise InterfaceError(f"{where}: bodies: no [bodies.{robot.name}] table; the fat policy "
                             f"serves {', '.join(sorted(iface.bodies))}; pick one of those "
                             f"targets or add a table for {robot.name}")
    return _body_values(iface.bodies[robot.name], ins, skip, f"{where}: bodies.{robot.name}")


def check_states(iface: Interface, ins: Mapping[str, GraphInput], outs: Mapping[str, GraphInput],
                 where: str) -> list[StateSpec]:
    """The interface's recurrent states, checked against the graph's inputs and outputs."""
    states = state_specs(iface, where)
    for i, st in enumerate(states):
        for field, name, io, kind in (("input", st.input, ins, "input"),
                                      ("output", st.output, outs, "output")):
            at = f"{where}: recurrent.state.{i}.{field}"
            if name not in io:
                raise InterfaceError(f"{at}: graph {kind} {name!r} does not exist; the graph's "
                                     f"{kind}s are {', '.join(io) or 'none'}")
            g = io[name]
            want = f"{st.dtype} of shape [batch, {', '.join(map(str, st.shape))}]"
            shape_ok = len(g.shape) == 1 + len(st.shape) and all(
                not isinstance(d, int) or d == n for d, n in zip(g.shape[1:], st.shape))
            if np.dtype(g.dtype) != np.dtype(st.dtype) or not shape_ok:
                raise InterfaceError(f"{at}: graph {kind} {name!r} is {np.dtype(g.dtype).name} "
                                     f"of shape {list(g.shape)}; the state's shape and dtype say "
                                     f"{want}")
            _dynamic_batch(g, at, kind)
    return states


def _dynamic_batch(g: GraphInput, at: str, kind: str) -> None:
    if isinstance(g.shape[0], int) and g.shape[0] != 1:
        raise InterfaceError(f"{at}: graph {kind} {g.name!r} has a fixed batch of {g.shape[0]}; "
                             "export it with a dynamic batch dimension")


def _named_io(iface: Interface, inputs: Sequence[GraphInput], outputs: Sequence[GraphInput],
              where: str) -> tuple[dict[str, GraphInput], dict[str, GraphInput]]:
    """The graph's inputs and outputs by name, with the interface's observation and action."""
    ins = {i.name: i for i in inputs}
    outs = {o.name: o for o in outputs}
    if iface.observation not in ins:
        raise InterfaceError(f"{where}: observation: graph input {iface.observation!r} does not "
                             f"exist; the graph's inputs are {', '.join(ins) or 'none'}")
    if iface.action not in outs:
        raise InterfaceError(f"{where}: action: graph output {iface.action!r} does not exist; the "
                             f"graph's outputs are {', '.join(outs) or 'none'}")
    return ins, outs


def check_bodies(iface: Interface, inputs: Sequence[GraphInput], outputs: Sequence[GraphInput],
                 where: str) -> tuple[list[StateSpec], dict[str, dict[str, np.ndarray]]]:
    """The recurrent states and every body's {input: value}, checked against the graph's inputs
    and outputs (not against a target)."""
    ins, outs = _named_io(iface, inputs, outputs, where)
    states = check_states(iface, ins, outs, where)
    skip = {iface.observation, *(st.input for st in states)}
    return states, {body: _body_values(table, ins, skip, f"{where}: bodies.{body}")
                    for body, table in iface.bodies.items()}


def _body_values(table: Mapping[str, Any], ins: Mapping[str, GraphInput], skip: set[str],
                 where: str) -> dict[str, np.ndarray]:
    need = [n for n in ins if n not in skip]
    for name in table:
        if name not in need:
            raise InterfaceError(f"{where}.{name}: no such embodiment input; the graph's inputs "
                                 "other than the observation and the recurrent state are "
                                 f"{', '.join(need) or 'none'}")
    values: dict[str, np.ndarray] = {}
    for name in need:
        gi = ins[name]
        if name not in table and where.endswith(": bodies"):
            raise InterfaceError(f"{where}: the graph has embodiment inputs "
                                 f"({', '.join(need)}); give a [bodies.NAME] table with a value "
                                 "for each, one table per body the policy serves (or, for a "
                                 "recurrent state, a [[recurrent.state]] table)")
        if name not in table:
            raise InterfaceError(f"{where}: no value for graph input {name!r}; give "
                                 f"{name} = [...] ({np.dtype(gi.dtype).name}, shape "
                                 f"{list(gi.shape)})")
        if not all(isinstance(d, int) for d in gi.shape):
            raise InterfaceError(f"{where}.{name}: graph input {name!r} has shape "
                                 f"{list(gi.shape)} with a dynamic dimension; embodiment inputs "
                                 "must have a fixed shape (broadcast over the batch in the model)")
        arr = _as_array(table[name], gi.dtype, f"{where}.{name}")
        size = int(np.prod(gi.shape, dtype=np.int64))
        if arr.size != size:
            raise InterfaceError(f"{where}.{name}: {arr.size} values, but graph input {name!r} "
                                 f"has shape {list(gi.shape)} ({size} values)")
        values[name] = arr.reshape(gi.shape)
    return values
