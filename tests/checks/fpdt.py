"""Per-rank FPDT checks and measurements (run inside a ProcessWorld on every rank).

`offload_behaviour` reports what the chunk store held and moved for one attention call;
`attention_memory` measures the device memory of one attention forward + backward (used
by benchmarks/memory.py).
"""
from __future__ import annotations

import dataclasses
import time
import weakref
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import seqpar
from seqpar.testing.checks import DTYPES, make_inputs
from seqpar.train.parallelize import clip_gradients

__all__ = ["offload_behaviour", "attention_memory", "peak_rss_bytes", "StorageMeter"]


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


def _proc_status(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes (0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM)."""
    return _proc_status("VmHWM")


Phases = dict[str, tuple[int, int]]  # phase -> (peak, live at its end), bytes above the start


class StorageMeter(TorchDispatchMode):
    """Live bytes of the tensor storages that operators allocate while the mode is active.

    Every op output whose storage is new (not one of the op's inputs' storages) is counted
    until that storage is freed — on whatever thread drops it last (gloo releases its
    buffers on its own threads, which the profiler's CPU memory events miss). Tensors
    created outside operators (FPDT's numpy-backed host pool) are not counted; neither are
    buffers private to a C++ kernel (the flash kernel's per-thread tiles).
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {id(t.untyped_storage()) for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, Tensor) and t.device.type != "meta"}
        out = func(*args, **kwargs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                self._track(t.untyped_storage(), inputs)
        return out

    def _track(self, storage, inputs: set[int]) -> None:
        key, n = id(storage), storage.nbytes()  # storage objects live exactly as long as the storage
        if n == 0 or key in inputs or key in self._tracked:
            return
        self._tracked.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, n)

    def _release(self, key: int, n: int) -> None:
        self._tracked.discard(key)
        self.live -= n

    def reset_peak(self) -> None:
        self.peak = self.live


def _cpu_phases(run) -> Phases:
    """Run `run(mark)`, `mark(name)` opening a phase, under a StorageMeter."""
    phases: Phases = {}
    with StorageMeter() as meter:
        @contextmanager
        def mark(name):
            meter.reset_peak()
            yield
            phases[name] = (meter.peak, meter.live)

        run(mark)
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


def _inputs(ctx, dev, seq, batch, heads, kv_heads, head_dim, dtype):
    """This rank's q, k, v (requiring grad) and dout on `dev`."""
    full = make_inputs(batch, seq, heads, kv_heads or heads, head_dim, DTYPES[dtype], 0)
    q, k, v, dout = (ctx.shard(t).to(dev).contiguous() for t in full)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout


def _attention_step(ctx, dev, seq, batch, heads, kv_heads, head_dim, dtype, causal) -> None:
    q, k, v, dout = _inputs(ctx, dev, seq, batch, heads, kv_heads, head_dim, dtype)
    ctx.attention(q, k, v, causal=causal).backward(dout)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def attention_memory(strategy: str, init_kwargs: dict[str, Any], *, seq: int, batch: int = 1, heads: int = 8,
                     kv_heads: int | None = None, head_dim: int = 64, dtype: str = "float32",
                     causal: bool = True) -> dict[str, float]:
    """Device memory of one attention forward + backward on this rank, in bytes above the
    inputs q/k/v/dout, excluding the interface tensors (out, lse, and dq/dk/dv in backward).

    CUDA (when available): torch.cuda allocator statistics. CPU: a StorageMeter (bytes of
    live tensors allocated by operators; FPDT's offloaded chunks live outside torch, see
    offload.ChunkStore). retained: held from forward to backward (saved activations);
    peak: the larger of the forward and backward working peaks; host_peak: FPDT host bytes;
    rss_growth: peak RSS minus RSS before the call (everything, host memory too; meaningful
    in a fresh process: only a small warm-up call, 1/16 of the sequence, runs before).
    """
    ctx = seqpar.init(strategy, **init_kwargs)
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    g = ctx.layout.granularity()
    _attention_step(ctx, dev, max(g, seq // 16 // g * g), batch, heads, kv_heads, head_dim, dtype, causal)  # warm-up
    q, k, v, dout = _inputs(ctx, dev, seq, batch, heads, kv_heads, head_dim, dtype)
    held: dict[str, Any] = {}

    def run(mark):
        with mark("forward"):
            held["out"], held["lse"] = ctx.attention(q, k, v, causal=causal, return_lse=True)
        with mark("backward"):
            held["out"].backward(dout)

    dist.barrier()
    rss_before = _proc_status("VmRSS")
    t0 = time.perf_counter()
    phases = _cuda_phases(run, dev) if dev.type == "cuda" else _cpu_phases(run)
    seconds = time.perf_counter() - t0
    interface = _nbytes(held["out"], held["lse"])
    grads = _nbytes(q.grad, k.grad, v.grad)
    stats = getattr(ctx.strategy, "last_offload_stats", None)
    return {"seq": seq, "retained": phases["forward"][1] - interface,
            "peak": max(phases["forward"][0] - interface, phases["backward"][0] - interface - grads),
            "input_bytes": _nbytes(q, k, v), "host_peak": stats.host_peak if stats else 0,
            "rss_growth": peak_rss_bytes() - rss_before, "seconds": seconds, "device": dev.type}


def training_step_memory(cfg: dict[str, Any]) -> dict[str, float]:
    """Device bytes of one whole training step of `seqpar train`'s loop on this rank, by phase
    (CPU: StorageMeter; FPDT's offloaded K/V live outside torch). A first step runs unmetered
    (it creates the optimizer state); the second is metered, phase by phase, with the trainer's
    own pieces: `activations` = the forward + backward working peak above what was live when
    the step began (activations, attention, logits/loss, gradients), `retained` = what the
    forward leaves for the backward, `optimizer` = the peak of gradient sync, clipping and the
    AdamW update; `static` = parameters + AdamW state; `host_peak` = the peak of every host-offload
    buffer during the step (chunk stores and offloaded block inputs, `HOST_BYTES`)."""
    from seqpar.train import TrainConfig, Trainer
    from seqpar.train.trainer import backward_global_mean

    trainer = Trainer(TrainConfig.of(**cfg))
    trainer.train_step()
    params = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    optim = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    task = trainer.task
    from seqpar.offload import HOST_BYTES
    dist.barrier()
    t0 = time.perf_counter()
    HOST_BYTES.reset_peak()
    with StorageMeter() as meter:
        batch = task.batch("train", task.step)
        loss_sum, count = task.loss_terms(batch)
        retained = meter.live
        backward_global_mean(loss_sum, count, trainer.mesh.batch_comm)
        del loss_sum, count, batch
        activations = meter.peak
        meter.reset_peak()
        trainer._sync_gradients()
        clip_gradients(trainer.model.parameters(), trainer.cfg.optim.grad_clip)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        optimizer = meter.peak
    return {"static": params + optim, "params": params, "activations": activations, "retained": retained,
            "optimizer": optimizer, "tokens_per_rank": task.tokens_per_batch // trainer.ctx.size,
            "host_peak": HOST_BYTES.peak, "seconds": time.perf_counter() - t0}
