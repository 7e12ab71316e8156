"""Per-rank functions for tests of the planner (`seqpar plan`, `seqpar.plan`).

They run inside a ProcessWorld on every rank and return plain data.
"""
from __future__ import annotations

from typing import Any

import seqpar
from seqpar.plan import attention_iteration
from seqpar.testing.checks import DTYPES, make_inputs


def measured_attention_bytes(configs: list[tuple[str, dict[str, Any]]], *, batch: int, seq: int, heads: int,
                             kv_heads: int, head_dim: int, dtype: str, causal: bool,
                             seed: int = 0) -> list[dict[str, int]]:
    """For each (strategy, init_kwargs): bytes this rank sent per kind (CommStats) in one
    forward+backward of ctx.attention on [batch, seq, heads, head_dim] inputs."""
    full = make_inputs(batch, seq, heads, kv_heads, head_dim, DTYPES[dtype], seed)
    out = []
    for strategy, kwargs in configs:
        ctx = seqpar.init(strategy, **kwargs)
        out.append(attention_iteration(ctx, tuple(ctx.shard(t) for t in full), causal))
    return out


def fpdt_host_copies(chunks: int, *, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, dtype: str,
                     causal: bool, seed: int = 0) -> dict[str, int]:
    """Host<->device bytes (OffloadStats) of one offloaded FPDT call, forward and backward apart."""
    ctx = seqpar.init("fpdt", chunks=chunks, offload=True)
    q, k, v, dout = (ctx.shard(t) for t in make_inputs(batch, seq, heads, kv_heads, head_dim, DTYPES[dtype], seed))
    local = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = ctx.attention(*local, causal=causal)
    stats = ctx.strategy.last_offload_stats
    fwd = stats.to_host + stats.to_device
    out.backward(dout)
    return {"fwd": fwd, "bwd": stats.to_host + stats.to_device - fwd}
