"""A reusable world of N local processes with an initialised gloo process group.

Used by the tests, `seqpar verify` and `seqpar plan --profile` (`seqpar.testing` re-exports it).

Spawning processes and importing torch is the slow part of a distributed test, so a
`ProcessWorld` is started once and then runs many tasks: `world.run(fn, *args)` calls
`fn(*args)` on every rank (fn must be importable, i.e. a module-level function) and
returns the per-rank results, raising `WorkerError` with the remote tracebacks if any
rank failed. Collectives really go over torch.distributed (gloo), nothing is mocked.
"""
from __future__ import annotations

import datetime
import os
import queue
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed import distributed_c10d

__all__ = ["ProcessWorld", "WorldPool", "WorkerError", "start_ranks", "init_local_gloo"]


class WorkerError(RuntimeError):
    """One or more ranks raised; `errors` maps rank -> traceback text."""

    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        first = min(errors)
        super().__init__(f"{len(errors)} rank(s) failed; rank {first}:\n{errors[first]}")

    @property
    def summary(self) -> str:
        """The exception line of the lowest failing rank (e.g. "ValueError: ...")."""
        return self.errors[min(self.errors)].strip().splitlines()[-1]


def start_ranks(target: Callable[..., None], size: int, args_of: Callable[[int], tuple], *,
                daemon: bool = False, name: str = "seqpar-rank") -> list:
    """Start `size` spawn-context processes running target(*args_of(rank)), one per rank: the one
    way seqpar starts local workers (ProcessWorld for tests / verify / plan --profile, and
    `seqpar train`'s local launcher)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args_of(r), name=f"{name}{r}", daemon=daemon) for r in range(size)]
    for p in procs:
        p.start()
    return procs


def init_local_gloo(rank: int, size: int, init_file: str, timeout_s: float, threads: int = 1) -> None:
    """In a worker: `threads` torch threads and a gloo process group over loopback (file:// rendezvous)."""

    torch.set_num_threads(threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _worker(rank: int, size: int, init_file: str, tasks, results, threads: int, pg_timeout: float) -> None:

    init_local_gloo(rank, size, init_file, pg_timeout, threads)
    world_groups = _live_groups()
    results.put(("ready", rank, None))
    while True:
        item = tasks.get()
        # The parent sends a task once every rank has answered the previous one, so the groups that
        # task made are finished on every rank and can go (destroying them at the end of the task
        # could close a connection a slower peer is still opening).
        _destroy_groups_except(world_groups)
        if item is None:
            break
        task_id, fn, args, kwargs = item
        try:
            results.put((task_id, rank, ("ok", fn(*args, **kwargs))))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            results.put((task_id, rank, ("err", traceback.format_exc())))
    dist.destroy_process_group()


def _live_groups() -> set:
    """The process groups this process holds now (the default one and every subgroup)."""
    return set(distributed_c10d._world.pg_map)  # no public listing of subgroups in torch 2.13


def _destroy_groups_except(keep: set) -> None:
    """Destroy the subgroups a task created: each gloo group keeps a TCP event-loop thread and two
    worker threads, so a reused world would otherwise accumulate hundreds of them (and their
    wake-ups) over a test session. DTensor caches sharding decisions under meshes that compare
    equal whatever their groups, so those caches go too, or the next task's DTensors would carry
    a mesh of destroyed groups."""
    stale = _live_groups() - keep
    for group in stale:
        dist.destroy_process_group(group)
    if stale:
        _clear_dtensor_caches()


def _clear_dtensor_caches() -> None:
    """Forget DTensor's cached sharding propagation and redistribution plans (torch 2.13 names;
    each is skipped where a torch release lacks it)."""
    from torch.distributed.tensor import DTensor, _redistribute
    getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", lambda: None)()
    propagator = DTensor._op_dispatcher.sharding_propagator
    for cached in (propagator.propagate_op_sharding, propagator._propagate_tensor_meta_cached,
                   getattr(_redistribute, "_gen_transform_infos", None)):
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
    getattr(_redistribute, "clear_redistribute_planner_cache", lambda: None)()


class ProcessWorld:
    """`size` worker processes in one gloo world, reusable across tasks."""

    def __init__(self, size: int, threads: int = 1, timeout: float = 300.0, pg_timeout: float = 120.0):
        self.size, self.timeout = size, timeout
        ctx = mp.get_context("spawn")
        self._dir = tempfile.mkdtemp(prefix="seqpar-world-")
        init_file = os.path.join(self._dir, "init")
        self._tasks = [ctx.Queue() for _ in range(size)]
        self._results = ctx.Queue()
        self._procs = start_ranks(_worker, size, lambda r: (r, size, init_file, self._tasks[r], self._results,
                                                            threads, pg_timeout), daemon=True, name="seqpar-world")
        self._next_id = 0
        self._collect("ready")

    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run fn(*args, **kwargs) on every rank; returns [result of rank 0, ..., rank size-1]."""
        if not self.alive():
            raise RuntimeError("process world is not running")
        task_id = self._next_id
        self._next_id += 1
        for q in self._tasks:
            q.put((task_id, fn, args, kwargs))
        return self._collect(task_id)

    def _collect(self, task_id) -> list[Any]:
        out: dict[int, Any] = {}
        errors: dict[int, str] = {}
        while len(out) + len(errors) < self.size:
            try:
                tid, rank, payload = self._results.get(timeout=self.timeout)
            except queue.Empty:
                self.close()
                raise TimeoutError(f"world of {self.size}: task {task_id} got {len(out) + len(errors)} of "
                                   f"{self.size} results in {self.timeout}s (world closed)") from None
            if tid != task_id:
                continue  # a late answer to an earlier, abandoned task
            if payload is None or payload[0] == "ok":
                out[rank] = None if payload is None else payload[1]
            else:
                errors[rank] = payload[1]
        if errors:
            if len(errors) < self.size:  # some ranks may be stuck mid-collective: do not reuse
                self.close()
            raise WorkerError(errors)
        return [out[r] for r in range(self.size)]

    def close(self) -> None:
        for q in self._tasks:
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self._procs = []

    def __enter__(self) -> "ProcessWorld":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WorldPool:
    """Keeps one live world per size; a world that failed mid-task is replaced on next use."""

    def __init__(self, **world_kwargs: Any):
        self._worlds: dict[int, ProcessWorld] = {}
        self._kwargs = world_kwargs

    def get(self, size: int) -> ProcessWorld:
        world = self._worlds.get(size)
        if world is None or not world.alive():
            world = self._worlds[size] = ProcessWorld(size, **self._kwargs)
        return world

    def run(self, size: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        return self.get(size).run(fn, *args, **kwargs)

    def close(self) -> None:
        for world in self._worlds.values():
            world.close()
        self._worlds.clear()
