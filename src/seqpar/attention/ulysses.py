"""DeepSpeed-Ulysses: all-to-all that scatters heads and gathers the sequence.

Each rank turns q/k/v [b, n/P, h, d] into [b, n, h/P, d] with one fused all-to-all,
runs any inner attention on whole-sequence, few-head tensors, and the inverse
all-to-all brings the output back to [b, n/P, h, d]. K/V heads that do not split over
the degree are replicated (GQA/MQA with kv_heads < degree), their gradients summed.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..comm import Comm, all_to_all_autograd
from ..layout import TokenLayout
from .base import Strategy
from .local import local_attention
from .options import StrategyOptions
from .registry import register

InnerAttention = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def kv_replication(heads: int, kv_heads: int, degree: int) -> int:
    """How often each K/V head is repeated so that heads split over `degree` ranks, or a clear error."""
    if heads % degree:
        raise ValueError(f"Ulysses degree {degree} must divide the number of attention heads ({heads}); "
                         f"use a smaller ulysses degree (with ring/usp for the rest)")
    if kv_heads % degree == 0:
        return 1
    if degree % kv_heads:
        raise ValueError(f"kv_heads ({kv_heads}) and Ulysses degree {degree} are incompatible: "
                         "one must divide the other")
    return degree // kv_heads


def scatter_heads(q: Tensor, k: Tensor, v: Tensor, comm: Comm) -> tuple[Tensor, Tensor, Tensor]:
    """[b, s, h, d] shards -> [b, s*P, h/P, d] (one fused all-to-all for q, k and v)."""
    p = comm.size
    rep = kv_replication(q.shape[2], k.shape[2], p)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    b, s, _, d = q.shape
    hq, hk = q.shape[2] // p, k.shape[2] // p
    packed = torch.cat([t.reshape(b, s, p, -1, d) for t in (q, k, v)], dim=3)  # [b, s, P, hq+2hk, d]
    packed = all_to_all_autograd(packed.flatten(2, 3), comm, scatter_dim=2, gather_dim=1)
    return packed.split([hq, hk, hk], dim=2)


def head_part(x: Tensor | None, comm: Comm) -> Tensor | None:
    """The heads [h/P] of a per-head tensor [h] (e.g. sinks) this rank holds after `scatter_heads`."""
    return x if x is None or comm.size == 1 else x.view(comm.size, -1)[comm.rank]


def gather_heads(x: Tensor, comm: Comm) -> Tensor:
    """[b, s*P, h/P, d] -> [b, s, h, d] (inverse all-to-all, differentiable)."""
    return all_to_all_autograd(x, comm, scatter_dim=1, gather_dim=2)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, comm: Comm, inner: InnerAttention,
                      need_lse: bool) -> tuple[Tensor, Tensor | None]:
    """All-to-all around `inner`; lse [b, h, s] is brought back only when asked for."""
    if comm.size == 1:
        out, lse = inner(q, k, v)
        return out, lse
    qh, kh, vh = scatter_heads(q, k, v, comm)
    out, lse = inner(qh, kh, vh)
    out = gather_heads(out, comm)
    if need_lse:
        lse = comm.all_to_all(lse.contiguous(), scatter_dim=2, gather_dim=1)
    return out, lse if need_lse else None


@register("ulysses")
class UlyssesStrategy(Strategy):
    """Ulysses over the whole group: degree = group size."""

    uses = ("ulysses", "ring")
    default_layout = "contiguous"
    cost_model = "seqpar.plan.costs:ULYSSES"

    @classmethod
    def _resolve(cls, options, size, kind):
        if options.ulysses not in (None, 1, size) or options.ring not in (None, 1):
            raise ValueError(f"strategy 'ulysses' uses the whole group (degree {size}); "
                             f"got ulysses={options.ulysses}, ring={options.ring}: use 'usp' for a 2-D mesh")
        return cls._settings(options, size, TokenLayout(kind, outer=1, inner=size), ulysses=size)

    @classmethod
    def candidates(cls, size, causal, chunks=(1,)):
        return [StrategyOptions()]  # heads, not tokens, are split: the layout changes nothing

    def attention(self, q, k, v, causal, scale, need_lse, kernel, mask=None, sinks=None):
        sinks = head_part(sinks, self.comm)
        inner = lambda q_, k_, v_: local_attention(q_, k_, v_, causal, scale, kernel, mask, sinks)  # noqa: E731
        return ulysses_attention(q, k, v, self.comm, inner, need_lse)
