"""WallFacer (arXiv 2407.00611): multi-dimensional ring attention with replicated teams.

P ranks form T = P/C teams of C ranks (C = ``team_size``, the replication factor; C^2 | P;
default 2 when 4 | P, else 1).
Logical rank l = t*C + a (team t, member a); G = P/C^2 is the sub-ring length.

Forward, on every rank (n = local tokens):
1. all-gather q/k/v inside the team -> the team's C*n tokens (one fused collective);
2. skewed placement (one P2P): rank (t, a) sends the team K/V to rank (a*G + t//C, t % C),
   so rank (t', a') then holds the K/V of team C*(t' mod G) + a';
3. G steps of ring attention on the sub-ring of the G teams t' of one team group
   (t'//G) with the same member a' (double-buffered P2P): member a' of team t' sees the
   K/V of every team = a' (mod C), so the C members of a team together see all K/V once;
4. LSE-weighted merge of the C partial outputs: all-gather the partial LSEs in the team,
   reduce-scatter (sum) of exp(lse_a - lse) * O_a; each member keeps its n rows.
Backward mirrors it: all-gather dO and O in the team, ring backward on the sub-ring with
the K/V placed in forward (kept: no second placement) and a dK/dV accumulator travelling
one step behind, reduce-scatter of dQ in the team, dK/dV returned to their senders by
the reverse placement (one P2P) and reduce-scattered in the team to the owners' rows.
Memory: forward saves the team's Q and the placed K/V (C*n tokens each), about 3C x the
local q/k/v like the paper's 3CA (ring: 3A), and saves re-sending K/V in backward.

C = 1 is plain ring attention (identity placement, no collectives); C = sqrt(P) has
G = 1: no sub-ring rotation, only the placement and the team collectives.
Causal masks: the token layout balances *teams* (zigzag / striped / contiguous over
T teams) and `block_pairs` is applied at team level with C*n-token blocks.

Placement on the topology (option ``placement``, the mechanism USP shares:
`seqpar.mesh.axis_order`): ``collectives_intra`` (default) puts the C members of a team on
consecutive physical ranks (team collectives stay inside a node when C <= ranks_per_node);
``rings_intra`` puts the G members of a sub-ring on consecutive physical ranks (ring P2P
stays inside a node when G <= ranks_per_node).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..comm import Comm, RingComm
from ..documents import DocMask
from ..kernels import BlockKernel
from ..layout import Pair, TokenLayout
from ..mesh import DEFAULT_PLACEMENT, PLACEMENTS, axis_order, check_placement, physical_rank
from .base import Strategy, divisors
from .options import StrategyOptions
from .registry import register
from .ring import RingCall, ring_backward, ring_forward

__all__ = ["WallFacerGrid", "WallFacerStrategy"]
_PLACE_TAG, _RETURN_TAG = 2, 3  # ring traffic uses tags 0 (K/V) and 1 (dK/dV)


@dataclass(frozen=True)
class WallFacerGrid:
    """Logical coordinates of P ranks: teams of C, sub-rings of G = P/C^2, and their physical ranks."""

    ranks: int
    team_size: int
    placement: str = DEFAULT_PLACEMENT

    def __post_init__(self):
        p, c = self.ranks, self.team_size
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"wallfacer: team_size (C) must be >= 1, got {c!r}")
        if p % c:
            raise ValueError(f"wallfacer: team_size={c} does not divide {p} ranks")
        if p % (c * c):
            raise ValueError(f"wallfacer: team_size={c} needs C^2={c * c} to divide {p} ranks (C <= sqrt(P) "
                             f"and P/C^2 sub-rings of equal length); choose C from "
                             f"{[d for d in range(1, p + 1) if p % (d * d) == 0]}")
        check_placement("wallfacer", self.placement)

    @property
    def team_count(self) -> int:
        """T = P / C teams."""
        return self.ranks // self.team_size

    @property
    def ring_len(self) -> int:
        return self.ranks // self.team_size ** 2

    def physical(self, team: int, member: int) -> int:
        """Group rank of logical rank (team, member) under the placement: team = group*G + j,
        with the team axis (member) or the sub-ring axis (j) varying fastest."""
        group, j = divmod(team, self.ring_len)
        sizes = {"group": self.team_size, "j": self.ring_len, "member": self.team_size}
        order = axis_order(self.placement, collective="member", ring="j", outer=("group",))
        return physical_rank({"group": group, "j": j, "member": member}, sizes, order)

    def logical(self) -> list[int]:
        """Logical rank t*C + a of each physical rank."""
        out = [0] * self.ranks
        for t in range(self.team_count):
            for a in range(self.team_size):
                out[self.physical(t, a)] = t * self.team_size + a
        return out

    def coords(self, physical_rank: int) -> tuple[int, int]:
        return divmod(self.logical()[physical_rank], self.team_size)

    def team_members(self, team: int) -> list[int]:
        return [self.physical(team, a) for a in range(self.team_size)]

    def subring_members(self, team: int, member: int) -> list[int]:
        """Physical ranks of the sub-ring of (team, member), in ring order."""
        first = team - team % self.ring_len
        return [self.physical(first + j, member) for j in range(self.ring_len)]

    def placement_target(self, team: int, member: int) -> tuple[int, int]:
        """Where (team, member) sends its team's K/V: (member*G + team//C, team % C)."""
        c = self.team_size
        return member * self.ring_len + team // c, team % c

    def placement_source(self, team: int, member: int) -> tuple[int, int]:
        """Inverse of placement_target: who sends its team's K/V to (team, member)."""
        return self.team_size * (team % self.ring_len) + member, team // self.ring_len

    def kv_team(self, team: int, member: int, step: int) -> int:
        """Team whose K/V (team, member) holds after `step` sub-ring rotations."""
        g = self.ring_len
        return self.team_size * ((team % g - step) % g) + member


def _node_ids(mesh, ranks_per_node: int | None) -> list[Any]:
    """Node label of each group rank: global rank // ranks_per_node (nodes hold consecutive
    global ranks) from the option, else LOCAL_WORLD_SIZE (torchrun), else the hostnames."""
    if ranks_per_node is None and os.environ.get("LOCAL_WORLD_SIZE"):
        ranks_per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    if ranks_per_node is not None:
        return [g // ranks_per_node for g in mesh.global_ranks]
    names: list[Any] = [None] * mesh.size
    dist.all_gather_object(names, socket.gethostname(), group=mesh.group)  # one-off, at init
    return names


def _same_node(node: list[Any], blocks: list[list[int]]) -> bool:
    return all(len({node[r] for r in block}) == 1 for block in blocks)


def _to_group_ranks(comm: Comm, parent_global: list[int], members: list[int]) -> list[int]:
    """Parent-group ranks -> ranks within comm's group."""
    return [comm.global_ranks.index(parent_global[m]) for m in members]


class WallFacerPlan:
    """Per-rank communicators and coordinates of one WallFacer context."""

    def __init__(self, grid: WallFacerGrid, team_comm: Comm, world: Comm, kv_ring: RingComm,
                 grad_ring: RingComm):
        self.grid, self.team_comm, self.world = grid, team_comm, world
        self.kv_ring, self.grad_ring = kv_ring, grad_ring
        self.team, self.member = grid.coords(world.rank)

    def ring_call(self, layout: TokenLayout, causal: bool, scale: float, kernel: BlockKernel,
                  team_tokens: int, mask: DocMask | None = None, sinks: Tensor | None = None) -> RingCall:
        """Sub-ring attention whose step-s blocks are the team's queries vs the K/V held then
        (`pairs_of`: those of every sub-ring position, to skip the steps no rank needs). The
        sinks join member 0's partial result only: the team merge counts them once."""
        first = self.team - self.team % self.grid.ring_len

        def pairs_of(position: int, step: int) -> list[Pair]:
            team = first + position
            kv_team = self.grid.kv_team(team, self.member, step)
            return layout.block_pairs(causal, team, kv_team, team_tokens, mask)
        return RingCall(self.kv_ring, self.grad_ring, layout, causal, scale, kernel,
                        lambda step: pairs_of(self.team - first, step), mask,
                        sinks if self.member == 0 else None, pairs_of)

    def place(self, kv_team: Tensor) -> Tensor:
        """Skewed placement: send this team's K/V [2, b, C*n, hkv, d], receive the K/V to rotate."""
        dst = self.grid.physical(*self.grid.placement_target(self.team, self.member))
        src = self.grid.physical(*self.grid.placement_source(self.team, self.member))
        return self._swap(kv_team, dst, src, _PLACE_TAG)

    def unplace(self, dkv_placed: Tensor) -> Tensor:
        """Reverse placement: return the placed block's dK/dV to its sender, get our team's back."""
        dst = self.grid.physical(*self.grid.placement_source(self.team, self.member))
        src = self.grid.physical(*self.grid.placement_target(self.team, self.member))
        return self._swap(dkv_placed, dst, src, _RETURN_TAG)

    def _swap(self, x: Tensor, dst: int, src: int, tag: int) -> Tensor:
        if dst == self.world.rank:  # then src is this rank too (the placement is a permutation)
            return x
        return self.world.exchange(x, dst, x, src, tag=tag).wait()

    def combine(self, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
        """Merge the members' partial results over disjoint K/V sets.

        out [b, C*n, h, d] (q dtype), lse [b, h, C*n] -> this member's rows out [b, n, h, d]
        and the team's global lse [b, h, C*n]."""
        team = self.team_comm
        if team.size == 1:
            return out, lse
        lse_all = team.all_gather(lse.unsqueeze(0), dim=0)  # [C, b, h, C*n]
        lse_team = torch.logsumexp(lse_all, dim=0)
        safe = torch.where(torch.isfinite(lse_team), lse_team, torch.zeros_like(lse_team))
        weight = torch.exp(lse - safe).transpose(1, 2).unsqueeze(-1)  # [b, C*n, h, 1]
        mine = team.reduce_scatter((weight * out.to(weight.dtype)).to(out.dtype), dim=1)
        return mine, lse_team


@dataclass(frozen=True)
class WallFacerCall:
    plan: WallFacerPlan
    layout: TokenLayout
    causal: bool
    scale: float
    kernel: BlockKernel
    mask: DocMask | None = None
    sinks: Tensor | None = None

    def ring(self, team_tokens: int) -> RingCall:
        return self.plan.ring_call(self.layout, self.causal, self.scale, self.kernel, team_tokens, self.mask,
                                   self.sinks)


class WallFacerAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call: WallFacerCall):
        plan, heads, kv_heads = call.plan, q.shape[2], k.shape[2]
        qkv = plan.team_comm.all_gather(torch.cat([q, k, v], dim=2), dim=1)  # [b, C*n, h + 2hkv, d]
        q_team, k_team, v_team = qkv.split([heads, kv_heads, kv_heads], dim=2)
        kv = plan.place(torch.stack([k_team, v_team]))
        out_part, lse_part = ring_forward(q_team, kv[0], kv[1], call.ring(q_team.shape[1]))
        out, lse_team = plan.combine(out_part, lse_part)
        n = q.shape[1]
        lse = lse_team[:, :, plan.member * n:(plan.member + 1) * n]
        ctx.save_for_backward(q_team.contiguous(), kv, out, lse_team)
        ctx.call = call
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q_team, kv, out, lse_team = ctx.saved_tensors
        call = ctx.call
        team = call.plan.team_comm
        dout_team, out_team = team.all_gather(torch.stack([dout.to(out.dtype), out]), dim=2).unbind(0)
        dq_team, dk, dv = ring_backward(dout_team, q_team, kv[0], kv[1], out_team, lse_team,
                                        call.ring(q_team.shape[1]))
        dq = team.reduce_scatter(dq_team, dim=1)
        dkv = team.reduce_scatter(call.plan.unplace(torch.stack([dk, dv])), dim=2)
        dtype = q_team.dtype
        return dq.to(dtype), dkv[0].to(dtype), dkv[1].to(dtype), None


@register("wallfacer")
class WallFacerStrategy(Strategy):
    """WallFacer over the whole group; `team_size` = C (replication factor)."""

    uses = ("team_size", "placement", "ranks_per_node")
    cost_model = "seqpar.plan.costs:WALLFACER"

    @classmethod
    def _resolve(cls, options, size, kind):
        c = options.team_size if options.team_size is not None else (2 if size % 4 == 0 else 1)
        grid = WallFacerGrid(size, c, options.placement or DEFAULT_PLACEMENT)
        layout = TokenLayout(kind, outer=grid.team_count, inner=grid.team_size)
        return cls._settings(options, size, layout, team_size=grid.team_size)

    @classmethod
    def candidates(cls, size, causal, chunks=(1,)):
        """Every team size C > 1 with C^2 | P, both placements where they differ (with C^2 = P
        the sub-rings have one rank and both are the same rank mapping)."""
        return [StrategyOptions(layout=kind, team_size=c, placement=placement)
                for c in divisors(size)[1:] if size % (c * c) == 0
                for placement in (PLACEMENTS[:1] if c * c == size else PLACEMENTS)
                for kind in cls._candidate_layouts(causal)]

    def __init__(self, settings, mesh, comm, stats):
        super().__init__(settings, mesh, comm, stats)
        grid = self.grid = WallFacerGrid(settings.size, settings.team_size, settings.placement)
        self._logical = grid.logical()
        team_comm = Comm(mesh.partition([grid.team_members(t) for t in range(grid.team_count)]), stats)
        team, member = grid.coords(mesh.rank)
        if _to_group_ranks(team_comm, mesh.global_ranks, grid.team_members(team)) != list(range(grid.team_size)):
            raise RuntimeError("wallfacer: team group ranks are not in member order")  # all_gather order
        ring_ranks = grid.subring_members(team, member)
        plan_rings = [comm.ring(tag=tag, ranks=ring_ranks) for tag in (0, 1)]
        self.plan = WallFacerPlan(grid, team_comm, comm, *plan_rings)
        rpn = settings.ranks_per_node
        self._topology = self._topology_info(_node_ids(mesh, rpn), rpn)

    def _topology_info(self, node: list[Any], rpn: int | None) -> dict[str, Any]:
        grid = self.grid
        teams = [grid.team_members(t) for t in range(grid.team_count)]
        rings = [grid.subring_members(t, a) for t in range(0, grid.team_count, grid.ring_len)
                 for a in range(grid.team_size)]
        return {"ranks_per_node": rpn if rpn is not None else len([x for x in node if x == node[self.mesh.rank]]),
                "collectives_intra_node": _same_node(node, teams), "rings_intra_node": _same_node(node, rings)}

    def layout_ranks(self) -> list[int]:
        return list(self._logical)

    def describe(self):
        g = self.grid
        return {**super().describe(), "team_size": g.team_size, "team_count": g.team_count, "subring": g.ring_len,
                "placement": g.placement, **self._topology}

    def attention(self, q, k, v, causal, scale, need_lse, kernel, mask=None, sinks=None):
        call = WallFacerCall(self.plan, self.layout, causal, scale, kernel, mask, sinks)
        return WallFacerAttention.apply(q, k, v, call)
