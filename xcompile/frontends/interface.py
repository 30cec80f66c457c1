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

The observation is xcompile's own flat layout for the target's family (`xcompile.sim.env`,
`obs_layout`) and the action is the target's (joint order, `default_pose + action_scale * a`,
clipped), as in the deployment contract. `read_interface` validates the file on its own (pydantic);
`check_interface` checks it against the graph's inputs and outputs and the robot target. Every
refusal is one `InterfaceError` line that names the field and what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xcompile.errors import CheckpointError
from xcompile.targets import RobotTarget
from xcompile.targets.loader import tomllib

FORMAT = "xcompile-interface/1"
MAX_INTERFACE_BYTES = 1 << 20      # a description, not a data file
MAX_BODIES = 1024
MAX_VALUES = 65536                 # elements of one body's value for one input
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"     # robot names, as targets spell them


class InterfaceError(CheckpointError):
    """An interface description is invalid or does not fit the model or the target."""


class Interface(BaseModel):
    """A validated interface description (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["xcompile-interface/1"] = Field(description="the format and its version")
    observation: str = Field(min_length=1, max_length=256,
                             description="graph input that takes the flat observation")
    action: str = Field(min_length=1, max_length=256, description="graph output: the action")
    family: Literal["locomotion", "reach"] = Field(description="the task family it serves")
    bodies: dict[str, dict[str, Any]] = Field(
        min_length=1, max_length=MAX_BODIES,
        description="body name -> {graph input: value} for every embodiment input")


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
        if err["type"] == "missing":
            msg = "missing: expected " + (Interface.model_fields[str(err["loc"][0])].description
                                          or "a value")
        elif err["type"] == "extra_forbidden":
            msg = (f"unknown field; expected one of {', '.join(Interface.model_fields)}")
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
    return iface


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
    if isinstance(obs.shape[0], int) and obs.shape[0] != 1:
        raise InterfaceError(f"{where}: observation: graph input {obs.name!r} has a fixed batch "
                             f"of {obs.shape[0]}; export it with a dynamic batch dimension")
    act = outs[iface.action]
    if len(act.shape) != 2 or (isinstance(act.shape[1], int)
                               and act.shape[1] != robot.n_joints):
        raise InterfaceError(f"{where}: action: graph output {act.name!r} has shape "
                             f"{list(act.shape)}; expected [batch, {robot.n_joints}] (the joints "
                             f"of {robot.name})")
    for body, table in iface.bodies.items():
        _body_values(table, ins, iface.observation, f"{where}: bodies.{body}")
    if robot.name not in iface.bodies:
        raise InterfaceError(f"{where}: bodies: no [bodies.{robot.name}] table; the fat policy "
                             f"serves {', '.join(sorted(iface.bodies))}; pick one of those "
                             f"targets or add a table for {robot.name}")
    return _body_values(iface.bodies[robot.name], ins, iface.observation,
                        f"{where}: bodies.{robot.name}")


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


def check_body_table(iface: Interface, inputs: Sequence[GraphInput],
                     outputs: Sequence[GraphInput], body: str, where: str
                     ) -> dict[str, np.ndarray]:
    """{input: value} of one body's table, checked against the graph's inputs (not a target)."""
    ins, _ = _named_io(iface, inputs, outputs, where)
    return _body_values(iface.bodies[body], ins, iface.observation, f"{where}: bodies.{body}")


def _body_values(table: Mapping[str, Any], ins: Mapping[str, GraphInput], obs_name: str,
                 where: str) -> dict[str, np.ndarray]:
    need = [n for n in ins if n != obs_name]
    for name in table:
        if name not in need:
            raise InterfaceError(f"{where}.{name}: no such embodiment input; the graph's inputs "
                                 f"other than the observation are {', '.join(need) or 'none'}")
    values: dict[str, np.ndarray] = {}
    for name in need:
        gi = ins[name]
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
