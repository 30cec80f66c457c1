"""`make_executor`: an executor by name, with its options checked (one-line errors); and the
executor of the current context (`use_executor`, `current_executor`) for code that runs rollouts
without being handed one."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from xcompile.errors import XCompileError
from xcompile.executors.pools import (
    EXECUTORS,
    MAX_WORKERS,
    Executor,
    ProcessExecutor,
    SerialExecutor,
    default_workers,
)
from xcompile.executors.ray_pool import RayExecutor


def make_executor(name: str = "serial", workers: int | None = None,
                  ray_address: str | None = None) -> Executor:
    """The executor called `name` with `workers` workers (default: the cores this process may
    use; serial: 1). `ray_address` (ray only): "auto" or HOST:PORT of a running cluster; without
    it a local Ray instance is started and shut down again on close."""
    if name not in EXECUTORS:
        raise XCompileError(f"unknown executor {name!r}: choose one of {', '.join(EXECUTORS)}")
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise XCompileError(f"--workers must be from 1 to {MAX_WORKERS}, got {workers}")
    if ray_address is not None and name != "ray":
        raise XCompileError(f"--ray-address is for --executor ray, not {name}")
    if name == "serial":
        if workers not in (None, 1):
            raise XCompileError("--executor serial runs one task at a time: drop --workers, or "
                                "choose --executor process")
        return SerialExecutor()
    if name == "process":
        return ProcessExecutor(workers or default_workers())
    return RayExecutor(workers, ray_address)


_CURRENT: contextvars.ContextVar[Executor | None] = contextvars.ContextVar("xcompile_executor",
                                                                          default=None)


def current_executor() -> Executor | str:
    """The executor set by `use_executor` for this context, else "serial" (in this process)."""
    return _CURRENT.get() or "serial"


@contextlib.contextmanager
def use_executor(ex: Executor) -> Iterator[Executor]:
    """Run the block's rollouts that ask `current_executor()` (e.g. a build's scoring) on `ex`."""
    token = _CURRENT.set(ex)
    try:
        yield ex
    finally:
        _CURRENT.reset(token)
