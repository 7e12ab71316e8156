"""All-gather attention (Llama-3 context parallelism): gather all K/V, attend locally.

Forward: one fused all-gather of K and V over the group; the local queries attend every
rank's K/V block under the layout's causal block rules. Backward: dK/dV for all blocks
are computed locally and returned to their owners by one fused reduce-scatter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..comm import Comm
from ..documents import DocMask
from ..kernels import BlockKernel, LseAccumulator
from ..layout import TokenLayout
from .base import Strategy, backward_blocks, forward_blocks, grad_buffers
from .registry import register


@dataclass(frozen=True)
class AllGatherCall:
    comm: Comm
    layout: TokenLayout
    causal: bool
    scale: float
    kernel: BlockKernel
    mask: DocMask | None = None
    sinks: Tensor | None = None

    def blocks(self, src: int, n_local: int):
        return self.layout.block_pairs(self.causal, self.comm.rank, src, n_local, self.mask)


class AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call: AllGatherCall):
        comm = call.comm
        kv_all = comm.all_gather(torch.stack([k, v]).unsqueeze(0), dim=0)  # [P, 2, b, n, hkv, d]
        acc = LseAccumulator(q, call.sinks)
        for src in range(comm.size):
            forward_blocks(acc, q, kv_all[src, 0], kv_all[src, 1], call.blocks(src, q.shape[1]), call.kernel,
                           call.scale)
        out, lse = acc.result(q.dtype)
        ctx.save_for_backward(q, kv_all, out, lse)
        ctx.call = call
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, kv_all, out, lse = ctx.saved_tensors
        call = ctx.call
        comm = call.comm
        dq = grad_buffers(q)
        dkv_all = grad_buffers(kv_all[0], comm.size)  # [P, 2, b, n, hkv, d]
        for src in range(comm.size):
            backward_blocks(dq, dkv_all[src, 0], dkv_all[src, 1], dout, q, kv_all[src, 0], kv_all[src, 1],
                            out, lse, call.blocks(src, q.shape[1]), call.kernel, call.scale)
        dkv = comm.reduce_scatter(dkv_all, dim=0)[0]
        return dq.to(q.dtype), dkv[0].to(q.dtype), dkv[1].to(q.dtype), None


@register("allgather")
class AllGatherStrategy(Strategy):
    cost_model = "seqpar.plan.costs:ALLGATHER"

    @classmethod
    def _resolve(cls, options, size, kind):
        return cls._settings(options, size, TokenLayout(kind, outer=size))

    def attention(self, q, k, v, causal, scale, need_lse, kernel, mask=None, sinks=None):
        call = AllGatherCall(self.comm, self.layout, causal, scale, kernel, mask, sinks)
        return AllGatherAttention.apply(q, k, v, call)
