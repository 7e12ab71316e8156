"""The stage algebra of a schedule: collectives, ring loops, exposed compute, attention loads.

A schedule is what one rank does in one attention layer, forward and backward, as a list
of stages:

- `Collective`: an exposed collective on a group (kind, local tensor size, dtype size);
- `RingLoop`: steps of block compute, each overlapped with the P2P sends in flight
  during it (ring, USP's ring, WallFacer's sub-rings, one-off exchanges);
- `Compute`: exposed attention compute (Ulysses' local attention, all-gather attention).

A stage's `nbytes` is exactly what `seqpar.comm.CommStats` counts for the same call; its
`seconds(hw)` follow the alpha-beta model on `Hardware.link` and the attention `Load` of each
step: the kernel calls of every class of ranks, timed at flops / (peak x efficiency) or by a
calibrated kernel table. seqpar.plan.tables derives them from the
layout's causal block rules.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Union

from ..model import ATTENTION_FLOPS_PER_PAIR
from .inputs import Hardware, Link, PlanInput

__all__ = ["Collective", "Send", "Step", "Steps", "RingLoop", "Compute", "Stage", "Work", "Load", "ATTN_BWD_FACTOR",
           "stage_kind", "bytes_by_kind", "max_bytes_by_kind", "attention_flops", "loop_steps", "balanced_loads",
           "work_of", "shared_makespan"]

ATTN_BWD_FACTOR = 2.5  # flash backward: 5 matmuls (S recompute, dV, dP, dQ, dK) vs 2 forward


# -- attention work ----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Work:
    """Kernel calls of one rank: ((q rows, kv rows, causal, count), ...) on `rows` = batch x
    query heads of `head_dim`, forward or backward; `merged`: forward results merged into a
    running output by log-sum-exp (block loops; not a whole-sequence local call). Built once
    per table (hashed by identity)."""

    calls: tuple[tuple[int, int, bool, float], ...]
    rows: int
    head_dim: int
    backward: bool
    merged: bool = True

    @cached_property
    def flops(self) -> float:
        return self._flops_of(sum(c * (nq * (nq + 1) // 2 if causal else nq * nk) for nq, nk, causal, c in self.calls))

    def _flops_of(self, pairs: float) -> float:
        flops = float(self.rows) * pairs * ATTENTION_FLOPS_PER_PAIR * self.head_dim
        return ATTN_BWD_FACTOR * flops if self.backward else flops

    def curve_flops(self, half_tokens: float) -> float:
        """Flops timed at the long-call attention speed when a call of p (query, key) pairs on
        nq + nk rows runs at L / (L + half_tokens) of it, L = 2p / (nq + nk) (the call's length:
        nk for nq x nk, n / 2 for a causal n x n): each call pays half_tokens / 2 pairs per
        query and key row (`Cluster.attn_half_tokens`)."""
        rows = sum(c * (nq + nk) for nq, nk, _, c in self.calls)
        return self.flops + self._flops_of(half_tokens * rows / 2)

    def seconds(self, hw: Hardware, together: bool = False) -> float:
        """flops at peak x efficiency (of each call's length with `attn_half_tokens`), or the
        calibrated kernel time of each call (one rank alone, or while every rank computes)."""
        table = hw.kernels
        if table is None:
            half = hw.attn_half_tokens
            return (self.flops if half is None else self.curve_flops(half)) / hw.flops_per_s
        t = sum(c * table.seconds(nq, nk, causal, self.backward, self.rows, self.head_dim, together)
                for nq, nk, causal, c in self.calls)
        if self.merged and not self.backward:
            t += sum(c * nq for nq, _, _, c in self.calls) * self.rows * self.head_dim * table.merge_s[together]
        return t


def work_of(parts, rows: int, head_dim: int, backward: bool, merged: bool = True) -> Work:
    """A Work from (calls, weight) parts: weights of equal calls add up."""
    total: dict[tuple[int, int, bool], float] = {}
    for calls, weight in parts:
        for call in calls:
            total[call] = total.get(call, 0.0) + weight
    return Work(tuple((nq, nk, causal, w) for (nq, nk, causal), w in total.items() if w), rows, head_dim, backward,
                merged)


@dataclass(frozen=True, eq=False)
class Load:
    """The attention work of one synchronous step over the world: (work, share of the world's
    ranks doing it), shares summing to 1. With flags the step takes its busiest rank; with a
    calibration, the makespan of the ranks sharing the cores (`shared_makespan`)."""

    classes: tuple[tuple[Work, float], ...]

    @cached_property
    def flops(self) -> float:
        """Flops of the busiest rank."""
        return max((w.flops for w, share in self.classes if share), default=0.0)

    def seconds(self, hw: Hardware) -> float:
        return _load_seconds(self, hw)


def shared_makespan(alone: list[tuple[float, float]], slots: float) -> float:
    """When the last of a group of ranks finishes, each needing `seconds` alone, `count` of
    them per (seconds, count), sharing `slots` cores fairly: while k ranks run each progresses
    at min(1, slots / k). (Ranks that finish or wait free their cores for the others.)"""
    active, done, t = sum(n for _, n in alone), 0.0, 0.0
    for seconds, count in sorted(alone):
        if seconds > done:
            t += (seconds - done) / min(1.0, slots / active)
            done = seconds
        active -= count
    return t


@lru_cache(maxsize=65536)
def _load_seconds(load: Load, hw: Hardware) -> float:
    alone = [(w.seconds(hw), share) for w, share in load.classes if share]
    if not alone:
        return 0.0
    if hw.kernels is None:
        return max(t for t, _ in alone)
    # every rank computing at once runs at the measured together-speed: slots = P alone / together
    mean_alone = sum(t * share for t, share in alone)
    together = sum(w.seconds(hw, together=True) * share for w, share in load.classes if share)
    if mean_alone <= 0 or together <= 0:
        return max(t for t, _ in alone)
    world = hw.world
    slots = min(float(world), max(1.0, world * mean_alone / together))
    return shared_makespan([(t, share * world) for t, share in alone], slots)


def balanced_loads(calls, rows: int, head_dim: int, merged: bool = True) -> tuple[Load, Load]:
    """(forward, backward) loads of a step where every rank makes the same kernel calls."""
    return tuple(Load(((work_of([(calls, 1.0)], rows, head_dim, backward, merged), 1.0),))
                 for backward in (False, True))


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

    def seconds(self, hw: Hardware) -> float:
        if len(self.group) == 1:
            return 0.0
        return hw.link(self.group).seconds(self.kind, len(self.group), self.nbytes) + hw.sync_s


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
    """Block compute (`load`, None for none) overlapped with the sends in flight meanwhile."""

    load: Load | None
    sends: tuple[Send, ...] = ()

    @property
    def flops(self) -> float:
        """Flops of the busiest rank."""
        return self.load.flops if self.load is not None else 0.0


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
def _loop_seconds(steps: Steps, link: Link, hw: Hardware) -> float:
    alpha, beta = link.alpha_beta("p2p")
    total = 0.0
    for step in steps.items:
        compute = step.load.seconds(hw) if step.load is not None else 0.0
        comm = sum(s.nbytes for s in step.sends) * beta
        total += hw.combine(compute, comm) + (alpha + hw.sync_s if step.sends else 0.0)
    return total


@dataclass(frozen=True)
class RingLoop:
    """P2P steps on `group` (ring order): step time = compute and sends combined (the longer
    one when they overlap) + one latency (+ the calibrated sync cost)."""

    group: tuple[int, ...]
    phase: str
    steps: Steps

    @property
    def nbytes(self) -> int:
        return self.steps.nbytes

    def seconds(self, hw: Hardware) -> float:
        return _loop_seconds(self.steps, hw.p2p_link(self.group), hw)

    def compute_seconds(self, hw: Hardware) -> float:
        return _loop_compute_seconds(self.steps, hw)


@lru_cache(maxsize=4096)
def _loop_compute_seconds(steps: Steps, hw: Hardware) -> float:
    return sum(step.load.seconds(hw) for step in steps.items if step.load is not None)


@dataclass(frozen=True)
class Compute:
    """Exposed attention compute; host<->device copies (offload) are prefetched under it."""

    load: Load
    phase: str
    host_bytes: int = 0

    @property
    def flops(self) -> float:
        return self.load.flops

    def seconds(self, hw: Hardware) -> float:
        return hw.combine(self.load.seconds(hw), self.host_bytes / hw.host_bw)

    def compute_seconds(self, hw: Hardware) -> float:
        return self.load.seconds(hw)


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
    return inp.attention_rows(heads) * pairs * ATTENTION_FLOPS_PER_PAIR * inp.model.head_dim


@lru_cache(maxsize=None)
def loop_steps(inp: PlanInput, loads: tuple[tuple[Load, Load], ...], block_elems: int,
               grad_sends: bool) -> tuple[Steps, Steps]:
    """ring_forward / ring_backward steps from (forward, backward) loads per step: the K/V block
    (input dtype) is sent at every step but the last; with grad_sends the dK/dV accumulator
    (accum dtype) is sent at every step."""
    kv = Send(block_elems, inp.itemsize, "kv")
    dkv = (Send(block_elems, inp.acc_itemsize, "dkv"),) if grad_sends else ()
    last = len(loads) - 1
    fwd = tuple(Step(f, (kv,) if s < last else ()) for s, (f, _) in enumerate(loads))
    bwd = tuple(Step(b, ((kv,) if s < last else ()) + dkv) for s, (_, b) in enumerate(loads))
    return Steps(fwd), Steps(bwd)
