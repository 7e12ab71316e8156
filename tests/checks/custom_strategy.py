"""A strategy defined outside the package, registered the way a user would (and its cost model).

`gather_all` all-gathers q, k and v over the group, computes attention over the whole sequence
on every rank (redundant, but exact and short) and keeps this rank's rows; backward all-gathers
dO and keeps this rank's rows of dq, dk, dv (every rank computed the same full gradients).
Contiguous layout only; an extra option `label` shows in `describe()`.
"""
from __future__ import annotations

import torch

import seqpar
from seqpar.attention import Strategy, register
from seqpar.layout import TokenLayout
from seqpar.plan import CostModel
from seqpar.plan.stages import Collective, Compute
from seqpar.plan.tables import local_load
from seqpar.testing.checks import attention_exactness

NAME = "gather_all"


class _GatherAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, comm, causal, scale, kernel):
        heads, kv_heads = q.shape[2], k.shape[2]
        qkv = comm.all_gather(torch.cat([q, k, v], dim=2), dim=1)  # [b, P*n, h + 2 hkv, d]: global order
        q_all, k_all, v_all = qkv.split([heads, kv_heads, kv_heads], dim=2)
        out_all, lse_all = kernel.forward(q_all, k_all, v_all, causal, scale)
        rows = slice(comm.rank * q.shape[1], (comm.rank + 1) * q.shape[1])
        ctx.save_for_backward(q_all, k_all, v_all, out_all, lse_all)
        ctx.comm, ctx.causal, ctx.scale, ctx.kernel, ctx.rows = comm, causal, scale, kernel, rows
        lse = lse_all[:, :, rows].contiguous()
        ctx.mark_non_differentiable(lse)
        return out_all[:, rows].contiguous(), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q_all, k_all, v_all, out_all, lse_all = ctx.saved_tensors
        dout_all = ctx.comm.all_gather(dout.to(out_all.dtype).contiguous(), dim=1)
        dq, dk, dv = ctx.kernel.backward(dout_all, q_all, k_all, v_all, out_all, lse_all, ctx.causal, ctx.scale)
        rows, dtype = ctx.rows, q_all.dtype
        return dq[:, rows].to(dtype), dk[:, rows].to(dtype), dv[:, rows].to(dtype), None, None, None, None


def _schedule(inp, cfg, rank):
    m, tokens = inp.model, inp.batch * inp.tokens_per_rank
    group = inp.cluster.ranks
    fwd, bwd = local_load(inp.seq_len, inp.causal, inp.attention_rows(m.heads), m.head_dim)
    return [Collective("all_gather", tokens * (m.heads + 2 * m.kv_heads) * m.head_dim, inp.itemsize, group, "fwd",
                       "qkv"),
            Compute(fwd, "fwd"),
            Collective("all_gather", tokens * m.heads * m.head_dim, inp.itemsize, group, "bwd", "dout"),
            Compute(bwd, "bwd")]


def _memory(inp, cfg):
    m = inp.model
    whole = inp.batch * inp.seq_len * (2 * m.heads + 2 * m.kv_heads) * m.head_dim * inp.itemsize
    return whole, whole


COST = CostModel(_schedule, _memory)


class GatherAllStrategy(Strategy):
    layouts = ("contiguous",)
    default_layout = "contiguous"
    layout_reason = "rank r holds the r-th contiguous piece of the gathered sequence"
    accepted_options = ("label",)
    cost_model = COST

    @classmethod
    def _resolve(cls, options, size, kind):
        return cls._settings(options, size, TokenLayout(kind, outer=size))

    def attention(self, q, k, v, causal, scale, need_lse, kernel, mask=None):
        if mask is not None:
            raise ValueError("gather_all does not take packed documents")
        return _GatherAll.apply(q, k, v, self.comm, causal, scale, kernel)

    def describe(self):
        return {**super().describe(), "label": self.settings.extra("label")}


def register_gather_all() -> type[Strategy]:
    """Register the strategy under NAME (again: the same class may be registered twice)."""
    return register(NAME)(GatherAllStrategy)


def exactness_and_bytes(causal: bool) -> dict:
    """In a worker: register, then seqpar.init + attention vs single-device attention, and the
    bytes this rank sent (per kind) in that one forward + backward."""
    register_gather_all()
    result = attention_exactness(NAME, {"label": "mine"}, seq=32, heads=4, kv_heads=2, head_dim=8,
                                 dtype="float64", causal=causal, batch=1)
    ctx = seqpar.init(NAME, label="mine")
    q = torch.randn(1, 32 // ctx.size, 4, 8, dtype=torch.float32, requires_grad=True)
    kv = torch.randn(1, 32 // ctx.size, 2, 8, dtype=torch.float32, requires_grad=True)
    ctx.attention(q, kv, kv, causal=causal).sum().backward()
    sent = {kind: row["sent"] for kind, row in ctx.comm_stats().items() if kind != "total"}
    return {**result, "describe": ctx.describe(), "sent": sent}
