"""Per-rank checks run inside a ProcessWorld (also behind `seqpar verify`).

Each function runs on every rank of a real process group and returns plain numbers, so
tests can assert on them and the CLI can print them.
"""
from __future__ import annotations

import math
from typing import Any

import torch
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


VIEWS = ("last_stride", "transposed", "expanded_kv")


def _last_stride(x: Tensor) -> Tensor:
    """The values of x with stride(-1) == 2 (every other element of a twice wider buffer)."""
    return torch.stack([x, x], -1).flatten(-2)[..., ::2]


def _transposed(x: Tensor) -> Tensor:
    """The values of x [b, s, h, d] as the transpose of a contiguous [b, h, s, d] tensor."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def strided(x: Tensor, view: str | None, role: str, kv_heads: int) -> Tensor:
    """x through a non-contiguous, differentiable view of the same values (role: q, kv or dout).

    view: None (x itself), "last_stride", "transposed", or "expanded_kv": K/V [b, s, 1, d]
    broadcast to kv_heads heads with .expand (stride 0, MQA), q as is, dout last_stride."""
    if view is None:
        return x
    if view == "expanded_kv":
        if role == "kv":
            return x.expand(x.shape[0], x.shape[1], kv_heads, x.shape[3])
        return _last_stride(x) if role == "dout" else x
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose from {VIEWS}")
    return _last_stride(x) if view == "last_stride" else _transposed(x)


def attention_exactness(strategy: str, init_kwargs: dict[str, Any] | None = None, *, batch: int = 2,
                        seq: int = 32, heads: int = 4, kv_heads: int | None = None, head_dim: int = 8,
                        dtype: str = "float64", causal: bool = False, seed: int = 0, scale: float | None = None,
                        view: str | None = None) -> dict[str, float]:
    """Max abs error of out, lse, dq, dk, dv of `strategy` vs naive fp64 attention on the full
    sequence, plus the max abs of each reference (for relative bounds) and bytes moved.

    scale: softmax scale (None: 1/sqrt(head_dim)); view: feed q/k/v and dout through a
    non-contiguous view of the same values (see `strided`)."""
    ctx = seqpar.init(strategy, **(init_kwargs or {}))
    return _exactness(ctx, batch, seq, heads, kv_heads or heads, head_dim, DTYPES[dtype], causal, seed, scale,
                      view)


def _exactness(ctx, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, dt: torch.dtype,
               causal: bool, seed: int, scale: float | None, view: str | None) -> dict[str, float]:
    q, k, v, dout = make_inputs(batch, seq, heads, 1 if view == "expanded_kv" else kv_heads, head_dim, dt, seed)

    def inputs(leaves):
        return [strided(t, view, role, kv_heads) for t, role in zip(leaves, ("q", "kv", "kv"))]

    full = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference_attention(*inputs(full), causal, scale)
    ref_out.backward(dout.double())
    ref = {"out": ref_out.detach(), "lse": ref_lse.detach(), "dq": full[0].grad, "dk": full[1].grad,
           "dv": full[2].grad}

    local = [ctx.shard(t).detach().clone().requires_grad_() for t in (q, k, v)]
    ctx.reset_comm_stats()
    out, lse = ctx.attention(*inputs(local), causal=causal, scale=scale, return_lse=True)
    out.backward(strided(ctx.shard(dout), view, "dout", kv_heads))
    bytes_moved = ctx.comm_stats()["total"]["sent"]
    got = {"out": ctx.unshard(out), "lse": ctx.unshard(lse, dim=2), "dq": ctx.unshard(local[0].grad),
           "dk": ctx.unshard(local[1].grad), "dv": ctx.unshard(local[2].grad)}
    result: dict[str, float] = {}
    for name, r in ref.items():
        result[name] = (got[name].double() - r).abs().max().item()
        result[name + "_ref"] = r.abs().max().item()
    result["dtype_ok"] = float(out.dtype == dt and local[0].grad.dtype == dt
                               and lse.dtype in (torch.float32, torch.float64))
    result["bytes_sent"] = float(bytes_moved)
    return result
