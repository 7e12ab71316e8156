"""Single-device attention through the kernel layer (no communication)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import BlockKernel
from ..layout import TokenLayout
from . import register
from .base import Strategy


class LocalAttention(torch.autograd.Function):
    """Whole-sequence attention of one rank: out, lse = kernel(q, k, v)."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, kernel: BlockKernel):
        out, lse = kernel.forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, kernel)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, kernel = ctx.args
        dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, causal, scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def local_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                    kernel: BlockKernel) -> tuple[Tensor, Tensor]:
    return LocalAttention.apply(q, k, v, causal, scale, kernel)


@register("local")
class LocalStrategy(Strategy):
    """No sequence parallelism: the group must have one rank (use it per data-parallel rank)."""

    def __init__(self, sp, cfg):
        super().__init__(sp, cfg)
        self._forbid(ulysses=cfg.ulysses, ring=cfg.ring, teams=cfg.teams, chunks=cfg.chunks)
        if sp.size != 1:
            raise ValueError(f"strategy 'local' needs a sequence-parallel group of 1 rank, got {sp.size}; "
                             "pass group=<a one-rank group> or choose a parallel strategy")

    @property
    def layout(self):
        return TokenLayout(self.cfg.layout, 1, 1)

    def attention(self, q, k, v, causal, scale, need_lse):
        return local_attention(q, k, v, causal, scale, self.sp.kernel)
