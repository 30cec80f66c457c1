"""The Ray executor: tasks (and, for rollouts, actors) on a local Ray instance or a cluster.

Without an address it starts a local Ray instance of `workers` CPUs (no dashboard, worker logs
kept out of the terminal) and shuts it down on close; with `--ray-address auto|HOST:PORT` it joins
a running cluster (a HOST:PORT that does not answer within a few seconds is an error, never a
hang) and leaves it running. Stateless maps (fleet targets) are Ray tasks of one CPU each;
stateful maps (rollouts) go to long-lived actors, one per worker, each with its own PyBullet
clients and its own cache of loaded policies. Items and results are plain data; artifacts move
through files, so on a cluster the checkpoint, the cache folder and the output folder must lie on
a file system every node sees, and every node needs xcompile installed.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

from xcompile.errors import XCompileError
from xcompile.executors.pools import Executor, OnDone, TaskError, _worker_init, default_workers

CONNECT_TIMEOUT_S = 5.0


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise XCompileError("--executor ray needs Ray, which is not installed: pip install "
                            "'xcompile[ray]'") from None
    return ray


def probe_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise XCompileError unless HOST:PORT (or ray://HOST:PORT) accepts a TCP connection."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise XCompileError(f"--ray-address {address!r}: give auto or HOST:PORT (the address "
                            "`ray start --head` printed, e.g. 10.0.0.5:6379)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise XCompileError(f"the Ray cluster at {address} does not answer ({e.strerror or e}; "
                            f"timeout {timeout:g} s): check the address and that `ray start "
                            "--head` runs there") from None


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    _worker_init()
    return fn(item)


class _Worker:
    """A rollout actor: runs tasks one after another in its own process (and keeps that
    process's caches, e.g. loaded policies, between them)."""

    def __init__(self) -> None:
        _worker_init()

    def call(self, fn: Callable[[Any], Any], item: Any) -> Any:
        return fn(item)


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        ray = import_ray()
        self.ray = ray
        self.address = address
        self.started = False
        self._actors: list[Any] = []
        if not ray.is_initialized():
            if address is not None:
                probe_address(address)
                try:
                    ray.init(address=address, log_to_driver=False, configure_logging=False)
                except Exception as e:  # noqa: BLE001 (Ray raises ConnectionError, RuntimeError...)
                    raise XCompileError(f"could not join the Ray cluster at {address}: "
                                        f"{str(e).strip().splitlines()[0] if str(e) else e}"
                                        ) from None
            else:
                # Ray starts its workers at nice 15, below anything else on the machine (its own
                # daemons, the driver): on a small machine whose cores they fill, every other
                # process takes its share first (2 cores, one busy process beside 2 workers: a
                # PyBullet loop took 1.18 s at nice 15, 0.84 s at nice 0). The workers are the
                # work here, so a local instance runs them at the driver's priority.
                os.environ.setdefault("RAY_worker_niceness", "0")
                ray.init(num_cpus=workers or default_workers(), include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
                self.started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        super().__init__(workers or cpus)
        self._task = ray.remote(num_cpus=1, max_retries=0)(_call)
        self._actor_cls = ray.remote(num_cpus=1, max_restarts=0)(_Worker)

    def describe(self) -> str:
        where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
        return f"on {where} ({self.workers} workers)"

    def _actors_for(self, n: int) -> list[Any]:
        while len(self._actors) < min(n, self.workers):
            self._actors.append(self._actor_cls.remote())
        return self._actors[:max(1, min(n, self.workers))]

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], *, on_done: OnDone | None = None,
            errors: bool = False, stateful: bool = False) -> list[Any]:
        ray = self.ray
        out: list[Any] = [None] * len(items)
        index: dict[Any, int] = {}
        owner: dict[Any, Any] = {}
        todo = list(range(len(items)))
        if stateful:
            free = list(self._actors_for(len(items)))
        else:
            for i in todo:
                index[self._task.remote(fn, items[i])] = i
            todo = []

        def feed() -> None:
            while stateful and todo and free:
                actor, i = free.pop(0), todo.pop(0)
                ref = actor.call.remote(fn, items[i])
                index[ref], owner[ref] = i, actor

        feed()
        try:
            while index:
                done, _ = ray.wait(list(index), num_returns=1)
                for ref in done:
                    i = index.pop(ref)
                    if ref in owner:
                        free.append(owner.pop(ref))
                    try:
                        out[i] = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 (unwrapped, then reported or raised)
                        cause = _cause(ray, e)
                        if not errors:
                            raise cause from None
                        out[i] = TaskError.of(cause)
                    if on_done:
                        on_done(i, out[i])
                feed()
        except BaseException:
            for ref in index:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 (best effort on the way out)
                    pass
            raise
        return out

    def close(self) -> None:
        for a in self._actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 (best effort)
                pass
        self._actors = []
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
            self.started = False


def _cause(ray: Any, e: BaseException) -> BaseException:
    """The task's own exception for a RayTaskError; an XCompileError for a lost worker."""
    exc = ray.exceptions
    if isinstance(e, exc.RayTaskError):
        cause = getattr(e, "cause", None)
        return cause if isinstance(cause, BaseException) else e
    if isinstance(e, (exc.RayActorError, exc.WorkerCrashedError, exc.NodeDiedError)):
        return XCompileError(f"a Ray worker died ({type(e).__name__}); try fewer --workers")
    return e
