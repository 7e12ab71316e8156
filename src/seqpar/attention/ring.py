"""Ring attention: K/V blocks rotate around a ring, partial outputs merge by LSE.

Forward: P steps; at step s this rank holds the K/V of ring rank (r - s) mod P while the
next block is in flight (double buffer). Causal masks follow the layout's block rules
(contiguous: skip future blocks; zigzag: half blocks; striped: shifted diagonal).
Backward: K/V rotate again; the dK/dV accumulator of each block travels with it on a
second ring (its own tag) and arrives back at the owner after P sends.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..comm import RingComm
from ..kernels import BlockKernel, LseAccumulator
from ..layout import Pair, TokenLayout, block_pairs
from . import register
from .base import Strategy, backward_blocks, forward_blocks, grad_buffers
from .local import local_attention


PairsAt = Callable[[int], list[Pair]]


def _ring_pairs(kind: str, causal: bool, ring: RingComm, n_local: int) -> PairsAt:
    """Blocks of step s when ring positions are the layout's outer ranks (plain ring attention)."""
    return lambda step: block_pairs(kind, causal, ring.rank, ring.source(step), n_local)


def ring_forward(q: Tensor, k: Tensor, v: Tensor, ring: RingComm, kind: str, causal: bool, scale: float,
                 kernel: BlockKernel, pairs_at: PairsAt | None = None) -> tuple[Tensor, Tensor]:
    """q [b, n, h, d], k/v [b, n, hkv, d] of this ring rank -> out [b, n, h, d], lse [b, h, n].

    pairs_at(step) gives the blocks to compute against the K/V held after `step` rotations
    (default: the layout's block rule with ring positions as outer ranks)."""
    acc = LseAccumulator(q)
    kv = torch.stack([k, v])
    pairs_at = pairs_at or _ring_pairs(kind, causal, ring, q.shape[1])
    for step in range(ring.size):
        pending = ring.send_recv(kv) if step + 1 < ring.size else None
        forward_blocks(acc, q, kv[0], kv[1], pairs_at(step), kernel, scale)
        if pending is not None:
            kv = pending.wait()
    return acc.result(q.dtype)


def ring_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, ring: RingComm,
                  grad_ring: RingComm, kind: str, causal: bool, scale: float,
                  kernel: BlockKernel, pairs_at: PairsAt | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Exact dq, dk, dv (accum dtype) for ring_forward's inputs (same pairs_at)."""
    dq = grad_buffers(q)
    kv = torch.stack([k, v])
    incoming = None
    pairs_at = pairs_at or _ring_pairs(kind, causal, ring, q.shape[1])
    for step in range(ring.size):
        pending = ring.send_recv(kv) if step + 1 < ring.size else None
        dkv = grad_buffers(k, 2)
        backward_blocks(dq, dkv[0], dkv[1], dout, q, kv[0], kv[1], out, lse, pairs_at(step), kernel, scale)
        if incoming is not None:
            dkv += incoming.wait()  # what earlier ranks accumulated for this block
        if ring.size > 1:
            incoming = grad_ring.send_recv(dkv)
        if pending is not None:
            kv = pending.wait()
    if incoming is not None:
        dkv = incoming.wait()  # our own block, back home with every rank's contribution
    return dq, dkv[0], dkv[1]


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: RingComm, grad_ring: RingComm, kind: str, causal: bool, scale: float,
                kernel: BlockKernel):
        out, lse = ring_forward(q, k, v, ring, kind, causal, scale, kernel)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (ring, grad_ring, kind, causal, scale, kernel)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, *ctx.args)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, ring: RingComm, grad_ring: RingComm, kind: str,
                   causal: bool, scale: float, kernel: BlockKernel) -> tuple[Tensor, Tensor]:
    """Differentiable ring attention over `ring` (falls back to local attention on 1 rank)."""
    if ring.size == 1:
        return local_attention(q, k, v, causal, scale, kernel)
    return RingAttention.apply(q, k, v, ring, grad_ring, kind, causal, scale, kernel)


@register("ring")
class RingStrategy(Strategy):
    """Ring attention over the whole sequence-parallel group."""

    def __init__(self, sp, cfg):
        super().__init__(sp, cfg)
        self._forbid(ulysses=cfg.ulysses, teams=cfg.teams, chunks=cfg.chunks, offload=cfg.offload)
        if cfg.ring not in (None, sp.size):
            raise ValueError(f"ring={cfg.ring} does not match the group size {sp.size}")
        self.kv_ring = sp.comm.ring(tag=0)
        self.grad_ring = sp.comm.ring(tag=1)

    @property
    def layout(self):
        return TokenLayout(self.cfg.layout, outer=self.sp.size)

    def attention(self, q, k, v, causal, scale, need_lse):
        return ring_attention(q, k, v, self.kv_ring, self.grad_ring, self.cfg.layout, causal, scale,
                              self.sp.kernel)
