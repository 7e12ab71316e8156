"""Single-device attention through the kernel layer (no communication)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..documents import DocMask
from ..kernels import BlockKernel, LseAccumulator, with_sinks
from ..layout import TokenLayout
from .base import Strategy, backward_blocks, forward_blocks, grad_buffers
from .registry import register


@dataclass(frozen=True)
class LocalCall:
    causal: bool
    scale: float
    kernel: BlockKernel
    mask: DocMask | None = None
    sinks: Tensor | None = None  # [h] attention-sink logits (no gradient here: the context's)

    def blocks(self, n: int) -> list:
        """Sub-blocks of the whole sequence (positions 0..n-1) under the document mask."""
        pos = torch.arange(n)
        return self.mask.pairs(pos, pos, key="local")


class LocalAttention(torch.autograd.Function):
    """Whole-sequence attention of one rank: out, lse = kernel(q, k, v) (block by block under a
    document mask)."""

    @staticmethod
    def forward(ctx, q, k, v, call: LocalCall):
        if call.mask is None:
            out, lse = with_sinks(*call.kernel.forward(q, k, v, call.causal, call.scale), call.sinks)
        else:
            acc = LseAccumulator(q, call.sinks)
            forward_blocks(acc, q, k, v, call.blocks(q.shape[1]), call.kernel, call.scale)
            out, lse = acc.result(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        call = ctx.call
        if call.mask is None:
            dq, dk, dv = call.kernel.backward(dout, q, k, v, out, lse, call.causal, call.scale)
        else:
            dq, dk, dv = grad_buffers(q), grad_buffers(k), grad_buffers(v)
            backward_blocks(dq, dk, dv, dout, q, k, v, out, lse, call.blocks(q.shape[1]), call.kernel, call.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def local_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                    kernel: BlockKernel, mask: DocMask | None = None,
                    sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Differentiable attention of whole local tensors -> out [b, s, h, d], lse [b, h, s]
    (sinks [h]: merged into the final softmax)."""
    return LocalAttention.apply(q, k, v, LocalCall(causal, scale, kernel, mask, sinks))


@register("local")
class LocalStrategy(Strategy):
    """No sequence parallelism: the group must have one rank (use it per data-parallel rank)."""

    default_layout = "contiguous"

    @classmethod
    def _resolve(cls, options, size, kind):
        if size != 1:
            raise ValueError(f"strategy 'local' needs sp = 1: it needs a sequence-parallel group of 1 rank, got "
                             f"{size}; pass group=<a one-rank group> or choose a sequence-parallel strategy")
        return cls._settings(options, size, TokenLayout(kind, 1, 1))

    @classmethod
    def candidates(cls, size, causal, chunks=(1,)):
        return []  # no sequence parallelism: nothing for the planner to compare

    def attention(self, q, k, v, causal, scale, need_lse, kernel, mask=None, sinks=None):
        return local_attention(q, k, v, causal, scale, kernel, mask, sinks)
