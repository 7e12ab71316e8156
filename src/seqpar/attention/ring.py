"""Ring attention: K/V blocks rotate around a ring, partial outputs merge by LSE.

Forward: P steps; at step s this rank holds the K/V of ring rank (r - s) mod P while the
next block is in flight (double buffer). Causal masks follow the layout's block rules
(contiguous: skip future blocks; zigzag: half blocks; striped: shifted diagonal).
Backward: K/V rotate again; the dK/dV accumulator of each block travels with it on a
second ring (its own tag) and arrives back at the owner after P sends. Every buffer
(K/V double buffer, dK/dV accumulators and their receive buffers) is allocated once
per call, not per step.

Under a sliding window most rotations would carry K/V nobody sees: `RingCall.steps` lists
the ring distances s at which some rank has visible keys, and when that is not every
distance the K/V go straight to the ranks that need them (one exchange per distance s:
to ring rank r + s, from r - s), each dK/dV straight back to its owner: per rank
|S| K/V blocks forward, |S| K/V and |S| dK/dV blocks backward instead of P-1, P-1 and P
(`seqpar.plan.schedules.windowed_ring_blocks`).
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
PairsOf = Callable[[int, int], list[Pair]]  # (ring position, step) -> that position's blocks


@dataclass(frozen=True)
class RingCall:
    """Per-call arguments of ring attention.

    pairs_at(step) gives the blocks to compute against the K/V held after `step`
    rotations (None: the layout's block rule with ring positions as outer ranks, or the
    document mask's sub-blocks when `mask` is given); pairs_of(position, step) the same for
    any ring position (to find the steps no rank needs). sinks [h]: attention-sink logits
    merged into this rank's result."""

    ring: RingComm
    grad_ring: RingComm
    layout: TokenLayout
    causal: bool
    scale: float
    kernel: BlockKernel
    pairs_at: PairsAt | None = None
    mask: DocMask | None = None
    sinks: Tensor | None = None
    pairs_of: PairsOf | None = None

    def blocks(self, step: int, n_local: int) -> list[Pair]:
        if self.pairs_at is not None:
            return self.pairs_at(step)
        return self._pairs_of(self.ring.rank, step, n_local)

    def _pairs_of(self, position: int, step: int, n_local: int) -> list[Pair]:
        if self.pairs_of is not None:
            return self.pairs_of(position, step)
        size = self.ring.size
        return self.layout.block_pairs(self.causal, position, (position - step) % size, n_local, self.mask)

    def steps(self, n_local: int) -> list[int] | None:
        """Ring distances (> 0) at which some rank sees keys, when a window leaves some out;
        None: every rotation is needed (the plain ring)."""
        if self.mask is None or self.mask.window is None:
            return None
        size = self.ring.size
        needed = [s for s in range(1, size) if any(self._pairs_of(p, s, n_local) for p in range(size))]
        return None if len(needed) == size - 1 else needed


def ring_forward(q: Tensor, k: Tensor, v: Tensor, call: RingCall) -> tuple[Tensor, Tensor]:
    """q [b, n, h, d], k/v [b, n, hkv, d] of this ring rank -> out [b, n, h, d], lse [b, h, n]."""
    acc = LseAccumulator(q, call.sinks)
    kv = torch.stack([k, v])
    steps = call.steps(q.shape[1])
    if steps is not None:
        return _direct_forward(acc, q, kv, call, steps)
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
    steps = call.steps(q.shape[1])
    if steps is not None:
        return _direct_backward(dq, dout, q, kv, out, lse, call, steps)
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


def _direct_forward(acc: LseAccumulator, q: Tensor, kv: Tensor, call: RingCall,
                    steps: list[int]) -> tuple[Tensor, Tensor]:
    """ring_forward when only the distances `steps` carry visible K/V: one exchange per distance
    (the next one in flight while a block is computed)."""
    n = q.shape[1]
    pending = call.ring.shift(kv, steps[0]) if steps else None
    forward_blocks(acc, q, kv[0], kv[1], call.blocks(0, n), call.kernel, call.scale)
    for i, step in enumerate(steps):
        held = pending.wait()
        pending = call.ring.shift(kv, steps[i + 1]) if i + 1 < len(steps) else None
        forward_blocks(acc, q, held[0], held[1], call.blocks(step, n), call.kernel, call.scale)
    return acc.result(q.dtype)


def _direct_backward(dq: Tensor, dout: Tensor, q: Tensor, kv: Tensor, out: Tensor, lse: Tensor, call: RingCall,
                     steps: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """ring_backward for `_direct_forward`: the K/V of each distance again, its dK/dV straight back."""
    n = q.shape[1]
    own = grad_buffers(kv[0], 2)
    backward_blocks(dq, own[0], own[1], dout, q, kv[0], kv[1], out, lse, call.blocks(0, n), call.kernel, call.scale)
    pending = call.ring.shift(kv, steps[0]) if steps else None
    returning = []
    for i, step in enumerate(steps):
        held = pending.wait()
        pending = call.ring.shift(kv, steps[i + 1]) if i + 1 < len(steps) else None
        dkv = grad_buffers(kv[0], 2)
        backward_blocks(dq, dkv[0], dkv[1], dout, q, held[0], held[1], out, lse, call.blocks(step, n),
                        call.kernel, call.scale)
        returning.append(call.grad_ring.shift(dkv, -step))  # to its owner; ours from rank r + step
    for handle in returning:
        own += handle.wait()
    return dq, own[0], own[1]


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
        return local_attention(q, k, v, call.causal, call.scale, call.kernel, call.mask, call.sinks)
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

    def attention(self, q, k, v, causal, scale, need_lse, kernel, mask=None, sinks=None):
        call = RingCall(self.kv_ring, self.grad_ring, self.layout, causal, scale, kernel, mask=mask, sinks=sinks)
        return ring_attention(q, k, v, call)
