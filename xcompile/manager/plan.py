"""Plan checking: refuse a plan that cannot run before anything runs, and say how to fix it.

Unknown passes (with the closest name), duplicates, and formats that do not chain (with the pass to
add or move): each pass declares the artifact format it takes and the one it makes; a recurrent
policy (the input, or what a pass's config makes: `makes_recurrent`) and a later pass that does
not take one (its `refuses_recurrent` says why).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from xcompile.errors import PlanError
from xcompile.passes.base import Pass, all_passes

INPUT_FORMAT = "fat-checkpoint"
FAT_FORMATS = (INPUT_FORMAT, "fat-graph")     # a build's fat inputs: ours, and a foreign graph


class Named(Protocol):
    """A plan step (`settings.PlanStep`), as far as checking a plan needs it."""

    name: str


Step = str | Named | tuple[str, Any]


def format_plan(plan: Sequence[Step]) -> str:
    return ",".join(_step_name(s) for s in plan)


def _step_config(s: Step) -> Any:
    """The step's config, where it has one."""
    if isinstance(s, tuple):
        return s[1] if len(s) > 1 else None
    return getattr(s, "config", None)


def _step_name(s: Step) -> str:
    if isinstance(s, str):
        return s
    if isinstance(s, tuple):
        return s[0]
    return s.name


def validate_plan(plan: Sequence[Step],
                  input_format: str = INPUT_FORMAT, recurrent: bool = False) -> None:
    """Refuse a plan that cannot run, before anything runs; the message says how to fix it.
    `recurrent`: the input is a recurrent policy, which a pass with `refuses_recurrent` refuses."""
    names = [_step_name(s) for s in plan]
    if not names:
        raise PlanError("the plan is empty: give at least one pass, e.g. --passes pin-embodiment")
    known = all_passes()
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(n, list(known), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise PlanError(f"unknown pass '{n}'.{hint} Known passes: {', '.join(known)} "
                            "(see `xcompile passes`)")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise PlanError(f"pass '{n}' appears twice in the plan (positions {seen[n] + 1} and "
                            f"{i + 1}): each pass runs once; remove one")
        seen[n] = i

    fmt = input_format
    for i, n in enumerate(names):
        cls = known[n]
        if fmt not in cls.takes():
            msg = _format_fix(n, cls.input_format, fmt, names, i, known)
            others = [f for f in cls.takes() if f != cls.input_format]
            raise PlanError(msg + (f" ({n} also takes {' or '.join(others)})" if others else ""))
        fmt = cls.output_for(fmt)
        if recurrent and cls.refuses_recurrent:
            raise PlanError(cls.refuses_recurrent)
        made = cls.makes_recurrent(_step_config(plan[i]))
        recurrent = recurrent if made is None else made


def _format_fix(name: str, wants: str, gets: str, names: list[str], i: int,
                known: Mapping[str, type[Pass]]) -> str:
    msg = f"{name} takes {wants} but gets {gets} here"
    if i == 0:
        msg = f"{name} takes {wants} but the build starts from a {gets}"
    bridges = [p for p, c in known.items() if gets in c.takes() and c.output_for(gets) == wants]
    later = [b for b in bridges if b in names[i + 1:]]
    if later:
        return f"{msg}: move {later[0]} before {name}"
    if bridges and bridges[0] not in names:
        return f"{msg}: put {bridges[0]} before it"
    earlier_makers = [p for p in names[:i] if known[p].output_format == wants]
    if earlier_makers:
        return (f"{msg}: move {name} right after {earlier_makers[-1]} "
                f"(the plan order is {','.join(names)})")
    makers = [p for p, c in known.items() if c.output_format == wants]
    if makers:
        return (f"{msg}: {name} needs {wants}, made by {', '.join(makers)}; reorder the plan "
                f"({','.join(names)}) so that one of them runs first")
    return f"{msg}: nothing makes {wants}; remove {name} from the plan"
