"""`seqpar plan --calibrate`: measure the running world, return a `Calibration`.

`measure(run, ...)` runs `probe_rank` on every rank of a world (`seqpar.plan.worlds.open_world`)
and fits its timings (docs/planner.md, "Calibration"):

- links: for each link class ("intra": groups inside a node; "inter": groups spanning nodes)
  every group of a partition of the world runs the same call at once (ring P2P exchange,
  all-to-all, all-gather, reduce-scatter through `seqpar.comm.Comm`, bytes as `CommStats`
  counts them) at several sizes and group sizes; a least-squares fit per kind gives
  (alpha, beta) of `t = steps(kind, n) alpha + bytes beta`;
- attention kernel (`seqpar.kernels.get_kernel`, the kernel the strategies call): time per
  call of square blocks of each size, causal and full, forward and backward, on rank 0
  alone (the others wait, their cores free) and on every rank at once (shared cores and
  caches: processes outnumbering cores); `slots` = world x t_alone / t_together (median),
  how many ranks compute at full speed together (2 for 4 single-threaded processes on 2
  cores);
- `sync_s`: what a small collective or ring exchange costs on top of its bare time when it
  sits between computations on every rank (waking a rank whose core is busy);
- `overlap`: a ring exchange started before a compute chunk and waited after it, vs both
  apart (CPU gloo: comm and compute share the cores, little overlap);
- the cost of merging a block's output by log-sum-exp (`LseAccumulator.add`) per element,
  matmul FLOP/s (alone and together) and host copy bandwidth.

Every timed value is a median over repeats after a warm-up call; every rank returns the same
result (timings max-reduced, the together-times averaged).
"""
from __future__ import annotations

import datetime
import math
import os
import statistics
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..comm import Comm, CommStats
from ..kernels import LseAccumulator, get_kernel
from ..mesh import Mesh
from .hardware import (
    CALIBRATED_KINDS,
    KERNEL_COLUMNS,
    Calibration,
    KernelTable,
    LinkFit,
    calibrated_peak_flops,
    fit_alpha_beta,
)

__all__ = ["Calibration", "DEFAULT_SIZES", "DEFAULT_KERNEL_SIZES", "link_partitions", "probe_rank",
           "build_calibration", "measure", "calibrated_peak_flops"]

DEFAULT_SIZES = (4096, 32768, 262144, 1048576, 4194304)          # bytes per rank and call
DEFAULT_KERNEL_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # block rows (square blocks)


def link_partitions(world: int, ranks_per_node: int) -> list[tuple[str, list[list[int]]]]:
    """(link class, partition of the world into groups) to measure: intra-node groups of 2 and
    of a whole node; inter-node groups of the ranks with one local index on every node, and the
    whole world."""
    rpn = min(ranks_per_node, world)
    out = []
    for g in sorted({2, rpn}):
        if 2 <= g <= rpn and rpn % g == 0:
            out.append(("intra", [list(range(s, s + g)) for s in range(0, world, g)]))
    if world > rpn:
        strided = [list(range(j, world, rpn)) for j in range(rpn)]
        out.append(("inter", strided))
        if rpn > 1:
            out.append(("inter", [list(range(world))]))
    return out


# -- on every rank -------------------------------------------------------------------------------
def _sync(device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _seconds(op: Callable[[], Any], sync: Callable[[], None], calls: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        op()
    sync()
    return time.perf_counter() - t0


def _alone(op: Callable[[], Any], sync, repeats: int, big: float = 0.25) -> float:
    """One call's time: a warm-up call, then the median of `repeats` (of 2 when a call takes over `big` s)."""
    first = _seconds(op, sync)
    if first > big:
        return min(first, _seconds(op, sync))
    return statistics.median(_seconds(op, sync) for _ in range(max(1, repeats)))


def _together(op: Callable[[], Any], sync, calls: int, repeats: int, warm: bool = True) -> float:
    """One call's time while every rank runs `calls` back-to-back calls after a barrier (the
    median over `repeats`, after a warm-up call when `warm`): amortises the skew of the
    barrier's exit and, for long runs, shows how ranks share the cores."""
    if warm:
        op()
    times = []
    for _ in range(max(1, repeats)):
        dist.barrier()
        times.append(_seconds(op, sync, calls) / calls)
    return statistics.median(times)


def _agree(values: list[float], device, op: str = "max") -> list[float]:
    """Every rank's values reduced over the world (max, or the mean)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return [v if op == "max" else v / dist.get_world_size() for v in t.cpu().tolist()]


def _comm_op(kind: str, comm, target: int, device) -> tuple[Callable[[], Any], int]:
    """A call of `kind` on comm's group sending about `target` bytes per rank, and the bytes
    CommStats counts for it."""
    n, elem = comm.size, 4
    if kind == "p2p":
        ring = comm.ring()
        x = torch.zeros(max(1, target // elem), device=device)
        return (lambda: ring.send_recv(x).wait()), x.numel() * elem
    if kind == "all_to_all":
        per = max(1, math.ceil(target * n / (n - 1) / elem / n))
        x = torch.zeros(n * per, device=device)
        return (lambda: comm.all_to_all(x, 0, 0)), x.numel() * elem * (n - 1) // n
    per = max(1, target // ((n - 1) * elem))  # all_gather: the local shard; reduce_scatter: the output shard
    if kind == "all_gather":
        x = torch.zeros(per, device=device)
        return (lambda: comm.all_gather(x)), per * elem * (n - 1)
    x = torch.zeros(n * per, device=device)
    return (lambda: comm.reduce_scatter(x)), per * elem * (n - 1)


def _probe_links(ranks_per_node: int, sizes, repeats: int, device, sync) -> list[tuple]:
    """(link class, kind, group size, bytes, seconds per call) of every measured call."""


    keys, times, mesh = [], [], Mesh()
    for link_class, blocks in link_partitions(dist.get_world_size(), ranks_per_node):
        comm = Comm(mesh.partition(blocks), CommStats())
        for kind in CALIBRATED_KINDS:
            for target in sizes:
                op, nbytes = _comm_op(kind, comm, target, device)
                keys.append((link_class, kind, comm.size, nbytes))
                times.append(_together(op, sync, 4, repeats))
    return [(*key, t) for key, t in zip(keys, _agree(times, device))]


def _kernel_ops(kernel, n: int, heads: int, kv_heads: int, head_dim: int, dtype, device, causal: bool):
    g = torch.Generator().manual_seed(n)
    q = torch.randn(1, n, heads, head_dim, generator=g).to(device, dtype)
    k, v = (torch.randn(1, n, kv_heads, head_dim, generator=g).to(device, dtype) for _ in range(2))
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = kernel.forward(q, k, v, causal, scale)
    return (lambda: kernel.forward(q, k, v, causal, scale),
            lambda: kernel.backward(q, q, k, v, out, lse, causal, scale))


def _alone_then_together(ops: list, sync, repeats: int, device, target_s: float) -> tuple[list[float], list[float]]:
    """Seconds per call of each op: rank 0 alone (the others wait, idle, in a barrier), then
    every rank at once, back to back for about `target_s` (the same call counts everywhere)."""
    dist.barrier()
    alone = _agree([_alone(op, sync, repeats) if dist.get_rank() == 0 else 0.0 for op in ops], device)
    together = []
    for op, t in zip(ops, alone):
        calls = max(1, min(1000, round(target_s / t)))
        together.append(_together(op, sync, calls, repeats if t < target_s / 2 else 1, warm=t < 0.05))
    return alone, _agree(together, device, "mean")


def _probe_kernels(dtype: str, kernel_sizes, heads, kv_heads, head_dim, repeats, device, sync,
                   target_s: float) -> dict[str, Any]:
    """Seconds per kernel call of each size and KERNEL_COLUMNS, alone and together; matmul
    seconds per flop, alone and together."""


    torch_dtype = getattr(torch, dtype)
    kernel = get_kernel("auto", device, torch_dtype)
    alone: dict[str, list[float]] = {c: [] for c in KERNEL_COLUMNS}
    together: dict[str, list[float]] = {c: [] for c in KERNEL_COLUMNS}
    for n in kernel_sizes:
        ops = [op for causal in (False, True)
               for op in _kernel_ops(kernel, n, heads, kv_heads, head_dim, torch_dtype, device, causal)]
        a, t = _alone_then_together(ops, sync, repeats, device, target_s)
        for column, x, y in zip(("full_fwd", "full_bwd", "causal_fwd", "causal_bwd"), a, t):
            alone[column].append(x)
            together[column].append(y)
    m = 1024 if device.type == "cuda" else 256
    a, b = (torch.randn(m, m).to(device, torch_dtype) for _ in range(2))
    rows = min(1024, max(kernel_sizes))
    q = torch.randn(1, rows, heads, head_dim).to(device, torch_dtype)
    acc, (out, lse) = LseAccumulator(q), kernel.forward(q, q[:, :, :kv_heads], q[:, :, :kv_heads], False, 1.0)
    (mm_alone, merge_alone), (mm_together, merge_together) = _alone_then_together(
        [lambda: a @ b, lambda: acc.add(out, lse)], sync, repeats, device, target_s)
    elems = rows * heads * head_dim
    return {"alone": alone, "together": together, "matmul": (2.0 * m ** 3 / mm_alone, 2.0 * m ** 3 / mm_together),
            "merge_s": (merge_alone / elems, merge_together / elems)}


def _probe_sharing(dtype: str, size: int, heads, kv_heads, head_dim, p2p_bytes: int, repeats, device, sync,
                   target_s: float) -> dict[str, float]:
    """Between calls of a mid-size kernel on every rank: `sync_s`, the extra time a small
    collective (all-to-all, ring exchange) costs on top of its time without compute around it
    (a rank to wake on a busy core); `overlap`, a world ring exchange of `p2p_bytes` started
    before a compute chunk of about its duration and waited after it, against both apart."""


    torch_dtype = getattr(torch, dtype)
    fwd, _ = _kernel_ops(get_kernel("auto", device, torch_dtype), size, heads, kv_heads, head_dim, torch_dtype, device,
                         False)
    comm = Comm(None, CommStats())
    ring, small = comm.ring(), torch.zeros(256 * comm.size, device=device)
    calls = [lambda: comm.all_to_all(small, 0, 0), lambda: ring.send_recv(small).wait()]
    units = 10
    bare = _agree([_together(fwd, sync, units, repeats)] + [_together(c, sync, units, repeats) for c in calls],
                  device, "mean")
    loaded = _agree([_together(lambda c=c: (fwd(), c()), sync, units, repeats) for c in calls], device, "mean")
    sync_s = statistics.mean(max(0.0, t - bare[0] - b) for t, b in zip(loaded, bare[1:]))

    x = torch.zeros(p2p_bytes // 4, device=device)
    exchange = lambda: ring.send_recv(x).wait()  # noqa: E731
    p2p = _agree([_together(exchange, sync, 8, repeats)], device)[0]
    chunk = max(1, round(p2p / bare[0]))  # compute calls per exchange

    def compute():
        for _ in range(chunk):
            fwd()

    def both():
        pending = ring.send_recv(x)
        compute()
        pending.wait()
    units = max(1, math.ceil(2 * target_s / max(p2p, chunk * bare[0])))
    t_c, t_p, t_both = _agree([_together(compute, sync, units, repeats), _together(exchange, sync, units, repeats),
                               _together(both, sync, units, repeats)], device, "mean")
    return {"sync_s": sync_s, "overlap": min(1.0, max(0.0, (t_c + t_p - t_both) / min(t_c, t_p)))}


def probe_rank(*, ranks_per_node: int, sizes=DEFAULT_SIZES, kernel_sizes=DEFAULT_KERNEL_SIZES,
               dtypes=("float32",), heads: int = 1, kv_heads: int = 1, head_dim: int = 64,
               repeats: int = 5, target_s: float = 0.1) -> dict[str, Any]:
    """Per rank (collective over the world): every measurement of the module docstring, as
    plain data identical on every rank (`build_calibration` turns it into a Calibration).
    `target_s`: how long the back-to-back runs last (shorter: faster, noisier)."""

    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    sync = _sync(device)
    links = _probe_links(ranks_per_node, sizes, repeats, device, sync)
    kernels = {dt: _probe_kernels(dt, kernel_sizes, heads, kv_heads, head_dim, repeats, device, sync, target_s)
               for dt in dtypes}
    sharing = _probe_sharing(dtypes[0], min(1024, max(kernel_sizes)), heads, kv_heads, head_dim, max(sizes), repeats,
                             device, sync, target_s)
    src = torch.zeros(8 * 2 ** 20, device=device)
    dst = torch.empty(src.shape, pin_memory=device.type == "cuda")
    dist.barrier()
    copy = _agree([_alone(lambda: dst.copy_(src), sync, repeats) if dist.get_rank() == 0 else 0.0], device)[0]
    return {"links": links, "kernels": kernels, **sharing, "host_bw": src.numel() * src.element_size() / copy,
            "threads": torch.get_num_threads(), "cores": len(os.sched_getaffinity(0)),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "backend": backend,
            "torch_version": torch.__version__}


# -- fits ----------------------------------------------------------------------------------------
def build_calibration(raw: dict[str, Any], *, world: int, ranks_per_node: int, kernel_sizes, heads: int,
                      kv_heads: int, head_dim: int) -> Calibration:
    """A Calibration from probe_rank's result: alpha-beta fits per link class and kind."""
    points: dict[tuple[str, str], list] = {}
    for link_class, kind, n, nbytes, seconds in raw["links"]:
        points.setdefault((link_class, kind), []).append((n, nbytes, seconds))
    links: dict[str, dict[str, LinkFit]] = {}
    for (link_class, kind), pts in points.items():
        links.setdefault(link_class, {})[kind] = fit_alpha_beta(kind, pts)
    kernels, matmul = {}, {}
    for dtype, k in raw["kernels"].items():
        kernels[dtype] = KernelTable(heads, kv_heads, head_dim, tuple(kernel_sizes),
                                     {c: tuple(v) for c, v in k["alone"].items()},
                                     {c: tuple(v) for c, v in k["together"].items()}, tuple(k["merge_s"]))
        matmul[dtype] = tuple(k["matmul"])
    first = kernels[next(iter(kernels))]
    slots = min(float(world), max(1.0, world / first.contention()))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Calibration(world, ranks_per_node, raw["threads"], raw["cores"], raw["device"], raw["backend"],
                       raw["torch_version"], date, slots, raw["overlap"], raw["sync_s"], raw["host_bw"], links,
                       kernels, matmul)


def measure(run: Callable[..., Any], world: int, *, ranks_per_node: int | None = None, sizes=DEFAULT_SIZES,
            kernel_sizes=DEFAULT_KERNEL_SIZES, dtypes=("float32",), heads: int = 1, kv_heads: int = 1,
            head_dim: int = 64, repeats: int = 5, target_s: float = 0.1) -> Calibration:
    """Calibrate the world `run` reaches (`with open_world(world) as run: measure(run, world)`);
    ranks_per_node defaults to the whole world on one node (a local world)."""
    rpn = min(ranks_per_node or world, world)
    sizes, kernel_sizes = tuple(sorted(set(sizes))), tuple(sorted(set(kernel_sizes)))
    if len(sizes) < 2 or min(sizes) < 1 or not kernel_sizes or min(kernel_sizes) < 1:
        raise ValueError(f"calibration needs >= 2 message sizes and >= 1 block size, got {sizes}, {kernel_sizes}")
    if heads % kv_heads:
        raise ValueError(f"calibration heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    raw = run(probe_rank, ranks_per_node=rpn, sizes=sizes, kernel_sizes=kernel_sizes, dtypes=tuple(dtypes),
              heads=heads, kv_heads=kv_heads, head_dim=head_dim, repeats=repeats, target_s=target_s)
    return build_calibration(raw, world=world, ranks_per_node=rpn, kernel_sizes=kernel_sizes, heads=heads,
                             kv_heads=kv_heads, head_dim=head_dim)
