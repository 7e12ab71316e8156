"""Communication layer: collectives and ring P2P on one process group, with byte accounting.

Every byte a strategy moves goes through a `Comm`, which records the algorithmic
volume per rank (what a bandwidth-optimal implementation sends and receives), so
volumes are exact, backend-independent and comparable across strategies:

=================  ======================================  ==========================
kind               sent per rank                           for
=================  ======================================  ==========================
p2p                the tensor                              ring / sub-ring steps
all_to_all         (n-1)/n of the local tensor             Ulysses head/seq exchange
all_gather         (n-1) * local shard                     team Q/K/V, allgather KV
reduce_scatter     (n-1) * output shard                    team merge, dK/dV return
all_reduce         2 (n-1)/n of the tensor                 gradient averaging
=================  ======================================  ==========================
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

_all_gather_tensor = dist.all_gather_single  # torch 2.13's names (the *_into_tensor ones are deprecated)
_reduce_scatter_tensor = dist.reduce_scatter_single

__all__ = ["CommStats", "Comm", "RingComm", "PendingRecv", "all_to_all_autograd"]


@dataclass
class _Counter:
    sent: int = 0
    recv: int = 0
    calls: int = 0
    seconds: float = 0.0


@dataclass
class CommStats:
    """Bytes sent/received and calls per collective kind since the last reset."""

    counters: dict[str, _Counter] = field(default_factory=lambda: defaultdict(_Counter))

    def record(self, kind: str, sent: int, recv: int, seconds: float = 0.0) -> None:
        c = self.counters[kind]
        c.sent += int(sent)
        c.recv += int(recv)
        c.calls += 1
        c.seconds += seconds

    def snapshot(self) -> dict[str, dict[str, float]]:
        """{kind: {"sent": bytes, "recv": bytes, "calls": n, "seconds": s}} plus a "total" row."""
        out = {k: {"sent": c.sent, "recv": c.recv, "calls": c.calls, "seconds": c.seconds}
               for k, c in sorted(self.counters.items())}
        out["total"] = {key: sum(v[key] for v in out.values()) for key in ("sent", "recv", "calls", "seconds")}
        return out

    def reset(self) -> None:
        self.counters.clear()


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class PendingRecv:
    """Handle of an in-flight send/recv pair; `wait()` returns the received tensor."""

    def __init__(self, works, buffer: Tensor, stats: CommStats | None, kind: str, nbytes_sent: int, t0: float):
        self._works, self._buffer = works, buffer
        self._stats, self._kind, self._sent, self._t0 = stats, kind, nbytes_sent, t0

    def wait(self) -> Tensor:
        for w in self._works:
            w.wait()
        if self._stats is not None:
            self._stats.record(self._kind, self._sent, _nbytes(self._buffer), time.perf_counter() - self._t0)
            self._stats = None
        return self._buffer


class Comm:
    """Collectives on one process group (group ranks 0..size-1), recording bytes into `stats`."""

    def __init__(self, group: dist.ProcessGroup | None, stats: CommStats):
        self.group = group if group is not None else dist.group.WORLD
        self.stats = stats
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.global_ranks = [dist.get_global_rank(self.group, i) for i in range(self.size)]

    def __repr__(self) -> str:
        return f"Comm(ranks={self.global_ranks}, rank={self.rank})"

    # -- collectives -------------------------------------------------------------------
    def all_to_all(self, x: Tensor, scatter_dim: int, gather_dim: int) -> Tensor:
        """Split x into `size` chunks along scatter_dim, send chunk i to rank i, concatenate the
        received chunks along gather_dim (in rank order)."""
        n = self.size
        if n == 1:
            return x
        if x.shape[scatter_dim] % n:
            raise ValueError(f"all_to_all: dim {scatter_dim} of size {x.shape[scatter_dim]} "
                             f"is not divisible by group size {n}")
        t0 = time.perf_counter()
        send = torch.stack(x.chunk(n, dim=scatter_dim)).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        self.stats.record("all_to_all", _nbytes(x) * (n - 1) // n, _nbytes(x) * (n - 1) // n,
                          time.perf_counter() - t0)
        return torch.cat(recv.unbind(0), dim=gather_dim)

    def all_gather(self, x: Tensor, dim: int = 0) -> Tensor:
        """Concatenate every rank's x along dim, in rank order."""
        n = self.size
        if n == 1:
            return x
        t0 = time.perf_counter()
        x = x.contiguous()
        x = x if x.dim() else x.view(1)
        out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_tensor(out, x, group=self.group)
        out = out.view((n,) + tuple(x.shape))
        self.stats.record("all_gather", _nbytes(x) * (n - 1), _nbytes(x) * (n - 1), time.perf_counter() - t0)
        return torch.cat(out.unbind(0), dim=dim) if dim != 0 else out.flatten(0, 1)

    def reduce_scatter(self, x: Tensor, dim: int = 0) -> Tensor:
        """Sum x over ranks and keep this rank's chunk along dim (x.shape[dim] % size == 0)."""
        n = self.size
        if n == 1:
            return x
        if x.shape[dim] % n:
            raise ValueError(f"reduce_scatter: dim {dim} of size {x.shape[dim]} not divisible by {n}")
        t0 = time.perf_counter()
        send = torch.stack(x.chunk(n, dim=dim)).contiguous()
        out = torch.empty(send.shape[1:], dtype=x.dtype, device=x.device)
        _reduce_scatter_tensor(out, send.flatten(0, 1), group=self.group)
        self.stats.record("reduce_scatter", _nbytes(out) * (n - 1), _nbytes(out) * (n - 1),
                          time.perf_counter() - t0)
        return out

    def all_reduce(self, x: Tensor, op=dist.ReduceOp.SUM, kind: str = "all_reduce") -> Tensor:
        """In-place all-reduce; returns x."""
        n = self.size
        if n == 1:
            return x
        t0 = time.perf_counter()
        dist.all_reduce(x, op=op, group=self.group)
        vol = 2 * _nbytes(x) * (n - 1) // n
        self.stats.record(kind, vol, vol, time.perf_counter() - t0)
        return x

    # -- point to point ----------------------------------------------------------------
    def exchange(self, send: Tensor | None, dst: int | None, recv_like: Tensor | None, src: int | None,
                 tag: int = 0, kind: str = "p2p", out: Tensor | None = None) -> PendingRecv:
        """Start sending `send` to group rank dst and receiving a tensor like `recv_like` from src
        (into `out` when given: a contiguous buffer reused across steps).

        Either side may be None. Returns a handle; the tensor sent must not be modified
        before `wait()`.
        """
        t0 = time.perf_counter()
        ops, buffer = [], None
        if send is not None and dst is not None:
            send = send.contiguous()
            ops.append(dist.P2POp(dist.isend, send, self.global_ranks[dst], self.group, tag))
        if recv_like is not None and src is not None:
            buffer = out if out is not None else torch.empty_like(recv_like, memory_format=torch.contiguous_format)
            ops.append(dist.P2POp(dist.irecv, buffer, self.global_ranks[src], self.group, tag))
        works = dist.batch_isend_irecv(ops) if ops else []
        sent = _nbytes(send) if send is not None and dst is not None else 0
        if buffer is None:
            buffer = torch.empty(0)
        return PendingRecv(works, buffer, self.stats, kind, sent, t0)

    def ring(self, tag: int = 0, ranks: list[int] | None = None) -> "RingComm":
        """A ring over `ranks` (group ranks in ring order; default: all ranks in order)."""
        return RingComm(self, list(range(self.size)) if ranks is None else ranks, tag)


class RingComm:
    """Send to the next / receive from the previous rank of a ring, double-buffered.

    `ranks` lists group ranks in ring order; this rank must be among them.
    """

    def __init__(self, comm: Comm, ranks: list[int], tag: int = 0):
        self.comm, self.ranks, self.tag = comm, ranks, tag
        self.size = len(ranks)
        self.rank = ranks.index(comm.rank)
        self.next = ranks[(self.rank + 1) % self.size]
        self.prev = ranks[(self.rank - 1) % self.size]

    def source(self, step: int) -> int:
        """Ring position of the rank whose block this rank holds after `step` rotations."""
        return (self.rank - step) % self.size

    def shift(self, x: Tensor, distance: int, out: Tensor | None = None) -> PendingRecv:
        """Send x to the rank `distance` places ahead on the ring, receive from the one as far behind."""
        dst, src = (self.ranks[(self.rank + s) % self.size] for s in (distance, -distance))
        return self.comm.exchange(x, dst, x, src, tag=self.tag, out=out)

    def send_recv(self, x: Tensor, out: Tensor | None = None) -> PendingRecv:
        """Send x to the next rank, receive the previous rank's (into `out` when given)."""
        return self.comm.exchange(x, self.next, x, self.prev, tag=self.tag, out=out)


# -- autograd wrappers ----------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm: Comm, scatter_dim: int, gather_dim: int):
        ctx.comm, ctx.dims = comm, (scatter_dim, gather_dim)
        return comm.all_to_all(x, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return ctx.comm.all_to_all(grad.contiguous(), gather_dim, scatter_dim), None, None, None


def all_to_all_autograd(x: Tensor, comm: Comm, scatter_dim: int, gather_dim: int) -> Tensor:
    """Differentiable all-to-all (backward is the inverse all-to-all)."""
    return _AllToAll.apply(x, comm, scatter_dim, gather_dim)
