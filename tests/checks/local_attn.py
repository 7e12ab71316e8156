"""Local-attention checks run inside a ProcessWorld: sliding windows, attention sinks and logit
soft-capping against a naive fp64 reference, the work the kernels did and the bytes moved."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

import seqpar
from seqpar.testing.checks import make_inputs

FIELDS = ("out", "lse", "dq", "dk", "dv", "dsinks")


def reference_local_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, window=None, sinks=None,
                              softcap=None, cu=None) -> tuple[Tensor, Tensor]:
    """Naive attention over the whole sequence with every mask spelled out -> (out, lse)."""
    b, n, h, d = q.shape
    rep = h // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    visible = torch.ones(n, n, dtype=torch.bool)
    if causal:
        visible &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            visible &= j >= i - left
        if right >= 0:
            visible &= j <= i + right
    if cu is not None:
        doc = torch.searchsorted(torch.tensor(cu), torch.arange(n), right=True)
        visible &= doc[:, None] == doc[None, :]
    s = s.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.view(1, h, 1, 1).expand(b, h, n, 1)], dim=-1)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1))[..., :n]
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def local_exactness(ctx, *, seq: int, causal: bool, window=None, sinks: bool = False, softcap=None, cu=None,
                    heads: int = 4, kv_heads: int = 2, head_dim: int = 4, batch: int = 1,
                    seed: int = 0) -> dict[str, float]:
    """Max abs error of out, lse, dq, dk, dv (unsharded) and of this rank's dsinks summed over the
    group, against the reference; plus this rank's forward pairs and bytes sent."""
    q, k, v, dout = make_inputs(batch, seq, heads, kv_heads, head_dim, torch.float64, seed)
    sink = torch.linspace(-1.0, 2.0, heads, dtype=torch.float64) if sinks else None
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_sink = sink.clone().requires_grad_() if sinks else None
    ref_out, ref_lse = reference_local_attention(*full, causal, window, ref_sink, softcap, cu)
    ref_out.backward(dout)
    cu_arg = None if cu is None else torch.tensor(cu)
    shard = lambda t: ctx.shard(t, cu_seqlens=cu_arg)  # noqa: E731
    local = [shard(t).clone().requires_grad_() for t in (q, k, v)]
    my_sink = sink.clone().requires_grad_() if sinks else None
    ctx.reset_flop_stats()
    ctx.reset_comm_stats()
    out, lse = ctx.attention(*local, causal=causal, return_lse=True, cu_seqlens=cu_arg, window=window,
                             sinks=my_sink, softcap=softcap)
    out.backward(shard(dout))
    sent = ctx.comm_stats()["total"]["sent"]
    pairs = ctx.flop_stats()["forward_pairs"]
    unshard = lambda t, dim=1: ctx.unshard(t, dim, cu_seqlens=cu_arg)  # noqa: E731
    got = [unshard(out), unshard(lse, 2)] + [unshard(t.grad) for t in local]
    ref = [ref_out, ref_lse] + [t.grad for t in full]
    res = {name: (g - r).abs().max().item() for name, g, r in zip(FIELDS, got, ref)}
    if sinks:
        dsinks = ctx.comm.all_reduce(my_sink.grad.clone())  # the gradient sync of a replicated parameter
        res["dsinks"] = (dsinks - ref_sink.grad).abs().max().item()
    res["pairs"], res["bytes_sent"] = pairs, sent
    return res


def local_exactness_cases(strategy: str, init_kwargs: dict[str, Any], cases: list[dict[str, Any]]) -> list[dict]:
    """local_exactness for each case (keyword arguments), one context for all."""
    ctx = seqpar.init(strategy, **init_kwargs)
    return [local_exactness(ctx, seed=i, **case) for i, case in enumerate(cases)]


def windowed_work(strategy: str, init_kwargs: dict[str, Any], *, seq: int, window, causal: bool = True,
                  heads: int = 4, kv_heads: int = 1, head_dim: int = 2) -> dict[str, Any]:
    """This rank's forward pairs and bytes sent for one windowed call (fp64) and the settings."""
    ctx = seqpar.init(strategy, **init_kwargs)
    q, k, v, dout = make_inputs(1, seq, heads, kv_heads, head_dim, torch.float64, 0)
    local = [ctx.shard(t).requires_grad_() for t in (q, k, v)]
    ctx.reset_flop_stats()
    ctx.reset_comm_stats()
    ctx.attention(*local, causal=causal, window=window).backward(ctx.shard(dout))
    return {"pairs": ctx.flop_stats()["forward_pairs"], "bytes": ctx.comm_stats()["total"]["sent"],
            "p2p": ctx.comm_stats().get("p2p", {}).get("sent", 0), "layout": ctx.layout.kind}


def local_args_mismatch() -> str:
    """Rank r calls attention with window (4 + r, 0); the error text ('' if none)."""
    ctx = seqpar.init("ring")
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    try:
        ctx.attention(x, x, x, causal=True, window=(4 + ctx.rank, 0))
    except ValueError as e:
        return str(e)
    return ""
