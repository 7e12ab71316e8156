"""USP (arXiv 2405.07719): Ulysses x Ring on a 2-D mesh.

Group ranks form a ring_degree x ulysses_degree grid: Ulysses groups are contiguous
ranks (intra-node all-to-all), ring groups are strided. Ulysses all-to-all first, then
load-balanced ring attention over the ring group, then the inverse all-to-all.
"""
from __future__ import annotations

from ..comm import Comm
from ..layout import TokenLayout
from . import register
from .base import Strategy
from .ring import ring_attention
from .ulysses import kv_replication, ulysses_attention


@register("usp")
class UspStrategy(Strategy):
    def __init__(self, sp, cfg):
        super().__init__(sp, cfg)
        self._forbid(teams=cfg.teams, chunks=cfg.chunks, offload=cfg.offload)
        size = sp.size
        ud, rd = cfg.ulysses, cfg.ring
        if rd is None:
            rd = size // ud
        elif ud == 1 and rd and size % rd == 0:
            ud = size // rd  # only the ring degree given: Ulysses takes the rest
        if ud < 1 or rd < 1 or ud * rd != size:
            raise ValueError(f"usp needs ulysses x ring = group size: {ud} x {rd} != {size}")
        self.ulysses_degree, self.ring_degree = ud, rd
        ulysses_group, ring_group = sp.mesh.grid(rows=rd, cols=ud)
        self.ulysses_comm = Comm(ulysses_group, sp.stats)
        ring_comm = Comm(ring_group, sp.stats)
        self.kv_ring, self.grad_ring = ring_comm.ring(tag=0), ring_comm.ring(tag=1)

    @property
    def layout(self):
        return TokenLayout(self.cfg.layout, outer=self.ring_degree, inner=self.ulysses_degree)

    def describe(self):
        return {**super().describe(), "ulysses": self.ulysses_degree, "ring": self.ring_degree}

    def attention(self, q, k, v, causal, scale, need_lse):
        kv_replication(q.shape[2], k.shape[2], self.ulysses_degree)
        kernel, kind = self.sp.kernel, self.cfg.layout

        def inner(q_, k_, v_):
            return ring_attention(q_, k_, v_, self.kv_ring, self.grad_ring, kind, causal, scale, kernel)

        return ulysses_attention(q, k, v, self.ulysses_comm, inner, need_lse)
