"""Per-rank WallFacer checks run inside a ProcessWorld (tests and benchmarks/comm_volume.py)."""
from __future__ import annotations

from typing import Any

import torch

import seqpar
from seqpar.testing.checks import DTYPES, make_inputs


def _sent_by_kind(ctx, field: str = "sent") -> dict[str, int]:
    return {kind: int(c[field]) for kind, c in ctx.comm_stats().items() if kind != "total"}


def comm_volume(strategy: str, init_kwargs: dict[str, Any] | None = None, *, batch: int = 1, seq: int = 64,
                heads: int = 4, kv_heads: int | None = None, head_dim: int = 8, dtype: str = "float32",
                causal: bool = False, seed: int = 0) -> dict[str, dict[str, int]]:
    """Bytes this rank sent per kind during one attention call, {"forward": {kind: bytes},
    "backward": {...}}, and the number of calls (messages, i.e. latency steps) per kind under
    "forward_calls" / "backward_calls".

    The input-signature check of seqpar.attention is off so only attention traffic counts."""
    ctx = seqpar.init(strategy, check_inputs=False, **(init_kwargs or {}))
    q, k, v, dout = (ctx.shard(t) for t in make_inputs(batch, seq, heads, kv_heads or heads, head_dim,
                                                         DTYPES[dtype], seed))
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    ctx.reset_comm_stats()
    out = ctx.attention(q, k, v, causal=causal)
    forward, forward_calls = _sent_by_kind(ctx), _sent_by_kind(ctx, "calls")
    ctx.reset_comm_stats()
    out.backward(dout)
    return {"forward": forward, "backward": _sent_by_kind(ctx), "forward_calls": forward_calls,
            "backward_calls": _sent_by_kind(ctx, "calls")}


def same_as_ring(layout: str = "zigzag", *, causal: bool = True, seq: int = 32, heads: int = 4,
                 kv_heads: int = 2, head_dim: int = 8, seed: int = 0) -> dict[str, Any]:
    """WallFacer with teams=1 vs ring attention on the same fp64 inputs: bitwise equal results?"""
    results = {}
    for name, kwargs in (("wallfacer", {"team_size": 1}), ("ring", {})):
        ctx = seqpar.init(name, layout=layout, **kwargs)
        q, k, v, dout = (ctx.shard(t) for t in make_inputs(2, seq, heads, kv_heads, head_dim, torch.float64, seed))
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        ctx.reset_comm_stats()
        out, lse = ctx.attention(q, k, v, causal=causal, return_lse=True)
        out.backward(dout)
        results[name] = ([out, lse, q.grad, k.grad, v.grad], _sent_by_kind(ctx))
    (wf, wf_bytes), (ring, ring_bytes) = results["wallfacer"], results["ring"]
    return {"equal": all(torch.equal(a, b) for a, b in zip(wf, ring)), "wallfacer_bytes": wf_bytes,
            "ring_bytes": ring_bytes}


def placement_info(init_kwargs: dict[str, Any], seq: int = 32) -> dict[str, Any]:
    """describe(), the layout rank of this rank, and shard/unshard/positions consistency."""
    ctx = seqpar.init("wallfacer", **init_kwargs)
    x = torch.arange(seq).view(1, seq, 1).double()
    local = ctx.shard(x)
    return {"describe": ctx.describe(), "layout_rank": ctx.layout_rank,
            "roundtrip": bool(torch.equal(ctx.unshard(local), x)),
            "positions_match": bool(torch.equal(local.view(-1).long(), ctx.positions(seq)))}
