"""Executors: where independent tasks run — in this process, in a local process pool, or on Ray.

An executor maps a module-level function over a list of plain-data items and returns the results in
the items' order, whatever order they finished in:

- `serial`: in this process, one after another (today's behaviour; the default, and what tests
  embed);
- `process`: a local pool of `workers` processes started with the "spawn" context (PyBullet and
  torch do not survive a fork taken after their threads started); each worker runs torch on one
  thread, so N workers use N cores;
- `ray`: Ray (`xcompile.executors.ray_pool`), local or on a cluster.

Tasks receive plain data (paths, names, JSON-able settings), never pickled modules or closures: a
worker loads what it needs from files itself, through the same checked loaders as the command
line. `stateful=True` asks for long-lived workers that keep what they load between tasks (a
process pool's workers already are; on Ray it means actors rather than tasks).

`map(..., errors=True)` returns a `TaskError` in the place of a task that raised (or whose worker
died) instead of raising, so that one failing item does not lose the others.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from xcompile.errors import XCompileError

EXECUTORS = ("serial", "process", "ray")
MAX_WORKERS = 256

OnDone = Callable[[int, Any], None]


@dataclass
class TaskError:
    """What a failed task left: its exception's type and message, and an exit code for the CLI."""

    kind: str
    message: str
    exit_code: int = 1

    @classmethod
    def of(cls, e: BaseException) -> TaskError:
        code = e.exit_code if isinstance(e, XCompileError) else 1
        first = (str(e).strip().splitlines() or [""])[0]
        return cls(type(e).__name__, first or repr(e), code)

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


class Executor:
    """Base class: `map` a module-level function over plain-data items, results in item order."""

    name = "serial"

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, int(workers))

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], *, on_done: OnDone | None = None,
            errors: bool = False, stateful: bool = False) -> list[Any]:
        out: list[Any] = []
        for i, item in enumerate(items):
            try:
                res = fn(item)
            except XCompileError as e:
                if not errors:
                    raise
                res = TaskError.of(e)
            except Exception as e:      # noqa: BLE001 (a bug in one task: keep the others)
                if not errors:
                    raise
                res = TaskError.of(e)
            out.append(res)
            if on_done:
                on_done(i, res)
        return out

    def describe(self) -> str:
        return "in this process"

    def close(self) -> None: ...

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialExecutor(Executor):
    name = "serial"


def _worker_init() -> None:
    """A pool worker: torch on one thread (N workers share N cores without oversubscribing)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:                 # pragma: no cover (torch is a dependency)
        pass


class ProcessExecutor(Executor):
    """A local pool of `workers` spawned processes, started on first use and kept until close."""

    name = "process"

    def __init__(self, workers: int = 2) -> None:
        super().__init__(workers)
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing

            self._pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init)
        return self._pool

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], *, on_done: OnDone | None = None,
            errors: bool = False, stateful: bool = False) -> list[Any]:
        pool = self._get_pool()
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        out: list[Any] = [None] * len(items)
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in sorted(done, key=futures.__getitem__):
                    i = futures[f]
                    try:
                        out[i] = f.result()
                    except BrokenProcessPool as e:
                        if not errors:
                            raise XCompileError(
                                "a worker process of the process executor died (out of memory, "
                                f"or killed): {e}; try fewer --workers") from None
                        out[i] = TaskError("WorkerDied", f"its worker process died ({e})")
                    except Exception as e:      # noqa: BLE001 (reported, or re-raised below)
                        if not errors:
                            raise
                        out[i] = TaskError.of(e)
                    if on_done:
                        on_done(i, out[i])
        except BaseException:
            for f in pending:
                f.cancel()
            raise
        return out

    def describe(self) -> str:
        return f"on a local pool of {self.workers} processes"

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:              # pragma: no cover (not Linux)
        return max(1, os.cpu_count() or 1)
