"""Per-rank attention checks of the tests (beyond `seqpar.testing.checks`, which `seqpar verify`
uses): exactness over many lengths, input-check collectives, shard round trips, errors."""
from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

import seqpar
from seqpar.testing.checks import _exactness


def exactness_over_lengths(strategy: str, init_kwargs: dict[str, Any], lengths: list[int], *,
                           causal: bool = True, heads: int = 4, kv_heads: int = 2,
                           head_dim: int = 4) -> dict[int, float]:
    """Largest fp64 error (out, lse, dq, dk, dv) at each sequence length, one context for all."""
    ctx = seqpar.init(strategy, **init_kwargs)
    fields = ("out", "lse", "dq", "dk", "dv")
    return {n: max(_exactness(ctx, 1, n, heads, kv_heads, head_dim, torch.float64, causal, n, None, None)[f]
                   for f in fields) for n in lengths}


def input_check_counts(strategy: str, init_kwargs: dict[str, Any], seq_lens: list[int], *, heads: int = 4,
                       head_dim: int = 8) -> list[int]:
    """ctx.input_checks (cross-rank check collectives run so far) after attention at each length."""
    ctx = seqpar.init(strategy, **init_kwargs)
    counts = []
    for n in seq_lens:
        q = torch.randn(1, n // ctx.size, heads, head_dim)
        ctx.attention(q, q, q, causal=True)
        counts.append(ctx.input_checks)
    return counts


def shard_roundtrip(strategy: str, init_kwargs: dict[str, Any] | None = None, seq: int = 48) -> dict[str, Any]:
    """shard/unshard/positions consistency of a strategy's layout on this rank."""
    ctx = seqpar.init(strategy, **(init_kwargs or {}))
    x = torch.arange(seq).view(1, seq, 1).float()
    local = ctx.shard(x)
    pos = ctx.positions(seq)
    return {"roundtrip": bool(torch.equal(ctx.unshard(local), x)),
            "positions_match": bool(torch.equal(local.view(-1).long(), pos)),
            "positions": pos.tolist()}


def expect_error(strategy: str, init_kwargs: dict[str, Any] | None = None, *, seq: int | None = None,
                 batch: int = 1, heads: int = 4, kv_heads: int | None = None, head_dim: int = 8,
                 causal: bool = False, per_rank_seq: dict[int, int] | None = None, dtype: str = "float32",
                 per_rank_dtype: dict[int, str] | None = None, group_timeout: float | None = None,
                 attention_kwargs: dict[str, Any] | None = None) -> str:
    """Run init (and attention when seq is given); return the error message raised ('' if none).

    dtype / per_rank_dtype: torch dtype names of q/k/v (e.g. "int64"); group_timeout: run on a
    fresh group over all ranks whose collectives time out after that many seconds; attention_kwargs:
    more keyword arguments of ctx.attention (window, sinks, softcap)."""
    try:
        group = None
        if group_timeout is not None:
            group = dist.new_group(list(range(dist.get_world_size())),
                                   timeout=datetime.timedelta(seconds=group_timeout))
        ctx = seqpar.init(strategy, group=group, **(init_kwargs or {}))
        if seq is not None:
            rank = dist.get_rank()
            n = (per_rank_seq or {}).get(rank, seq // ctx.size)
            dt = getattr(torch, (per_rank_dtype or {}).get(rank, dtype))
            q = torch.randn(batch, n, heads, head_dim).to(dt)
            kv = torch.randn(batch, n, kv_heads or heads, head_dim).to(dt)
            ctx.attention(q, kv, kv.clone(), causal=causal, **(attention_kwargs or {}))
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return ""
