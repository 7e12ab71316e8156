"""USP (arXiv 2405.07719): Ulysses x Ring on a 2-D mesh.

Layout rank l = ring_rank * ulysses + ulysses_rank (outer = ring, inner = Ulysses). The
option ``placement`` says which groups hold consecutive group ranks (inside a node):
``collectives_intra`` (default: Ulysses all-to-all intra-node, yunchang's
``use_ulysses_low``) or ``rings_intra`` (ring P2P intra-node) — the same mechanism as
WallFacer's placement (`seqpar.mesh.axis_order`). Ulysses all-to-all first, then
load-balanced ring attention over the ring group, then the inverse all-to-all.
"""
from __future__ import annotations

from ..comm import Comm
from ..layout import TokenLayout
from ..mesh import axis_order, physical_rank
from .base import Strategy, divisors
from .options import StrategyOptions
from .registry import register
from .ring import RingCall, ring_attention
from .ulysses import head_part, ulysses_attention


@register("usp")
class UspStrategy(Strategy):
    uses = ("ulysses", "ring", "placement")
    cost_model = "seqpar.plan.costs:USP"

    @classmethod
    def _resolve(cls, options, size, kind):
        ud = options.ulysses if options.ulysses is not None else 1
        rd = options.ring
        if rd is None:
            if size % ud:
                raise ValueError(f"usp needs ulysses x ring = group size: ulysses={ud} does not divide {size}")
            rd = size // ud
        elif ud == 1 and size % rd == 0:
            ud = size // rd  # only the ring degree given: Ulysses takes the rest
        if ud < 1 or rd < 1 or ud * rd != size:
            raise ValueError(f"usp needs ulysses x ring = group size: {ud} x {rd} != {size}")
        if rd == 1 and options.layout is None:  # no ring to balance: zigzag would only split the causal
            kind = "contiguous"             # block in three smaller kernel calls (~3% slower, throughput.md)
        return cls._settings(options, size, TokenLayout(kind, outer=rd, inner=ud), ulysses=ud, ring=rd)

    @classmethod
    def candidates(cls, size, causal, chunks=(1,)):
        """Every 2-D mesh with both degrees > 1 (the 1 x P and P x 1 ends are ulysses and ring);
        placements are compared where a topology matters (the planner's ranks per node)."""
        return [StrategyOptions(layout=kind, ulysses=u, ring=size // u) for u in divisors(size)[1:-1]
                for kind in cls._candidate_layouts(causal)]

    def __init__(self, settings, mesh, comm, stats):
        super().__init__(settings, mesh, comm, stats)
        ud, rd = settings.ulysses, settings.ring
        self._sizes = {"ring": rd, "ulysses": ud}
        self._order = axis_order(settings.placement, collective="ulysses", ring="ring")
        ulysses_group = mesh.partition([[self._physical(r, u) for u in range(ud)] for r in range(rd)])
        ring_group = mesh.partition([[self._physical(r, u) for r in range(rd)] for u in range(ud)])
        self.ulysses_comm = Comm(ulysses_group, stats)
        ring_comm = Comm(ring_group, stats)
        self.kv_ring, self.grad_ring = ring_comm.ring(tag=0), ring_comm.ring(tag=1)

    def _physical(self, ring_rank: int, ulysses_rank: int) -> int:
        return physical_rank({"ring": ring_rank, "ulysses": ulysses_rank}, self._sizes, self._order)

    def layout_ranks(self) -> list[int]:
        out = [0] * self.settings.size
        for r in range(self.settings.ring):
            for u in range(self.settings.ulysses):
                out[self._physical(r, u)] = r * self.settings.ulysses + u
        return out

    def describe(self):
        return {**super().describe(), "ulysses": self.settings.ulysses, "ring": self.settings.ring,
                "placement": self.settings.placement}

    def attention(self, q, k, v, causal, scale, need_lse, kernel, mask=None, sinks=None):
        call = RingCall(self.kv_ring, self.grad_ring, self.layout, causal, scale, kernel, mask=mask,
                        sinks=head_part(sinks, self.ulysses_comm))
        return ulysses_attention(q, k, v, self.ulysses_comm, lambda q_, k_, v_: ring_attention(q_, k_, v_, call),
                                 need_lse)
