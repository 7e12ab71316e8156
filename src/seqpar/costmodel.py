"""Analytical cost model of seqpar's strategies: bytes, time and memory per rank.

For one candidate (strategy + degrees + layout) the model writes down the *schedule* of
one attention layer, forward and backward, as seen by one rank: a list of stages

- `Collective`: an exposed collective on a group (kind, local tensor size, dtype size);
- `RingLoop`: steps of block compute, each overlapped with the P2P sends in flight
  during it (ring, USP's ring, WallFacer's sub-rings, one-off exchanges);
- `Compute`: exposed attention compute (Ulysses' local attention, all-gather attention).

Each stage is derived from the strategy's source (see the `*_schedule` functions) so
that the bytes a stage sends are exactly what `seqpar.comm.CommStats` counts for the
same call (tests compare both on real process worlds). Times use the alpha-beta model
on a two-level topology (`Cluster.link`); compute time is flops / (peak x efficiency).
Memory per rank is model states + saved activations + the attention working set.
The equations are written out in docs/planner.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from typing import Callable, Union

from .layout import TokenLayout, block_pairs

__all__ = ["ModelShape", "Cluster", "PlanInput", "Config", "Candidate", "Collective", "RingLoop", "Compute",
           "Send", "Step", "MODEL_PRESETS", "DTYPE_BYTES", "candidate_configs", "evaluate", "plan",
           "attention_schedule", "attention_bytes", "bytes_by_kind", "max_bytes_by_kind", "paper_block_volume", "GiB"]

GiB = 2 ** 30
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
ATTN_FLOPS_PER_PAIR = 4        # x head_dim per (query, key) pair and head: QK^T and PV, 2 flops/MAC
ATTN_BWD_FACTOR = 2.5          # flash backward: 5 matmuls (S recompute, dV, dP, dQ, dK) vs 2 forward
DENSE_BWD_FACTOR = 2.0         # backward of a linear layer: grad input + grad weight
STRATEGY_ORDER = ("ring", "ulysses", "usp", "allgather", "lss", "fpdt", "wallfacer")


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """Llama-style decoder: `layers` blocks of GQA attention + SwiGLU MLP, untied embeddings."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    vocab: int

    def __post_init__(self):
        for name in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"model {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        h, f = self.hidden, self.ffn_hidden
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * f + 2 * h

    def params(self) -> int:
        return self.layers * self.layer_params() + 2 * self.vocab * self.hidden + self.hidden


MODEL_PRESETS = {
    "llama-3b": ModelShape(26, 3200, 32, 32, 8640, 32000),
    "llama-7b": ModelShape(32, 4096, 32, 32, 11008, 32000),
    "llama-13b": ModelShape(40, 5120, 40, 40, 13824, 32000),
    "llama-30b": ModelShape(60, 6656, 52, 52, 17920, 32000),
    "llama3-8b": ModelShape(32, 4096, 32, 8, 14336, 128256),
    "tiny": ModelShape(2, 64, 8, 4, 128, 256),
}


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes / s, per rank and direction
    latency: float    # seconds per message


@dataclass(frozen=True)
class Cluster:
    """`world` ranks, `ranks_per_node` consecutive ranks per node; per-rank link bandwidths
    (GB/s = 1e9 B/s) and latencies (us); device peak TFLOP/s x efficiency; memory in GiB;
    host link bandwidth (GB/s) for offloading."""

    world: int
    ranks_per_node: int = 8
    intra_bw: float = 150.0
    inter_bw: float = 25.0
    intra_lat: float = 5.0
    inter_lat: float = 20.0
    tflops: float = 312.0
    efficiency: float = 0.5
    memory_gib: float = 80.0
    host_bw: float = 25.0

    def __post_init__(self):
        if self.world < 2:
            raise ValueError(f"world size must be >= 2 to plan sequence parallelism, got {self.world}")
        if self.ranks_per_node < 1:
            raise ValueError(f"ranks per node must be >= 1, got {self.ranks_per_node}")
        if self.world > self.ranks_per_node and self.world % self.ranks_per_node:
            raise ValueError(f"world size {self.world} is not a multiple of ranks per node {self.ranks_per_node}")
        for name in ("intra_bw", "inter_bw", "tflops", "memory_gib", "host_bw"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("intra_lat", "inter_lat"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency must be in (0, 1], got {self.efficiency}")

    @cached_property
    def ranks(self) -> tuple[int, ...]:
        """All ranks, as one shared tuple (the group of whole-world strategies)."""
        return tuple(range(self.world))

    @property
    def flops_per_s(self) -> float:
        return self.tflops * 1e12 * self.efficiency

    def node(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def link(self, group: tuple[int, ...]) -> Link:
        """The link a group's traffic crosses: inter-node as soon as its ranks span nodes (for a
        ring that is its slowest hop)."""
        if self.node(min(group)) != self.node(max(group)):  # nodes hold consecutive ranks
            return Link(self.inter_bw * 1e9, self.inter_lat * 1e-6)
        return Link(self.intra_bw * 1e9, self.intra_lat * 1e-6)


@dataclass(frozen=True)
class PlanInput:
    cluster: Cluster
    model: ModelShape
    seq_len: int
    batch: int = 1
    dtype: str = "bfloat16"
    causal: bool = True
    zero: int = 0  # ZeRO stage over the world: 1 shards optimizer states, 2 also grads, 3 also weights

    def __post_init__(self):
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"zero stage must be 0, 1, 2 or 3, got {self.zero}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {sorted(DTYPE_BYTES)}")
        if self.seq_len < 1 or self.batch < 1:
            raise ValueError(f"sequence length and batch must be >= 1, got {self.seq_len}, {self.batch}")
        if self.seq_len % self.cluster.world:
            raise ValueError(f"sequence length {self.seq_len} is not divisible by the world size "
                             f"{self.cluster.world}")

    @property
    def world(self) -> int:
        return self.cluster.world

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def acc_itemsize(self) -> int:
        """Gradient accumulators / attention outputs before the cast (kernels.accum_dtype)."""
        return 8 if self.dtype == "float64" else 4

    @property
    def tokens_per_rank(self) -> int:
        return self.seq_len // self.world


@dataclass(frozen=True)
class Config:
    """One candidate: the arguments of `seqpar.init` (plus WallFacer's placement)."""

    strategy: str
    layout: str = "contiguous"
    ulysses: int = 1
    ring: int | None = None
    teams: int = 1
    chunks: int = 1
    offload: bool = False
    placement: str | None = None

    def init_kwargs(self, ranks_per_node: int | None = None) -> dict:
        kw: dict = {"layout": self.layout}
        if self.strategy == "usp":
            kw.update(ulysses=self.ulysses, ring=self.ring)
        if self.teams > 1:
            kw["teams"] = self.teams
        if self.chunks > 1:
            kw["chunks"] = self.chunks
        if self.offload:
            kw["offload"] = True
        if self.placement is not None:
            kw["placement"] = self.placement
            if ranks_per_node is not None:
                kw["ranks_per_node"] = ranks_per_node
        return kw

    @property
    def label(self) -> str:
        parts = [self.strategy]
        if self.strategy == "usp":
            parts.append(f"u{self.ulysses}xr{self.ring}")
        if self.strategy == "wallfacer":
            parts.append(f"C={self.teams} {self.placement}")
        if self.chunks > 1 or self.offload:
            parts.append(f"chunks={self.chunks}" + (" offload" if self.offload else ""))
        parts.append(self.layout)
        return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# schedule stages
# ---------------------------------------------------------------------------------------------
_ALPHA_STEPS: dict[str, Callable[[int], int]] = {
    "all_to_all": lambda n: n - 1, "all_gather": lambda n: n - 1, "reduce_scatter": lambda n: n - 1,
    "all_reduce": lambda n: 2 * (n - 1),
}


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


# ---------------------------------------------------------------------------------------------
# block work (from the layout's causal block rules)
# ---------------------------------------------------------------------------------------------
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
def _loop_steps(inp: PlanInput, heads: int, pairs: tuple[int, ...], block_elems: int,
                grad_sends: bool) -> tuple[Steps, Steps]:
    """ring_forward / ring_backward steps: the K/V block (input dtype) is sent at every step but
    the last; with grad_sends the dK/dV accumulator (accum dtype) is sent at every step."""
    kv = Send(block_elems, inp.itemsize, "kv")
    dkv = (Send(block_elems, inp.acc_itemsize, "dkv"),) if grad_sends else ()
    last = len(pairs) - 1
    fwd = tuple(Step(_flops(inp, heads, p), (kv,) if s < last else ()) for s, p in enumerate(pairs))
    bwd = tuple(Step(ATTN_BWD_FACTOR * _flops(inp, heads, p), ((kv,) if s < last else ()) + dkv)
                for s, p in enumerate(pairs))
    return Steps(fwd), Steps(bwd)


def _flops(inp: PlanInput, heads: int, pairs: int) -> float:
    return float(inp.batch) * heads * pairs * ATTN_FLOPS_PER_PAIR * inp.model.head_dim


# ---------------------------------------------------------------------------------------------
# per-strategy schedules (one attention layer, forward + backward, one rank)
# ---------------------------------------------------------------------------------------------
def _kv_replication(heads: int, kv_heads: int, degree: int) -> int:
    from .attention.ulysses import kv_replication
    return kv_replication(heads, kv_heads, degree)


def _ring_loops(inp: PlanInput, group: tuple[int, ...], kind: str, seq_local: int, heads: int,
                kv_heads: int) -> list[RingLoop]:
    """attention/ring.py on `group`: forward P-1 K/V sends; backward P-1 K/V sends plus P sends
    of the travelling dK/dV accumulator (accum dtype). seq_local = tokens per ring rank."""
    pairs = ring_step_pairs(kind, inp.causal, len(group), seq_local)
    block = 2 * inp.batch * seq_local * kv_heads * inp.model.head_dim
    fwd, bwd = _loop_steps(inp, heads, pairs, block, True)
    return [RingLoop(group, "fwd", fwd), RingLoop(group, "bwd", bwd)]


def _local_compute(inp: PlanInput, heads: int, seq: int) -> list[Compute]:
    pairs = seq * (seq + 1) // 2 if inp.causal else seq * seq
    return [Compute(_flops(inp, heads, pairs), "fwd"), Compute(ATTN_BWD_FACTOR * _flops(inp, heads, pairs), "bwd")]


def _ulysses_around(inp: PlanInput, group: tuple[int, ...], inner_fwd: list, inner_bwd: list) -> list[Stage]:
    """attention/ulysses.py: one fused all-to-all of q,k,v (K/V heads replicated to the degree)
    and the inverse all-to-all of the output; backward mirrors both in the input dtype."""
    m, degree = inp.model, len(group)
    rep = _kv_replication(m.heads, m.kv_heads, degree)
    tokens = inp.batch * inp.tokens_per_rank
    qkv = Collective("all_to_all", tokens * (m.heads + 2 * m.kv_heads * rep) * m.head_dim, inp.itemsize,
                     group, "fwd", "qkv")
    out = Collective("all_to_all", tokens * m.heads * m.head_dim, inp.itemsize, group, "fwd", "out")
    dout, dqkv = (replace(c, phase="bwd", what="d" + c.what) for c in (out, qkv))
    return [qkv, *inner_fwd, out, dout, *inner_bwd, dqkv]


def _split_phase(stages: list[Stage]) -> tuple[list[Stage], list[Stage]]:
    return [s for s in stages if s.phase == "fwd"], [s for s in stages if s.phase == "bwd"]


def ring_schedule(inp: PlanInput, cfg: Config, rank: int) -> list[Stage]:
    group = inp.cluster.ranks
    return _ring_loops(inp, group, cfg.layout, inp.tokens_per_rank, inp.model.heads, inp.model.kv_heads)


def ulysses_schedule(inp: PlanInput, cfg: Config, rank: int) -> list[Stage]:
    group = inp.cluster.ranks
    fwd, bwd = _split_phase(_local_compute(inp, inp.model.heads // inp.world, inp.seq_len))
    return _ulysses_around(inp, group, fwd, bwd)


def usp_groups(world: int, ulysses: int, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """mesh.grid(rows=ring, cols=ulysses): Ulysses groups contiguous, ring groups strided."""
    row, col = divmod(rank, ulysses)
    return (tuple(row * ulysses + c for c in range(ulysses)), tuple(range(col, world, ulysses)))


def usp_schedule(inp: PlanInput, cfg: Config, rank: int) -> list[Stage]:
    m, ud, rd = inp.model, cfg.ulysses, cfg.ring
    ulysses_group, ring_group = usp_groups(inp.world, ud, rank)
    kv_heads = m.kv_heads * _kv_replication(m.heads, m.kv_heads, ud) // ud
    seq_local = inp.seq_len // rd
    if rd == 1:
        inner = _local_compute(inp, m.heads // ud, inp.seq_len)
    else:
        inner = _ring_loops(inp, ring_group, cfg.layout, seq_local, m.heads // ud, kv_heads)
    fwd, bwd = _split_phase(inner)
    if ud == 1:
        return fwd + bwd
    return _ulysses_around(inp, ulysses_group, fwd, bwd)


def allgather_schedule(inp: PlanInput, cfg: Config, rank: int) -> list[Stage]:
    """attention/allgather.py: one all-gather of stacked K,V; local blocks; one reduce-scatter
    of the dK/dV of all blocks (accum dtype)."""
    m, group = inp.model, inp.cluster.ranks
    kv = 2 * inp.batch * inp.tokens_per_rank * m.kv_dim
    pairs = all_pairs_busiest(cfg.layout, inp.causal, inp.world, inp.tokens_per_rank)
    flops = _flops(inp, m.heads, pairs)
    return [Collective("all_gather", kv, inp.itemsize, group, "fwd", "kv"), Compute(flops, "fwd"),
            Compute(ATTN_BWD_FACTOR * flops, "bwd"),
            Collective("reduce_scatter", kv, inp.acc_itemsize, group, "bwd", "dkv")]


def _wallfacer_grid(inp: PlanInput, cfg: Config):
    return _grid(inp.world, cfg.teams, cfg.placement or "collectives_intra")


@lru_cache(maxsize=64)
def _grid(world: int, teams: int, placement: str):
    from .attention.wallfacer import WallFacerGrid
    return WallFacerGrid(world, teams, placement)


@lru_cache(maxsize=64)
def _grid_ranks(grid) -> list[tuple[int, int, tuple[int, ...], tuple[int, ...]]]:
    """(team, member, team group, sub-ring) of every physical rank, computed once per grid."""
    teams = [tuple(grid.team_members(t)) for t in range(grid.teams)]
    rings = {(t - t % grid.ring_len, a): tuple(grid.subring_members(t, a))
             for t in range(0, grid.teams, grid.ring_len) for a in range(grid.team_size)}
    out = []
    for logical in grid.logical():
        t, a = divmod(logical, grid.team_size)
        out.append((t, a, teams[t], rings[(t - t % grid.ring_len, a)]))
    return out


@lru_cache(maxsize=None)
def wallfacer_step_pairs(kind: str, causal: bool, world: int, teams: int, team_tokens: int) -> tuple[int, ...]:
    """Pairs of the busiest rank at each sub-ring step (team-level block rules, C*n-token blocks)."""
    from .attention.wallfacer import WallFacerGrid
    grid = WallFacerGrid(world, teams)
    cls = block_class_pairs(kind, causal, team_tokens)
    return tuple(max(cls[k] for k in {_order(t, grid.kv_team(t, a, s)) for t in range(grid.teams)
                                      for a in range(teams)}) for s in range(grid.ring_len))


def _exchange(inp: PlanInput, me: int, dst: int, src: int, elems: int, itemsize: int, phase: str,
              what: str) -> list[RingLoop]:
    """One exposed P2P exchange (send to dst, receive from src); nothing when it is this rank."""
    if dst == me:
        return []
    return [RingLoop((me, dst, src), phase, _single_send(elems, itemsize, what))]


@lru_cache(maxsize=256)
def _single_send(elems: int, itemsize: int, what: str) -> Steps:
    return Steps((Step(0.0, (Send(elems, itemsize, what),)),))


def wallfacer_schedule(inp: PlanInput, cfg: Config, rank: int) -> list[Stage]:
    """attention/wallfacer.py. Forward: team all-gather of q,k,v; skewed placement of the team
    K/V (P2P); ring forward on the sub-ring with C*n-token blocks; combine = all-gather of the
    partial LSEs + reduce-scatter of the weighted outputs. Backward: team all-gather of dO and
    O; ring backward on the sub-ring; reduce-scatter of dQ; reverse placement of dK/dV (P2P);
    reduce-scatter of dK/dV."""
    m, b, n, c = inp.model, inp.batch, inp.tokens_per_rank, cfg.teams
    grid = _wallfacer_grid(inp, cfg)
    t, a, team, ring = _grid_ranks(grid)[rank]
    dst = grid.physical(*grid.placement_target(t, a))
    src = grid.physical(*grid.placement_source(t, a))
    kv_team = 2 * b * c * n * m.kv_dim
    e, acc = inp.itemsize, inp.acc_itemsize
    loops = _wallfacer_loops(inp, cfg, ring)
    stages: list[Stage] = [Collective("all_gather", b * n * (m.hidden + 2 * m.kv_dim), e, team, "fwd", "qkv")]
    stages += _exchange(inp, rank, dst, src, kv_team, e, "fwd", "kv_placement")
    stages += [loops[0], Collective("all_gather", b * m.heads * c * n, acc, team, "fwd", "lse"),
               Collective("reduce_scatter", b * n * m.hidden, e, team, "fwd", "out"),
               Collective("all_gather", 2 * b * n * m.hidden, e, team, "bwd", "dout_out"), loops[1],
               Collective("reduce_scatter", b * n * m.hidden, acc, team, "bwd", "dq")]
    stages += _exchange(inp, rank, src, dst, kv_team, acc, "bwd", "dkv_return")
    stages.append(Collective("reduce_scatter", 2 * b * n * m.kv_dim, acc, team, "bwd", "dkv"))
    return stages


def _wallfacer_loops(inp: PlanInput, cfg: Config, ring: tuple[int, ...]) -> list[RingLoop]:
    """ring_forward / ring_backward on the sub-ring (no sends when it has one rank)."""
    m, team_tokens = inp.model, cfg.teams * inp.tokens_per_rank
    pairs = wallfacer_step_pairs(cfg.layout, inp.causal, inp.world, cfg.teams, team_tokens)
    block = 2 * inp.batch * team_tokens * m.kv_dim
    fwd, bwd = _loop_steps(inp, m.heads, pairs, block, len(ring) > 1)
    return [RingLoop(ring, "fwd", fwd), RingLoop(ring, "bwd", bwd)]


def _fpdt_chunk_sizes(inp: PlanInput, cfg: Config) -> dict[str, int]:
    """Bytes of one chunk of each stored tensor (C = N/u tokens, h/P heads): q, kv, o, lse, dout, dq."""
    m, b, p = inp.model, inp.batch, inp.world
    piece = inp.tokens_per_rank // cfg.chunks  # this rank's tokens per chunk: C / P
    kv_heads = m.kv_heads * _kv_replication(m.heads, m.kv_heads, p)
    q = b * piece * m.hidden * inp.itemsize
    return {"q": q, "kv": 2 * b * piece * kv_heads * m.head_dim * inp.itemsize, "o": q, "do": q,
            "lse": b * piece * m.heads * inp.acc_itemsize, "dq": b * piece * m.hidden * inp.acc_itemsize}


def fpdt_host_bytes(inp: PlanInput, cfg: Config) -> dict[str, int]:
    """Host<->device copies of one FPDT call with offload (0 without), per phase: every chunk
    put in the ChunkStore goes to the host, every get comes back (attention/fpdt.py)."""
    if not cfg.offload:
        return {"fwd": 0, "bwd": 0}
    u, s = cfg.chunks, _fpdt_chunk_sizes(inp, cfg)
    pairs = u * (u + 1) // 2 if inp.causal else u * u  # (q chunk, kv chunk) blocks
    fwd = u * (s["q"] + s["kv"] + s["o"] + s["lse"]) + u * s["q"] + pairs * s["kv"]
    bwd = u * s["do"] + pairs * s["dq"] + u * s["kv"] + pairs * (s["q"] + s["o"] + s["lse"] + s["do"] + s["dq"])
    return {"fwd": fwd, "bwd": bwd}


def fpdt_schedule(inp: PlanInput, cfg: Config, rank: int) -> list[Stage]:
    """attention/fpdt.py: per chunk, one fused q,k,v all-to-all and one all-to-all of the output;
    backward: per chunk all-to-alls of dO, of dK/dV (input dtype) and of dQ. Same volume as
    Ulysses in u times as many calls; chunk copies to/from the host hidden under compute."""
    m, u, group = inp.model, cfg.chunks, inp.cluster.ranks
    rep = _kv_replication(m.heads, m.kv_heads, inp.world)
    piece_tokens = inp.batch * inp.tokens_per_rank // u
    a2a = lambda heads, phase, what: [Collective("all_to_all", piece_tokens * heads * m.head_dim,  # noqa: E731
                                                 inp.itemsize, group, phase, what)] * u
    fwd, bwd = _split_phase(_local_compute(inp, m.heads // inp.world, inp.seq_len))
    host = fpdt_host_bytes(inp, cfg)
    return (a2a(m.heads + 2 * m.kv_heads * rep, "fwd", "qkv") + [replace(fwd[0], host_bytes=host["fwd"])]
            + a2a(m.heads, "fwd", "out") + a2a(m.heads, "bwd", "dout")
            + [replace(bwd[0], host_bytes=host["bwd"])]
            + a2a(2 * m.kv_heads * rep, "bwd", "dkv") + a2a(m.heads, "bwd", "dq"))


# ---------------------------------------------------------------------------------------------
# validity checks (the same errors seqpar.init / attention raise)
# ---------------------------------------------------------------------------------------------
def _check_layout(inp: PlanInput, layout: TokenLayout) -> None:
    layout.check(inp.seq_len)


def _check_ring(inp, cfg):
    _check_layout(inp, TokenLayout(cfg.layout, outer=inp.world))


def _check_ulysses(inp, cfg):
    _kv_replication(inp.model.heads, inp.model.kv_heads, inp.world)
    _check_layout(inp, TokenLayout(cfg.layout, outer=1, inner=inp.world))


def _check_usp(inp, cfg):
    if cfg.ulysses * cfg.ring != inp.world:
        raise ValueError(f"usp needs ulysses x ring = world: {cfg.ulysses} x {cfg.ring} != {inp.world}")
    _kv_replication(inp.model.heads, inp.model.kv_heads, cfg.ulysses)
    _check_layout(inp, TokenLayout(cfg.layout, outer=cfg.ring, inner=cfg.ulysses))


def _check_lss(inp, cfg):
    if cfg.layout not in ("contiguous", "zigzag"):
        raise ValueError(f"lss splits the sequence into segments: layout must be contiguous or zigzag, "
                         f"got {cfg.layout!r}")
    _check_ring(inp, cfg)


def _check_wallfacer(inp, cfg):
    grid = _wallfacer_grid(inp, cfg)
    _check_layout(inp, TokenLayout(cfg.layout, outer=grid.teams, inner=grid.team_size))


def _check_fpdt(inp, cfg):
    if cfg.layout != "contiguous":
        raise ValueError(f"fpdt needs layout='contiguous', got {cfg.layout!r}")
    _kv_replication(inp.model.heads, inp.model.kv_heads, inp.world)
    _check_layout(inp, TokenLayout("contiguous", outer=1, inner=inp.world, chunks=cfg.chunks))


# ---------------------------------------------------------------------------------------------
# attention memory: (saved per layer, peak working set) in bytes, beyond q/k/v/out
# ---------------------------------------------------------------------------------------------
def _lse_bytes(inp: PlanInput, heads: int, seq: int) -> float:
    return inp.batch * heads * seq * inp.acc_itemsize


def _ring_buffers(inp: PlanInput, seq_local: int, heads: int, kv_heads: int) -> float:
    """Backward peak of ring_backward: two K/V blocks (current + incoming), three dK/dV
    accumulators (own, in flight, incoming) and the dq accumulator."""
    d, b = inp.model.head_dim, inp.batch
    kv = 2 * b * seq_local * kv_heads * d
    return 2 * kv * inp.itemsize + 3 * kv * inp.acc_itemsize + b * seq_local * heads * d * inp.acc_itemsize


def _ring_memory(inp, cfg):
    m, n = inp.model, inp.tokens_per_rank
    return _lse_bytes(inp, m.heads, n), _ring_buffers(inp, n, m.heads, m.kv_heads)


def _ulysses_memory_parts(inp: PlanInput, ud: int) -> tuple[float, float]:
    """Head-scattered q,k,v and output saved for backward (Ulysses degree ud); peak of the
    fused all-to-all: send + receive copies of packed q,k,v."""
    m = inp.model
    rep = _kv_replication(m.heads, m.kv_heads, ud)
    tokens = inp.batch * inp.tokens_per_rank
    packed = tokens * (m.heads + 2 * m.kv_heads * rep) * m.head_dim * inp.itemsize
    saved = packed + tokens * m.heads * m.head_dim * inp.itemsize
    return saved, 2 * packed


def _ulysses_memory(inp, cfg):
    saved, peak = _ulysses_memory_parts(inp, inp.world)
    return saved + _lse_bytes(inp, inp.model.heads // inp.world, inp.seq_len), peak


def _usp_memory(inp, cfg):
    m, ud, rd = inp.model, cfg.ulysses, cfg.ring
    saved, peak = _ulysses_memory_parts(inp, ud) if ud > 1 else (0.0, 0.0)
    kv_heads = m.kv_heads * _kv_replication(m.heads, m.kv_heads, ud) // ud
    ring_peak = _ring_buffers(inp, inp.seq_len // rd, m.heads // ud, kv_heads) if rd > 1 else 0.0
    return saved + _lse_bytes(inp, m.heads // ud, inp.seq_len // rd), max(peak, ring_peak)


def _allgather_memory(inp, cfg):
    """kv_all (the whole sequence's K,V) is saved for backward; backward holds dK/dV of all blocks."""
    m, b = inp.model, inp.batch
    kv_all = 2 * b * inp.seq_len * m.kv_dim
    dq = b * inp.tokens_per_rank * m.hidden * inp.acc_itemsize
    return kv_all * inp.itemsize + _lse_bytes(inp, m.heads, inp.tokens_per_rank), kv_all * inp.acc_itemsize + dq


def _wallfacer_memory(inp, cfg):
    """Saved: the team's q (C*n rows), the placed team K/V and the team LSE; backward peak:
    gathered dO and O of the team plus ring_backward's buffers on C*n-token blocks."""
    m, b, e = inp.model, inp.batch, inp.itemsize
    team_tokens = cfg.teams * inp.tokens_per_rank
    saved = b * team_tokens * (m.hidden + 2 * m.kv_dim) * e + _lse_bytes(inp, m.heads, team_tokens)
    peak = 2 * b * team_tokens * m.hidden * e + _ring_buffers(inp, team_tokens, m.heads, m.kv_heads)
    return saved, peak


def _fpdt_memory(inp, cfg):
    """Without offload the ChunkStore keeps every chunk of q, k/v, o, lse on the device (saved)
    and adds dO and dQ in backward; with offload they live on the host and the device holds
    the chunks in use plus the prefetched ones (two of each) and one dK/dV accumulator."""
    u, s = cfg.chunks, _fpdt_chunk_sizes(inp, cfg)
    dkv = s["kv"] * inp.acc_itemsize // inp.itemsize
    if cfg.offload:
        return 0.0, 2 * (s["q"] + s["kv"] + s["o"] + s["lse"] + s["do"] + s["dq"]) + dkv
    return u * (s["q"] + s["kv"] + s["o"] + s["lse"]), u * (s["do"] + s["dq"]) + dkv


@dataclass(frozen=True)
class StrategyModel:
    schedule: Callable[[PlanInput, Config, int], list[Stage]]
    check: Callable[[PlanInput, Config], None]
    #: attention memory beyond the layer's own q/k/v/out: (saved per layer, peak working set), bytes
    memory: Callable[[PlanInput, Config], tuple[float, float]]


STRATEGY_MODELS: dict[str, StrategyModel] = {
    "ring": StrategyModel(ring_schedule, _check_ring, _ring_memory),
    "ulysses": StrategyModel(ulysses_schedule, _check_ulysses, _ulysses_memory),
    "usp": StrategyModel(usp_schedule, _check_usp, _usp_memory),
    "allgather": StrategyModel(allgather_schedule, _check_ring, _allgather_memory),
    "wallfacer": StrategyModel(wallfacer_schedule, _check_wallfacer, _wallfacer_memory),
    "fpdt": StrategyModel(fpdt_schedule, _check_fpdt, _fpdt_memory),
    # attention/lss.py is AllGatherStrategy restricted to segment layouts
    "lss": StrategyModel(allgather_schedule, _check_lss, _allgather_memory),
}


def attention_schedule(inp: PlanInput, cfg: Config, rank: int = 0) -> list[Stage]:
    """The stages of one attention layer (fwd + bwd) on `rank`; raises ValueError if invalid."""
    model = _strategy_model(cfg.strategy)
    model.check(inp, cfg)
    return model.schedule(inp, cfg, rank)


def attention_bytes(inp: PlanInput, cfg: Config, rank: int = 0, phase: str | None = None) -> dict[str, int]:
    """Bytes `rank` sends per collective kind in one attention layer (CommStats' accounting)."""
    return bytes_by_kind(attention_schedule(inp, cfg, rank), phase)


def _strategy_model(name: str) -> StrategyModel:
    if name not in STRATEGY_MODELS:
        raise ValueError(f"no cost model for strategy {name!r}; modelled: {sorted(STRATEGY_MODELS)}")
    return STRATEGY_MODELS[name]


# ---------------------------------------------------------------------------------------------
# the paper's per-block volume (WallFacer, arXiv 2407.00611, "costs per block per rank")
# ---------------------------------------------------------------------------------------------
def paper_block_volume(inp: PlanInput, cfg: Config, rank: int = 0) -> dict[str, float]:
    """Forward communication of one transformer block on one rank, as the WallFacer paper
    counts it: elements x activation dtype size (accumulator dtypes and the tiny LSE
    exchanges are not counted); a (sub-)ring contributes one K/V block per loop step,
    i.e. all the K/V the rank streams through its loop (ring: P blocks although the own
    block is never sent; WallFacer: P/C^2 team blocks, the first one delivered by the
    initial placement). Returns {"collective": bytes, "p2p": bytes}."""
    vol = {"collective": 0.0, "p2p": 0.0}
    for stage in attention_schedule(inp, cfg, rank):
        if stage.phase != "fwd":
            continue
        if isinstance(stage, Collective) and stage.what != "lse":
            vol["collective"] += stage.elems * inp.itemsize * _collective_factor(stage)
        elif isinstance(stage, RingLoop) and len(stage.steps.items) > 1:
            vol["p2p"] += len(stage.steps.items) * stage.steps.block_elems * inp.itemsize
    return vol


def _collective_factor(c: Collective) -> float:
    n = len(c.group)
    return {"all_to_all": (n - 1) / n, "all_reduce": 2 * (n - 1) / n}.get(c.kind, n - 1)


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    config: Config
    valid: bool = True
    reason: str = ""
    step_time: float = math.inf            # seconds per training step (one micro-batch)
    attention_time: float = 0.0            # seconds per layer, fwd + bwd, incl. its communication
    exposed_comm_time: float = 0.0         # seconds per layer of attention time not hidden by compute
    comm_bytes: dict[str, int] = field(default_factory=dict)  # per kind, max over ranks, per layer fwd + bwd
    host_bytes: int = 0                    # host<->device copies per layer (offload), max over ranks
    memory: dict[str, float] = field(default_factory=dict)    # bytes per rank
    fits: bool = False
    speedup_vs_ring: float | None = None
    measured: dict | None = None           # filled by `seqpar plan --profile`

    @property
    def label(self) -> str:
        return self.config.label

    @property
    def total_comm_bytes(self) -> int:
        return sum(self.comm_bytes.values())

    def to_dict(self) -> dict:
        c = self.config
        return {"label": self.label, "strategy": c.strategy, "init_kwargs": c.init_kwargs(), "valid": self.valid,
                "reason": self.reason, "step_time_s": self.step_time if self.valid else None,
                "attention_time_per_layer_s": self.attention_time, "exposed_comm_per_layer_s": self.exposed_comm_time,
                "comm_bytes_per_layer": self.comm_bytes, "host_bytes_per_layer": self.host_bytes,
                "memory_bytes": self.memory, "fits": self.fits,
                "speedup_vs_ring": self.speedup_vs_ring, "measured": self.measured}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _placements(world: int, teams: int) -> tuple[str, ...]:
    """WallFacer placements worth comparing: with C^2 = P the sub-rings have one rank and both
    placements are the same rank mapping."""
    return ("collectives_intra",) if teams * teams == world else ("collectives_intra", "rings_intra")


def candidate_configs(inp: PlanInput, strategies: list[str] | None = None) -> list[Config]:
    """Every strategy x degree x layout worth considering (invalid ones included, to be reported)."""
    names = [s for s in STRATEGY_ORDER if s in STRATEGY_MODELS] if strategies is None else strategies
    unknown = [s for s in names if s not in STRATEGY_MODELS]
    if unknown:
        raise ValueError(f"no cost model for strategy {unknown}; modelled: {sorted(STRATEGY_MODELS)}")
    layouts = ("contiguous", "zigzag") if inp.causal else ("contiguous",)
    p, out = inp.world, []
    for name in names:
        if name == "ulysses":
            out.append(Config("ulysses"))
        elif name == "usp":
            out += [Config("usp", lay, ulysses=u, ring=p // u) for u in _divisors(p)[1:-1] for lay in layouts]
        elif name == "wallfacer":
            out += [Config("wallfacer", lay, teams=c, placement=pl) for c in _divisors(p)[1:] if p % (c * c) == 0
                    for pl in _placements(p, c) for lay in layouts]
        elif name == "fpdt":
            out += [Config("fpdt", "contiguous", chunks=u, offload=off) for u in (1, 2, 4, 8) for off in (False, True)]
        else:
            out += [Config(name, lay) for lay in layouts]
    return out


def _dense_flops(inp: PlanInput) -> tuple[float, float]:
    """(per layer, LM head) forward flops of the projections, MLP and logits on one rank."""
    m, t = inp.model, inp.batch * inp.tokens_per_rank
    layer = 2.0 * t * (m.layer_params() - 2 * m.hidden)
    head = 2.0 * t * m.hidden * m.vocab
    return layer, head


def model_state_bytes(inp: PlanInput) -> float:
    """Weights and grads in the dtype, Adam m/v (fp32 at least) and an fp32 master copy for
    16-bit dtypes; ZeRO stage s shards the first s of (optimizer, grads, weights) over the world."""
    e, p, world = inp.itemsize, inp.model.params(), inp.world
    optimizer = 2 * max(4, e) + (4 if e < 4 else 0)
    parts = [(optimizer, 1), (e, 2), (e, 3)]  # (bytes per parameter, first ZeRO stage sharding it)
    return sum(p * b / (world if inp.zero >= stage else 1) for b, stage in parts)


def memory_estimate(inp: PlanInput, cfg: Config) -> dict[str, float]:
    """Bytes per rank: model states, saved activations of all layers, the logits, and the
    attention working set (docs/planner.md)."""
    m, e, t = inp.model, inp.itemsize, inp.batch * inp.tokens_per_rank
    states = model_state_bytes(inp)
    per_layer = t * (6 * m.hidden + 2 * m.kv_dim + 3 * m.ffn_hidden) * e
    saved, peak = STRATEGY_MODELS[cfg.strategy].memory(inp, cfg)
    logits = t * m.vocab * (e + 4)
    total = states + m.layers * (per_layer + saved) + logits + peak
    return {"model_states": states, "activations": m.layers * per_layer, "attention_saved": m.layers * saved,
            "attention_peak": peak, "logits": logits, "total": total}


def evaluate(inp: PlanInput, cfg: Config) -> Candidate:
    """Predict step time, bytes and memory of one configuration (invalid -> valid=False + reason)."""
    model = _strategy_model(cfg.strategy)
    try:
        model.check(inp, cfg)
        schedules = [model.schedule(inp, cfg, r) for r in range(inp.world)]
        memory = memory_estimate(inp, cfg)
    except ValueError as e:
        return Candidate(cfg, valid=False, reason=str(e))
    cl = inp.cluster
    attn = max(sum(_stage_seconds(s, cl) for s in stages) for stages in schedules)
    compute = max(sum(_compute_seconds(s, cl) for s in stages) for stages in schedules)
    layer_fwd, head_fwd = _dense_flops(inp)
    dense = (1 + DENSE_BWD_FACTOR) * (inp.model.layers * layer_fwd + head_fwd) / cl.flops_per_s
    grads = Collective("all_reduce", inp.model.params(), inp.itemsize, inp.cluster.ranks, "bwd", "grads")
    grad_sync = max(0.0, grads.seconds(cl) - DENSE_BWD_FACTOR / (1 + DENSE_BWD_FACTOR) * dense)
    step = inp.model.layers * attn + dense + grad_sync
    host = max(sum(s.host_bytes for s in stages if isinstance(s, Compute)) for stages in schedules)
    return Candidate(cfg, step_time=step, attention_time=attn, exposed_comm_time=attn - compute,
                     comm_bytes=max_bytes_by_kind(schedules), host_bytes=host, memory=memory,
                     fits=memory["total"] <= cl.memory_gib * GiB)


@lru_cache(maxsize=65536)
def _stage_seconds(stage: Stage, cluster: Cluster) -> float:
    """Memoised: ranks running the same stage on equal groups share the result."""
    return stage.seconds(cluster)


def _compute_seconds(stage: Stage, cluster: Cluster) -> float:
    if isinstance(stage, RingLoop):
        return stage.compute_seconds(cluster)
    return stage.flops / cluster.flops_per_s if isinstance(stage, Compute) else 0.0


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


def _rank_key(c: Candidate):
    return (not c.valid, not c.fits, c.step_time)


def plan(inp: PlanInput, strategies: list[str] | None = None) -> list[Candidate]:
    """All candidates ranked: valid and fitting by predicted step time, then valid but too
    large for device memory, then invalid ones (each with its reason)."""
    candidates = [evaluate(inp, cfg) for cfg in candidate_configs(inp, strategies)]
    rings = [c.step_time for c in candidates if c.valid and c.config.strategy == "ring"]
    if rings:
        for c in candidates:
            if c.valid:
                c.speedup_vs_ring = min(rings) / c.step_time
    return sorted(candidates, key=_rank_key)
