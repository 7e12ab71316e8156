"""The stage algebra of a schedule and the busiest-rank compute tables.

A schedule is what one rank does in one attention layer, forward and backward, as a list
of stages:

- `Collective`: an exposed collective on a group (kind, local tensor size, dtype size);
- `RingLoop`: steps of block compute, each overlapped with the P2P sends in flight
  during it (ring, USP's ring, WallFacer's sub-rings, one-off exchanges);
- `Compute`: exposed attention compute (Ulysses' local attention, all-gather attention).

A stage's `nbytes` is exactly what `seqpar.comm.CommStats` counts for the same call; its
`seconds` follow the alpha-beta model on `Cluster.link`, compute at flops / (peak x
efficiency). The tables count the (query, key) pairs of the busiest rank per step from
the layout's causal block rules, in O(1) per step instead of O(P).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable, Union

from ..layout import block_pairs
from ..model import ATTENTION_FLOPS_PER_PAIR
from .inputs import Cluster, Link, PlanInput

__all__ = ["Collective", "Send", "Step", "Steps", "RingLoop", "Compute", "Stage", "ATTN_BWD_FACTOR",
           "stage_kind", "bytes_by_kind", "max_bytes_by_kind", "attention_flops", "loop_steps", "pair_count",
           "block_class_pairs", "ring_step_pairs", "all_pairs_busiest", "wallfacer_step_pairs"]

ATTN_BWD_FACTOR = 2.5  # flash backward: 5 matmuls (S recompute, dV, dP, dQ, dK) vs 2 forward

_ALPHA_STEPS: dict[str, Callable[[int], int]] = {
    "all_to_all": lambda n: n - 1, "all_gather": lambda n: n - 1, "reduce_scatter": lambda n: n - 1,
    "all_reduce": lambda n: 2 * (n - 1),
}


# -- stages ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Collective:
    """One collective call. `elems` is the tensor the comm.py call is given in its convention:
    all_to_all / all_reduce: the local tensor; all_gather: the local shard; reduce_scatter:
    the output shard."""

    kind: str
    elems: int
    itemsize: int
    group: tuple[int, ...]
    phase: str
    what: str

    @property
    def nbytes(self) -> int:
        """Bytes this rank sends, exactly as CommStats records them."""
        n, b = len(self.group), self.elems * self.itemsize
        if n == 1:
            return 0
        if self.kind == "all_to_all":
            return b * (n - 1) // n
        if self.kind == "all_reduce":
            return 2 * b * (n - 1) // n
        return b * (n - 1)

    def seconds(self, cluster: Cluster) -> float:
        if len(self.group) == 1:
            return 0.0
        link = cluster.link(self.group)
        return _ALPHA_STEPS[self.kind](len(self.group)) * link.latency + self.nbytes / link.bandwidth


@dataclass(frozen=True)
class Send:
    elems: int
    itemsize: int
    what: str

    @property
    def nbytes(self) -> int:
        return self.elems * self.itemsize


@dataclass(frozen=True)
class Step:
    """Block compute (flops of the busiest rank) overlapped with the sends in flight meanwhile."""

    flops: float
    sends: tuple[Send, ...] = ()


@dataclass(frozen=True, eq=False)
class Steps:
    """The steps of one loop, built once and shared by every rank running it (hashed by identity)."""

    items: tuple[Step, ...]

    @cached_property
    def nbytes(self) -> int:
        return sum(s.nbytes for step in self.items for s in step.sends)

    @cached_property
    def flops(self) -> float:
        return sum(step.flops for step in self.items)

    @cached_property
    def block_elems(self) -> int:
        """Elements of the largest block sent in one step."""
        return max((s.elems for step in self.items for s in step.sends), default=0)


@lru_cache(maxsize=4096)
def _loop_seconds(steps: Steps, link: Link, flops_per_s: float) -> float:
    total = 0.0
    for step in steps.items:
        comm = sum(s.nbytes for s in step.sends) / link.bandwidth
        total += max(step.flops / flops_per_s, comm) + (link.latency if step.sends else 0.0)
    return total


@dataclass(frozen=True)
class RingLoop:
    """P2P steps on `group` (ring order): step time = max(compute, sends / bandwidth) + latency."""

    group: tuple[int, ...]
    phase: str
    steps: Steps

    @property
    def nbytes(self) -> int:
        return self.steps.nbytes

    def seconds(self, cluster: Cluster) -> float:
        return _loop_seconds(self.steps, cluster.link(self.group), cluster.flops_per_s)

    def compute_seconds(self, cluster: Cluster) -> float:
        return self.steps.flops / cluster.flops_per_s


@dataclass(frozen=True)
class Compute:
    """Exposed attention compute; host<->device copies (offload) are prefetched under it."""

    flops: float
    phase: str
    host_bytes: int = 0

    def seconds(self, cluster: Cluster) -> float:
        return max(self.flops / cluster.flops_per_s, self.host_bytes / (cluster.host_bw * 1e9))


Stage = Union[Collective, RingLoop, Compute]


def stage_kind(stage: Stage) -> str | None:
    if isinstance(stage, Collective):
        return stage.kind
    return "p2p" if isinstance(stage, RingLoop) else None


def bytes_by_kind(stages: list[Stage], phase: str | None = None) -> dict[str, int]:
    """Bytes sent per collective kind by the stages of one rank (CommStats' accounting)."""
    out: dict[str, int] = {}
    for stage in stages:
        kind = stage_kind(stage)
        if kind is not None and stage.nbytes and (phase is None or stage.phase == phase):
            out[kind] = out.get(kind, 0) + stage.nbytes
    return out


def max_bytes_by_kind(schedules: list[list[Stage]]) -> dict[str, int]:
    """Per kind, the most any rank sends."""
    out: dict[str, int] = {}
    for stages in schedules:
        for kind, b in bytes_by_kind(stages).items():
            out[kind] = max(out.get(kind, 0), b)
    return out


# -- block compute -----------------------------------------------------------------------------
def attention_flops(inp: PlanInput, heads: int, pairs: int) -> float:
    """Forward flops of `pairs` (query, key) pairs on `heads` heads (seqpar.model's per-pair count),
    of which packed documents keep `inp.attention_fraction`."""
    return float(inp.batch) * heads * pairs * ATTENTION_FLOPS_PER_PAIR * inp.model.head_dim * inp.attention_fraction


@lru_cache(maxsize=None)
def loop_steps(inp: PlanInput, heads: int, pairs: tuple[int, ...], block_elems: int,
               grad_sends: bool) -> tuple[Steps, Steps]:
    """ring_forward / ring_backward steps: the K/V block (input dtype) is sent at every step but
    the last; with grad_sends the dK/dV accumulator (accum dtype) is sent at every step."""
    kv = Send(block_elems, inp.itemsize, "kv")
    dkv = (Send(block_elems, inp.acc_itemsize, "dkv"),) if grad_sends else ()
    last = len(pairs) - 1
    fwd = tuple(Step(attention_flops(inp, heads, p), (kv,) if s < last else ()) for s, p in enumerate(pairs))
    bwd = tuple(Step(ATTN_BWD_FACTOR * attention_flops(inp, heads, p), ((kv,) if s < last else ()) + dkv)
                for s, p in enumerate(pairs))
    return Steps(fwd), Steps(bwd)


# -- busiest-rank tables (from layout.block_pairs) -----------------------------------------------
def _rows(s: slice, n: int) -> int:
    return len(range(*s.indices(n)))


def pair_count(pairs, n: int) -> int:
    """(query, key) pairs computed for a list of layout.block_pairs blocks of n-token ranks."""
    total = 0
    for q_rows, kv_rows, causal in pairs:
        nq, nk = _rows(q_rows, n), _rows(kv_rows, n)
        total += nq * (nq + 1) // 2 if causal else nq * nk
    return total


@lru_cache(maxsize=None)
def block_class_pairs(kind: str, causal: bool, n_local: int) -> dict[str, int]:
    """(query, key) pairs computed against the K/V of an earlier ("before"), the same, or a
    later ("after") outer rank. layout.block_pairs depends on nothing but this comparison,
    which keeps the busiest-rank tables below O(P) (tests check them against brute force)."""
    def count(q_rank: int, kv_rank: int) -> int:
        return pair_count(block_pairs(kind, causal, q_rank, kv_rank, n_local), n_local)
    return {"before": count(1, 0), "same": count(0, 0), "after": count(0, 1)}


def _order(q_rank: int, kv_rank: int) -> str:
    return "same" if q_rank == kv_rank else ("before" if kv_rank < q_rank else "after")


@lru_cache(maxsize=None)
def ring_step_pairs(kind: str, causal: bool, size: int, n_local: int) -> tuple[int, ...]:
    """Pairs computed at each ring step by the busiest ring rank: step 0 is the own block;
    at step s >= 1 ranks r >= s hold an earlier block and ranks r < s a later one."""
    cls = block_class_pairs(kind, causal, n_local)
    return (cls["same"],) + (max(cls["before"], cls["after"]),) * (size - 1)


@lru_cache(maxsize=None)
def all_pairs_busiest(kind: str, causal: bool, size: int, n_local: int) -> int:
    """Pairs of the busiest rank when every rank attends all K/V blocks (all-gather style):
    rank r has r earlier and size-1-r later blocks, so rank 0 or size-1 is the busiest."""
    cls = block_class_pairs(kind, causal, n_local)
    return cls["same"] + (size - 1) * max(cls["before"], cls["after"])


@lru_cache(maxsize=None)
def wallfacer_step_pairs(kind: str, causal: bool, world: int, team_size: int, team_tokens: int) -> tuple[int, ...]:
    """Pairs of the busiest rank at each sub-ring step (team-level block rules, C*n-token blocks)."""
    from ..attention.wallfacer import WallFacerGrid
    grid = WallFacerGrid(world, team_size)
    cls = block_class_pairs(kind, causal, team_tokens)
    return tuple(max(cls[k] for k in {_order(t, grid.kv_team(t, a, s)) for t in range(grid.team_count)
                                      for a in range(team_size)}) for s in range(grid.ring_len))
