"""Per-rank checks run inside a ProcessWorld (also behind `seqpar verify`).

Each function runs on every rank of a real process group and returns plain numbers, so
tests can assert on them and the CLI can print them.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

import seqpar

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def reference_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None = None):
    """Naive single-device attention in fp64 -> (out [b, n, h, d], lse [b, h, n])."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k64, v64 = k64.repeat_interleave(rep, 2), v64.repeat_interleave(rep, 2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * scale
    if causal:
        n = q.shape[1]
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v64)
    return out, lse


def make_inputs(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                seed: int) -> tuple[Tensor, ...]:
    """Full-sequence q, k, v, dout (identical on every rank: same seed)."""
    g = torch.Generator().manual_seed(seed)
    shape_q, shape_kv = (batch, seq, heads, head_dim), (batch, seq, kv_heads, head_dim)
    q, dout = torch.randn(shape_q, generator=g), torch.randn(shape_q, generator=g)
    k, v = torch.randn(shape_kv, generator=g), torch.randn(shape_kv, generator=g)
    return tuple(t.to(dtype) for t in (q, k, v, dout))


def attention_exactness(strategy: str, init_kwargs: dict[str, Any] | None = None, *, batch: int = 2,
                        seq: int = 32, heads: int = 4, kv_heads: int | None = None, head_dim: int = 8,
                        dtype: str = "float64", causal: bool = False, seed: int = 0) -> dict[str, float]:
    """Max abs error of out, lse, dq, dk, dv of `strategy` vs naive fp64 attention on the full
    sequence, plus the max abs of each reference (for relative bounds) and bytes moved."""
    ctx = seqpar.init(strategy, **(init_kwargs or {}))
    dt = DTYPES[dtype]
    q, k, v, dout = make_inputs(batch, seq, heads, kv_heads or heads, head_dim, dt, seed)
    full = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference_attention(*full, causal)
    ref_out.backward(dout.double())
    ref = {"out": ref_out.detach(), "lse": ref_lse.detach(), "dq": full[0].grad, "dk": full[1].grad,
           "dv": full[2].grad}

    local = [ctx.shard(t).detach().clone().requires_grad_() for t in (q, k, v)]
    ctx.reset_comm_stats()
    out, lse = ctx.attention(*local, causal=causal, return_lse=True)
    out.backward(ctx.shard(dout))
    bytes_moved = ctx.comm_stats()["total"]["sent"]
    got = {"out": ctx.unshard(out), "lse": ctx.unshard(lse, dim=2), "dq": ctx.unshard(local[0].grad),
           "dk": ctx.unshard(local[1].grad), "dv": ctx.unshard(local[2].grad)}
    result: dict[str, float] = {}
    for name, r in ref.items():
        result[name] = (got[name].double() - r).abs().max().item()
        result[name + "_ref"] = r.abs().max().item()
    result["dtype_ok"] = float(out.dtype == dt and local[0].grad.dtype == dt and lse.dtype in (torch.float32, torch.float64))
    result["bytes_sent"] = float(bytes_moved)
    return result


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
                 causal: bool = False, per_rank_seq: dict[int, int] | None = None) -> str:
    """Run init (and attention when seq is given); return the error message raised ('' if none)."""
    try:
        ctx = seqpar.init(strategy, **(init_kwargs or {}))
        if seq is not None:
            rank = dist.get_rank()
            n = (per_rank_seq or {}).get(rank, seq // ctx.size)
            q = torch.randn(batch, n, heads, head_dim)
            kv = torch.randn(batch, n, kv_heads or heads, head_dim)
            ctx.attention(q, kv, kv.clone(), causal=causal)
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return ""
