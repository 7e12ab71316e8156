"""FPDT (arXiv 2408.16978): chunked Ulysses attention with host offload.

The chunk layout, the chunk plan and the forward / backward chunk loops live in
attention/fpdt_chunks.py, shared with the whole-block pipeline (attention/fpdt_block.py).

Forward (one autograd Function): for every query chunk i, online softmax of q_i over
the K/V chunks it sees, then the inverse all-to-all of o_i (and of lse_i when asked).
Backward: dO chunks are all-to-all'ed first; outer loop over K/V chunk j (dK_j, dV_j
accumulate on the device and return to their owners with one all-to-all), inner loop
over query chunks i (>= j when causal) with the global o_i / lse_i; dq_i accumulators
(fp32, fp64 for fp64) live in the chunk store and return after the last K/V chunk.

Every chunk (q, k/v, o, lse, dO, dq) lives in a `ChunkStore` (seqpar.offload): on the device without
offload, in host memory with offload, fetched back one chunk at a time with the next
one prefetched (double buffer), so the device working set is a few chunks whatever the
sequence length. Communication volume equals Ulysses' exactly.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import accum_dtype
from ..layout import TokenLayout
from ..offload import ChunkStore, OffloadStats
from .base import Strategy
from .fpdt_block import FpdtBlock
from .fpdt_chunks import ChunkCall, ChunkPlan, backward_chunks, forward_chunks, heads_to_seq, seq_to_heads
from .options import StrategyOptions
from .registry import register
from .ulysses import head_part, kv_replication

__all__ = ["FpdtAttention", "FpdtStrategy"]


# -- forward and backward ---------------------------------------------------------------------
def _forward(q: Tensor, k: Tensor, v: Tensor, call: ChunkCall) -> tuple[Tensor, Tensor]:
    """out like q and lse [b, h, N/P] (empty unless call.need_lse), chunk by chunk."""
    plan, comm = call.plan, call.comm
    out = torch.empty_like(q)
    b, s, h, _ = q.shape
    lse = q.new_empty((b, h, s) if call.need_lse else (0,), dtype=accum_dtype(q.dtype))

    def emit(i: int, oi: Tensor, lse_i: Tensor) -> None:
        plan.local(out, i).copy_(heads_to_seq(oi, comm))
        if call.need_lse:
            plan.local(lse, i, dim=2).copy_(comm.all_to_all(lse_i, scatter_dim=2, gather_dim=1))

    forward_chunks(call, lambda j: (plan.local(q, j), plan.local(k, j), plan.local(v, j)), emit, call.keep)
    return out, lse


def _backward(dout: Tensor, q_meta: Tensor, kv_meta: Tensor, call: ChunkCall) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv for the forward's inputs; q_meta / kv_meta are meta tensors shaped like q and k."""
    plan = call.plan
    for i in range(plan.chunks):
        call.store.put(("do", i), seq_to_heads(plan.local(dout, i).to(q_meta.dtype), call.comm))
    dq = torch.empty_like(q_meta, device=dout.device)
    dk, dv = torch.empty_like(kv_meta, device=dout.device), torch.empty_like(kv_meta, device=dout.device)
    for i, dq_i, dk_i, dv_i in backward_chunks(call, q_meta.dtype):
        plan.local(dq, i).copy_(dq_i)
        plan.local(dk, i).copy_(dk_i)
        plan.local(dv, i).copy_(dv_i)
    return dq, dk, dv


class FpdtAttention(torch.autograd.Function):
    """q [b, N/P, h, d], k/v [b, N/P, hkv, d] in the FPDT layout -> out like q, lse [b, h, N/P]
    (an empty tensor unless need_lse)."""

    @staticmethod
    def forward(ctx, q, k, v, call: ChunkCall):
        out, lse = _forward(q, k, v, call)
        if call.keep:  # everything backward needs is in the store; q/k/v themselves are not kept
            ctx.call, ctx.metas = call, (q.to("meta"), k.to("meta"))
        else:
            call.store.clear()
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        call = ctx.call
        grads = _backward(dout, *ctx.metas, call)
        call.store.clear()
        return (*grads, None)


@register("fpdt")
class FpdtStrategy(Strategy):
    """FPDT over the whole group: Ulysses degree = group size, `chunks` chunks, optional offload.

    `last_offload_stats` holds the OffloadStats of the latest attention call.
    """

    uses = ("ulysses", "ring", "chunks", "offload")
    layouts = ("contiguous",)
    default_layout = "contiguous"
    layout_reason = "rank r holds piece r of every chunk; causal balance comes from the chunking"
    block_pipeline = True
    cost_model = "seqpar.plan.costs:FPDT"

    @classmethod
    def _resolve(cls, options, size, kind):
        if options.ring not in (None, 1) or options.ulysses not in (None, 1, size):
            raise ValueError(f"strategy 'fpdt' runs Ulysses over the whole group (degree {size}); "
                             f"got ulysses={options.ulysses}, ring={options.ring}")
        chunks = options.chunks or 1
        layout = TokenLayout(kind, outer=1, inner=size, chunks=chunks)
        return cls._settings(options, size, layout, ulysses=size, chunks=chunks, offload=bool(options.offload))

    @classmethod
    def candidates(cls, size, causal, chunks=(1, 2, 4, 8)):
        return [StrategyOptions(chunks=u, offload=offload) for u in chunks for offload in (False, True)]

    def __init__(self, settings, mesh, comm, stats):
        super().__init__(settings, mesh, comm, stats)
        self.last_offload_stats: OffloadStats | None = None

    def describe(self):
        s = self.settings
        return {**super().describe(), "ulysses": s.size, "chunks": s.chunks, "offload": s.offload}

    def chunked_block(self, x, fns, causal, scale, kernel, mask=None, recompute=False):
        """A whole block by FPDT's per-chunk pipeline (attention/fpdt_block.py): x [b, N/P, H] ->
        the block's output like x; `fns` (BlockFunctions) holds its two position-wise halves;
        recompute: keep only x for backward and run the attention loop again there."""
        s = self.settings
        kv_rep = kv_replication(fns.heads, fns.kv_heads, s.size)
        store = ChunkStore(x.device, s.offload)
        self.last_offload_stats = store.stats
        keep = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in fns.params))
        plan = ChunkPlan(s.chunks, x.shape[1] // s.chunks, causal)
        call = ChunkCall(self.comm, plan, scale, kernel, store, kv_rep, False, keep, mask)
        return FpdtBlock.apply(x, call, fns, recompute, *fns.params)

    def attention(self, q, k, v, causal, scale, need_lse, kernel, mask=None, sinks=None):
        s = self.settings
        kv_rep = kv_replication(q.shape[2], k.shape[2], s.size)
        store = ChunkStore(q.device, s.offload)
        self.last_offload_stats = store.stats
        keep = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        plan = ChunkPlan(s.chunks, q.shape[1] // s.chunks, causal)
        call = ChunkCall(self.comm, plan, scale, kernel, store, kv_rep, need_lse, keep, mask,
                         head_part(sinks, self.comm))
        out, lse = FpdtAttention.apply(q, k, v, call)
        return out, (lse if need_lse else None)
