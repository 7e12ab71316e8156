"""Single-device attention through the kernel layer (no communication)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import BlockKernel
from ..layout import TokenLayout
from . import register
from .base import Strategy


@dataclass(frozen=True)
class LocalCall:
    causal: bool
    scale: float
    kernel: BlockKernel


class LocalAttention(torch.autograd.Function):
    """Whole-sequence attention of one rank: out, lse = kernel(q, k, v)."""

    @staticmethod
    def forward(ctx, q, k, v, call: LocalCall):
        out, lse = call.kernel.forward(q, k, v, call.causal, call.scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        call = ctx.call
        dq, dk, dv = call.kernel.backward(dout, q, k, v, out, lse, call.causal, call.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def local_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                    kernel: BlockKernel) -> tuple[Tensor, Tensor]:
    """Differentiable attention of whole local tensors -> out [b, s, h, d], lse [b, h, s]."""
    return LocalAttention.apply(q, k, v, LocalCall(causal, scale, kernel))


@register("local")
class LocalStrategy(Strategy):
    """No sequence parallelism: the group must have one rank (use it per data-parallel rank)."""

    default_layout = "contiguous"

    @classmethod
    def _resolve(cls, cfg, size, kind):
        if size != 1:
            raise ValueError(f"strategy 'local' needs sp = 1: it needs a sequence-parallel group of 1 rank, got "
                             f"{size}; pass group=<a one-rank group> or choose a sequence-parallel strategy")
        return cls._settings(cfg, size, TokenLayout(kind, 1, 1))

    def attention(self, q, k, v, causal, scale, need_lse, kernel):
        return local_attention(q, k, v, causal, scale, kernel)
