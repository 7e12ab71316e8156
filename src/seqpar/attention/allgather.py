"""All-gather attention (Llama-3 context parallelism): gather all K/V, attend locally.

Forward: one fused all-gather of K and V over the group; the local queries attend every
rank's K/V block under the layout's causal block rules. Backward: dK/dV for all blocks
are computed locally and returned to their owners by one fused reduce-scatter.
"""
from __future__ import annotations

import torch

from ..comm import Comm
from ..kernels import BlockKernel, LseAccumulator
from ..layout import TokenLayout, block_pairs
from . import register
from .base import Strategy, backward_blocks, forward_blocks, grad_buffers


class AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, comm: Comm, kind: str, causal: bool, scale: float, kernel: BlockKernel):
        kv_all = comm.all_gather(torch.stack([k, v]).unsqueeze(0), dim=0)  # [P, 2, b, n, hkv, d]
        acc = LseAccumulator(q)
        for src in range(comm.size):
            pairs = block_pairs(kind, causal, comm.rank, src, q.shape[1])
            forward_blocks(acc, q, kv_all[src, 0], kv_all[src, 1], pairs, kernel, scale)
        out, lse = acc.result(q.dtype)
        ctx.save_for_backward(q, kv_all, out, lse)
        ctx.args = (comm, kind, causal, scale, kernel)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, kv_all, out, lse = ctx.saved_tensors
        comm, kind, causal, scale, kernel = ctx.args
        dq = grad_buffers(q)
        dkv_all = grad_buffers(kv_all[0], comm.size)  # [P, 2, b, n, hkv, d]
        for src in range(comm.size):
            pairs = block_pairs(kind, causal, comm.rank, src, q.shape[1])
            backward_blocks(dq, dkv_all[src, 0], dkv_all[src, 1], dout, q, kv_all[src, 0], kv_all[src, 1],
                            out, lse, pairs, kernel, scale)
        dkv = comm.reduce_scatter(dkv_all, dim=0)[0]
        return dq.to(q.dtype), dkv[0].to(q.dtype), dkv[1].to(q.dtype), None, None, None, None, None


@register("allgather")
class AllGatherStrategy(Strategy):
    def __init__(self, sp, cfg):
        super().__init__(sp, cfg)
        self._forbid(ulysses=cfg.ulysses, teams=cfg.teams, chunks=cfg.chunks, offload=cfg.offload)

    @property
    def layout(self):
        return TokenLayout(self.cfg.layout, outer=self.sp.size)

    def attention(self, q, k, v, causal, scale, need_lse):
        return AllGatherAttention.apply(q, k, v, self.sp.comm, self.cfg.layout, causal, scale, self.sp.kernel)
