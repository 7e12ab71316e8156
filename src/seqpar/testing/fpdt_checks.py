"""Per-rank FPDT checks and measurements (run inside a ProcessWorld on every rank).

`offload_behaviour` reports what the chunk store held and moved for one attention call;
`attention_memory` measures the device memory of one attention forward + backward (used
by benchmarks/memory.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

import seqpar

from .checks import DTYPES, make_inputs

__all__ = ["offload_behaviour", "attention_memory", "peak_rss_bytes"]


def offload_behaviour(chunks: int, offload: bool, causal: bool, *, seq: int = 32, heads: int = 4,
                      head_dim: int = 8, grad: bool = True) -> dict[str, Any]:
    """OffloadStats of one fpdt call (after backward when grad) and whether the store was emptied."""
    ctx = seqpar.init("fpdt", chunks=chunks, offload=offload)
    q, k, v, dout = (ctx.shard(t) for t in make_inputs(1, seq, heads, heads, head_dim, torch.float32, 0))
    inputs = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    out = ctx.attention(*inputs, causal=causal)
    after_forward = dataclasses.asdict(ctx.strategy.last_offload_stats)
    if grad:
        out.backward(dout)
    final = dataclasses.asdict(ctx.strategy.last_offload_stats)
    return {"after_forward": after_forward, "final": final,
            "chunk_bytes": q.numel() * q.element_size() // chunks}


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


Phases = dict[str, tuple[int, int]]  # phase -> (peak, live at its end), bytes above the start


def _cpu_phases(run) -> Phases:
    """Run `run(mark)` under the profiler, `mark(name)` opening a phase; measures torch's CPU
    allocator from the profiler's memory events. Only allocations made while profiling
    count, so the tensors that existed before (inputs) are the baseline 0."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run(record_function)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    mem = sorted((e["ts"], e["args"]["Total Allocated"], e["args"]["Bytes"]) for e in events
                 if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)
    base = mem[0][1] - mem[0][2] if mem else 0  # leftovers of earlier profiling sessions
    phases: Phases = {}
    for e in events:
        if e.get("ph") == "X" and e.get("name") in ("forward", "backward"):
            inside = [total - base for ts, total, _ in mem if e["ts"] <= ts <= e["ts"] + e["dur"]]
            phases[e["name"]] = (max(inside, default=0), inside[-1] if inside else 0)
    return phases


def _cuda_phases(run, dev: torch.device) -> Phases:
    """Same as _cpu_phases with torch.cuda's allocator statistics."""
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    phases: Phases = {}

    @contextmanager
    def mark(name):
        torch.cuda.reset_peak_memory_stats(dev)
        yield
        torch.cuda.synchronize(dev)
        phases[name] = (torch.cuda.max_memory_allocated(dev) - base, torch.cuda.memory_allocated(dev) - base)

    run(mark)
    return phases


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def attention_memory(strategy: str, init_kwargs: dict[str, Any], *, seq: int, batch: int = 1, heads: int = 8,
                     kv_heads: int | None = None, head_dim: int = 64, dtype: str = "float32",
                     causal: bool = True) -> dict[str, float]:
    """Device memory of one attention forward + backward on this rank, in bytes above the
    inputs q/k/v/dout, excluding the interface tensors (out, lse, and dq/dk/dv in backward).

    CUDA (when available): torch.cuda allocator statistics. CPU: torch's CPU allocator as
    seen by the profiler's memory events (FPDT's offloaded chunks live outside it, see
    fpdt.ChunkStore). retained: held from forward to backward (saved activations);
    peak: the larger of the forward and backward working peaks; host_peak: FPDT host bytes;
    rss_peak: the process's peak RSS (includes everything, host memory too).
    """
    ctx = seqpar.init(strategy, **init_kwargs)
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    full = make_inputs(batch, seq, heads, kv_heads or heads, head_dim, DTYPES[dtype], 0)
    q, k, v, dout = (ctx.shard(t).to(dev).contiguous() for t in full)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    held: dict[str, Any] = {}

    def run(mark):
        with mark("forward"):
            held["out"], held["lse"] = ctx.attention(q, k, v, causal=causal, return_lse=True)
        with mark("backward"):
            held["out"].backward(dout)

    dist.barrier()
    t0 = time.perf_counter()
    phases = _cuda_phases(run, dev) if dev.type == "cuda" else _cpu_phases(run)
    seconds = time.perf_counter() - t0
    interface = _nbytes(held["out"], held["lse"])
    grads = _nbytes(q.grad, k.grad, v.grad)
    stats = getattr(ctx.strategy, "last_offload_stats", None)
    return {"seq": seq, "retained": phases["forward"][1] - interface,
            "peak": max(phases["forward"][0] - interface, phases["backward"][0] - interface - grads),
            "input_bytes": _nbytes(q, k, v), "host_peak": stats.host_peak if stats else 0,
            "rss_peak": peak_rss_bytes(), "seconds": seconds, "device": dev.type}
