"""Ring attention: K/V blocks rotate around a ring, partial outputs merge by LSE.

Forward: P steps; at step s this rank holds the K/V of ring rank (r - s) mod P while the
next block is in flight (double buffer). Causal masks follow the layout's block rules
(contiguous: skip future blocks; zigzag: half blocks; striped: shifted diagonal).
Backward: K/V rotate again; the dK/dV accumulator of each block travels with it on a
second ring (its own tag) and arrives back at the owner after P sends. Every buffer
(K/V double buffer, dK/dV accumulators and their receive buffers) is allocated once
per call, not per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..comm import RingComm
from ..documents import DocMask
from ..kernels import BlockKernel, LseAccumulator
from ..layout import Pair, TokenLayout
from .base import Strategy, backward_blocks, forward_blocks, grad_buffers
from .local import local_attention
from .registry import register

PairsAt = Callable[[int], list[Pair]]


@dataclass(frozen=True)
class RingCall:
    """Per-call arguments of ring attention.

    pairs_at(step) gives the blocks to compute against the K/V held after `step`
    rotations (None: the layout's block rule with ring positions as outer ranks, or the
    document mask's sub-blocks when `mask` is given)."""

    ring: RingComm
    grad_ring: RingComm
    layout: TokenLayout
    causal: bool
    scale: float
    kernel: BlockKernel
    pairs_at: PairsAt | None = None
    mask: DocMask | None = None

    def blocks(self, step: int, n_local: int) -> list[Pair]:
        if self.pairs_at is not None:
            return self.pairs_at(step)
        return self.layout.block_pairs(self.causal, self.ring.rank, self.ring.source(step), n_local, self.mask)


def ring_forward(q: Tensor, k: Tensor, v: Tensor, call: RingCall) -> tuple[Tensor, Tensor]:
    """q [b, n, h, d], k/v [b, n, hkv, d] of this ring rank -> out [b, n, h, d], lse [b, h, n]."""
    acc = LseAccumulator(q)
    kv = torch.stack([k, v])
    spare = torch.empty_like(kv) if call.ring.size > 1 else None
    for step in range(call.ring.size):
        pending = call.ring.send_recv(kv, out=spare) if step + 1 < call.ring.size else None
        forward_blocks(acc, q, kv[0], kv[1], call.blocks(step, q.shape[1]), call.kernel, call.scale)
        if pending is not None:
            kv, spare = pending.wait(), kv
    return acc.result(q.dtype)


def ring_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  call: RingCall) -> tuple[Tensor, Tensor, Tensor]:
    """Exact dq, dk, dv (accum dtype) for ring_forward's inputs (same call)."""
    ring, size = call.ring, call.ring.size
    dq = grad_buffers(q)
    kv = torch.stack([k, v])
    spare = torch.empty_like(kv) if size > 1 else None
    dkv_slots = grad_buffers(k, 2, 2)            # [slot, k|v, b, n, hkv, d]: one being sent, one filled
    recv_slots = torch.empty_like(dkv_slots)     # where the travelling accumulators arrive
    incoming = None
    for step in range(size):
        pending = ring.send_recv(kv, out=spare) if step + 1 < size else None
        dkv = dkv_slots[step % 2].zero_()        # its previous send completed with last step's wait
        backward_blocks(dq, dkv[0], dkv[1], dout, q, kv[0], kv[1], out, lse, call.blocks(step, q.shape[1]),
                        call.kernel, call.scale)
        if incoming is not None:
            dkv += incoming.wait()  # what earlier ranks accumulated for this block
        if size > 1:
            incoming = call.grad_ring.send_recv(dkv, out=recv_slots[step % 2])
        if pending is not None:
            kv, spare = pending.wait(), kv
    if incoming is not None:
        dkv = incoming.wait()  # our own block, back home with every rank's contribution
    return dq, dkv[0], dkv[1]


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call: RingCall):
        out, lse = ring_forward(q, k, v, call)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx.call)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, call: RingCall) -> tuple[Tensor, Tensor]:
    """Differentiable ring attention over `call.ring` (falls back to local attention on 1 rank)."""
    if call.ring.size == 1:
        return local_attention(q, k, v, call.causal, call.scale, call.kernel, call.mask)
    return RingAttention.apply(q, k, v, call)


@register("ring")
class RingStrategy(Strategy):
    """Ring attention over the whole sequence-parallel group (`ring` may only restate its size)."""

    uses = ("ring",)
    cost_model = "seqpar.plan.costs:RING"

    @classmethod
    def _resolve(cls, options, size, kind):
        if options.ring is not None and options.ring != size:
            raise ValueError(f"ring={options.ring} does not match the group size {size}")
        return cls._settings(options, size, TokenLayout(kind, outer=size), ring=size)

    def __init__(self, settings, mesh, comm, stats):
        super().__init__(settings, mesh, comm, stats)
        self.kv_ring, self.grad_ring = comm.ring(tag=0), comm.ring(tag=1)

    def attention(self, q, k, v, causal, scale, need_lse, kernel, mask=None):
        call = RingCall(self.kv_ring, self.grad_ring, self.layout, causal, scale, kernel, mask=mask)
        return ring_attention(q, k, v, call)
