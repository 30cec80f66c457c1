"""Recurrent ONNX policies: state that one step hands to the next, and how it is carried.

A recurrent policy (a GRU's hidden state) takes, besides the observation, one graph input per
state (batch, *shape) and gives the next state as a graph output. The rule, as the deployment
contract writes it (`CONTRACT_KEY`, `xcompile.onnx.contract.KEYS`): `RULE`. The contract records
each state's input and output names, its shape per batch row, dtype and reset value ("zeros" or
the values); `read_contract` reads that record back, checked against the graph, as untrusted data.

`StatefulPolicy` is the batch policy of such a graph. It keeps one state per episode and speaks
the protocol `xcompile.evaluate.evaluate` uses for stateful policies: `reset_states()` at the start
of a rollout forgets every episode; `set_rows(episodes)` before a call says which episode each row
of the batch continues (an episode seen for the first time starts from the reset value; a call
without it continues episode r in row r). Each row runs as its own batch-1 call, as a controller
runs it on the robot, so an episode's actions never depend on which other episodes share the
batch: a rollout's scores are the same for every `parallel`. With `log` set to a list, each call
appends a `Step` (the rows' episodes, the inputs fed, the outputs): the closed-loop record that
pin-embodiment's and quantize's checks replay (`replay`) and quantize calibrates on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xcompile.errors import ContractError

CONTRACT_KEY = "recurrent_state"
RULE = ("at the start of every episode feed the reset value; afterwards feed each step's output "
        "as the next step's input")
DTYPES = ("float32", "float16", "float64")
MAX_STATE_VALUES = 1 << 20


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state: graph input and output, shape per batch row, dtype, reset value."""

    input: str
    output: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    reset: str | tuple[float, ...] = "zeros"

    def reset_value(self) -> np.ndarray:
        """The state at the start of every episode, of shape `shape`."""
        if isinstance(self.reset, str):
            return np.zeros(self.shape, dtype=self.dtype)
        return np.asarray(self.reset, dtype=self.dtype).reshape(self.shape)

    def as_json(self) -> dict[str, Any]:
        return {"input": self.input, "output": self.output, "shape": list(self.shape),
                "dtype": self.dtype,
                "reset": self.reset if isinstance(self.reset, str) else list(self.reset)}


def contract_value(states: Sequence[StateSpec]) -> str:
    """The contract's `recurrent_state` value: the rule and every state."""
    return json.dumps({"rule": RULE, "states": [s.as_json() for s in states]})


def _state_of(d: Any, i: int, bad: str) -> StateSpec:
    if not isinstance(d, dict) or set(d) != {"input", "output", "shape", "dtype", "reset"}:
        raise ContractError(f"{bad}: states[{i}] is not an object with input, output, shape, "
                            "dtype and reset")
    shape, reset = d["shape"], d["reset"]
    if not (isinstance(d["input"], str) and isinstance(d["output"], str)
            and isinstance(shape, list) and len(shape) <= 8
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)
            and d["dtype"] in DTYPES):
        raise ContractError(f"{bad}: states[{i}] needs string input and output names, a shape "
                            f"of positive integers and a dtype of {', '.join(DTYPES)}")
    size = int(np.prod(shape, dtype=np.int64))
    if size > MAX_STATE_VALUES:
        raise ContractError(f"{bad}: states[{i}] holds {size} values, more than "
                            f"{MAX_STATE_VALUES}")
    if reset != "zeros" and not (
            isinstance(reset, list) and len(reset) == size
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in reset)
            and np.all(np.isfinite(np.asarray(reset, dtype=np.float64)))):
        raise ContractError(f"{bad}: states[{i}].reset is neither \"zeros\" nor a list of "
                            f"{size} finite numbers")
    return StateSpec(d["input"], d["output"], tuple(shape), d["dtype"],
                     "zeros" if reset == "zeros" else tuple(float(v) for v in reset))


def read_contract(meta: Mapping[str, str], inputs: Mapping[str, Sequence[Any]],
                  outputs: Mapping[str, Sequence[Any]], where: Any) -> list[StateSpec]:
    """The recurrent states the contract `meta` records ([] for a feed-forward policy), checked
    against the graph's `inputs` and `outputs` ({name: shape}, dims int or symbolic)."""
    if CONTRACT_KEY not in meta:
        return []
    bad = (f"{where}: the model metadata field '{CONTRACT_KEY}' is damaged; recompile the policy "
           "(xcompile build ... --passes pin-embodiment,export-onnx)")
    try:
        doc = json.loads(meta[CONTRACT_KEY])
        states = doc["states"]
        assert isinstance(states, list) and 1 <= len(states) <= 64
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ContractError(f"{bad}: not a JSON object with a list of 1 to 64 states") from None
    specs = [_state_of(d, i, bad) for i, d in enumerate(states)]
    for s in specs:
        for name, io, kind in ((s.input, inputs, "input"), (s.output, outputs, "output")):
            if name not in io:
                raise ContractError(f"{where}: the contract's recurrent state names graph {kind} "
                                    f"{name!r}, which the model does not have; recompile it")
            dims = list(io[name])[1:]
            if len(dims) != len(s.shape) or any(isinstance(d, int) and d != n
                                                for d, n in zip(dims, s.shape)):
                raise ContractError(f"{where}: graph {kind} {name!r} has shape "
                                    f"{list(io[name])}, but the contract's recurrent state "
                                    f"says [batch, {', '.join(map(str, s.shape))}]; recompile it")
    if len({s.input for s in specs}) != len(specs) or len({s.output for s in specs}) != len(specs):
        raise ContractError(f"{bad}: two states share an input or an output")
    return specs


def session_states(sess: Any, where: Any) -> list[StateSpec]:
    """The recurrent states an onnxruntime session's contract records ([] if none)."""
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    return read_contract(meta, {i.name: i.shape for i in sess.get_inputs()},
                         {o.name: o.shape for o in sess.get_outputs()}, where)


def session_policy(sess: Any, where: Any) -> StatefulPolicy | None:
    """The StatefulPolicy of a session whose contract records recurrent states (None when it
    records none): the observation is its one other input, the action its first output."""
    states = session_states(sess, where)
    if not states:
        return None
    ins = [i.name for i in sess.get_inputs() if i.name not in {s.input for s in states}]
    outs = [o.name for o in sess.get_outputs()]
    if len(ins) != 1 or outs[0] in {s.output for s in states}:
        raise ContractError(f"{where}: a recurrent policy takes one observation input besides "
                            f"its state inputs and returns the action first; this one takes "
                            f"{ins} and returns {outs}")
    return StatefulPolicy.of_session(sess, ins[0], outs[0], states)


def random_states(states: Sequence[StateSpec], n: int, rng: np.random.Generator
                  ) -> dict[str, np.ndarray]:
    """{state input: n random states} (standard normal), for checks on random inputs."""
    return {s.input: rng.standard_normal((n, *s.shape)).astype(s.dtype) for s in states}


@dataclass
class Step:
    """One call of a StatefulPolicy: the episode of each row, the inputs fed, the outputs."""

    rows: list[int]
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


class StatefulPolicy:
    """The batch policy of a recurrent graph, one state per episode (see the module docstring)."""

    def __init__(self, run: Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]],
                 obs: str, action: str, states: Sequence[StateSpec],
                 feeds: Mapping[str, np.ndarray] | None = None) -> None:
        self._run, self._obs, self._action = run, obs, action
        self._specs = list(states)
        self._feeds = dict(feeds or {})
        self._names = [action, *(s.output for s in self._specs)]
        self._reset = {s.input: s.reset_value()[None] for s in self._specs}
        self._state: dict[int, dict[str, np.ndarray]] = {}
        self._rows: list[int] | None = None
        self.log: list[Step] | None = None

    @classmethod
    def of_session(cls, sess: Any, obs: str, action: str, states: Sequence[StateSpec],
                   feeds: Mapping[str, np.ndarray] | None = None) -> StatefulPolicy:
        return cls(sess.run, obs, action, states, feeds)

    @property
    def states(self) -> list[StateSpec]:
        return list(self._specs)

    @property
    def obs_name(self) -> str:
        return self._obs

    @property
    def action_name(self) -> str:
        return self._action

    def reset_states(self) -> None:
        """Forget every episode's state (the start of a rollout)."""
        self._state.clear()
        self._rows = None

    def set_rows(self, episodes: Sequence[int]) -> None:
        """Row r of the next call continues episode `episodes[r]`."""
        self._rows = [int(e) for e in episodes]

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        x = np.asarray(obs, dtype=np.float32)
        rows, self._rows = (self._rows if self._rows is not None else list(range(len(x)))), None
        if len(rows) != len(x) or len(set(rows)) != len(rows):
            raise ContractError(f"a recurrent policy was told episodes {rows[:8]} for a batch of "
                                f"{len(x)} rows; give one distinct episode per row")
        fed: list[dict[str, np.ndarray]] = []
        outs: list[list[np.ndarray]] = []
        for r, ep in enumerate(rows):
            state = self._state.get(ep, self._reset)
            res = self._run(self._names, {self._obs: x[r:r + 1], **self._feeds, **state})
            self._state[ep] = {s.input: np.asarray(res[1 + j], dtype=s.dtype).reshape(
                (1, *s.shape)) for j, s in enumerate(self._specs)}
            fed.append(state)
            outs.append(res)
        actions = np.concatenate([o[0] for o in outs]) if outs else np.zeros((0, 0), np.float32)
        if self.log is not None and rows:
            self.log.append(Step(
                list(rows),
                {self._obs: x.copy(), **{s.input: np.concatenate([f[s.input] for f in fed])
                                         for s in self._specs}},
                {name: np.concatenate([o[k] for o in outs])
                 for k, name in enumerate(self._names)}))
        return actions


def replay(policy: StatefulPolicy, steps: Sequence[Step], obs: str) -> list[Step]:
    """Drive `policy` through the calls `steps` recorded (the same episodes per row, the same
    observations), its own state carried; returns its own record of those calls."""
    log, policy.log = policy.log, []
    try:
        policy.reset_states()
        for step in steps:
            policy.set_rows(step.rows)
            policy(step.inputs[obs])
        return policy.log
    finally:
        policy.log = log


def max_step_error(got: Sequence[Step], want: Sequence[Step]) -> float:
    """Largest |got - want| over every output of every recorded call (inf if they differ in
    shape or number)."""
    if len(got) != len(want):
        return float("inf")
    err = 0.0
    for g, w in zip(got, want):
        for name, wv in w.outputs.items():
            gv = g.outputs.get(name)
            if gv is None or gv.shape != wv.shape:
                return float("inf")
            if wv.size:
                e = float(np.abs(gv.astype(np.float64) - wv).max())
                err = max(err, e) if e == e else float("inf")     # NaN: no match
    return err


def stacked_inputs(steps: Sequence[Step]) -> dict[str, np.ndarray]:
    """Every input the recorded calls fed, rows concatenated (quantize's calibration data)."""
    if not steps:
        return {}
    return {k: np.concatenate([s.inputs[k] for s in steps]) for k in steps[0].inputs}
