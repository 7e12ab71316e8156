"""Per-strategy schedules: the stages of one attention layer, forward + backward, on one rank.

Each `*_schedule(inp, cfg, rank)` is derived from the strategy's source in
seqpar/attention/, so that the bytes of its stages are exactly what `CommStats` counts for
the same call (tests compare both on real process worlds). They assume a valid candidate
(seqpar.plan.validity). Also here: the group geometry the checks and memory models share
(K/V head replication, USP groups, WallFacer grids, FPDT chunk sizes).
"""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from ..attention.ulysses import kv_replication
from ..attention.wallfacer import WallFacerGrid
from ..documents import DEFAULT_TILE, visible_pairs
from ..layout import TokenLayout
from .candidate import Config
from .inputs import PlanInput
from .stages import Collective, Compute, RingLoop, Send, Stage, Step, Steps, balanced_loads, loop_steps
from .tables import all_pairs_load, chunked_load, local_load, ring_step_loads, wallfacer_step_loads

__all__ = ["local_schedule", "ring_schedule", "ulysses_schedule", "usp_schedule", "allgather_schedule",
           "wallfacer_schedule", "fpdt_schedule", "usp_groups", "fpdt_host_bytes", "fpdt_chunk_sizes",
           "wallfacer_grid", "windowed_ring_steps", "windowed_ring_bytes"]


# -- shared geometry ---------------------------------------------------------------------------
def usp_groups(world: int, ulysses: int, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """mesh.grid(rows=ring, cols=ulysses): Ulysses groups contiguous, ring groups strided."""
    row, col = divmod(rank, ulysses)
    return (tuple(row * ulysses + c for c in range(ulysses)), tuple(range(col, world, ulysses)))


def wallfacer_grid(inp: PlanInput, cfg: Config):
    return _grid(inp.world, cfg.team_size, cfg.placement)


@lru_cache(maxsize=64)
def _grid(world: int, team_size: int, placement: str) -> WallFacerGrid:
    return WallFacerGrid(world, team_size, placement)


@lru_cache(maxsize=64)
def _grid_ranks(grid) -> list[tuple[int, int, tuple[int, ...], tuple[int, ...]]]:
    """(team, member, team group, sub-ring) of every physical rank, computed once per grid."""
    teams = [tuple(grid.team_members(t)) for t in range(grid.team_count)]
    rings = {(t - t % grid.ring_len, a): tuple(grid.subring_members(t, a))
             for t in range(0, grid.team_count, grid.ring_len) for a in range(grid.team_size)}
    out = []
    for logical in grid.logical():
        t, a = divmod(logical, grid.team_size)
        out.append((t, a, teams[t], rings[(t - t % grid.ring_len, a)]))
    return out


def fpdt_chunk_sizes(inp: PlanInput, cfg: Config) -> dict[str, int]:
    """Bytes of one chunk of each stored tensor (C = N/u tokens, h/P heads): q, kv, o, lse, dout, dq."""
    m, b, p = inp.model, inp.batch, inp.world
    piece = inp.tokens_per_rank // cfg.chunks  # this rank's tokens per chunk: C / P
    kv_heads = m.kv_heads * kv_replication(m.heads, m.kv_heads, p)
    q = b * piece * m.hidden * inp.itemsize
    return {"q": q, "kv": 2 * b * piece * kv_heads * m.head_dim * inp.itemsize, "o": q, "do": q,
            "lse": b * piece * m.heads * inp.acc_itemsize, "dq": b * piece * m.hidden * inp.acc_itemsize}


# -- sliding windows on a ring -------------------------------------------------------------------
@lru_cache(maxsize=64)
def windowed_ring_steps(kind: str, ring: int, seq_len: int, window: tuple[int, int], causal: bool) -> tuple[int, ...]:
    """Ring distances s > 0 at which some ring rank r has a query that sees a key of rank r - s
    under `window` (left, right; -1 unbounded) with the `kind` layout over `ring` ranks."""
    layout = TokenLayout(kind, outer=ring)
    pos = [layout.outer_indices(seq_len, r) for r in range(ring)]
    cu = (0, seq_len)
    return tuple(s for s in range(1, ring)
                 if any(visible_pairs(cu, causal, pos[r], pos[(r - s) % ring], window) for r in range(ring)))


def windowed_ring_bytes(kind: str, ring: int, seq_len: int, window: tuple[int, int], causal: bool,
                        kv_block: int, dkv_block: int) -> dict[str, int]:
    """Bytes one ring rank sends per attention call (attention/ring.py): the plain ring when every
    distance is needed (P-1 K/V blocks forward; P-1 K/V and P travelling dK/dV blocks backward),
    else one exchange per needed distance S: |S| K/V blocks forward, |S| K/V and |S| dK/dV
    blocks backward. kv_block: bytes of one rank's stacked K and V; dkv_block: the same in the
    accumulation dtype."""
    steps = len(windowed_ring_steps(kind, ring, seq_len, window, causal))
    if steps == ring - 1:
        return {"fwd": steps * kv_block, "bwd": steps * kv_block + ring * dkv_block, "steps": steps}
    return {"fwd": steps * kv_block, "bwd": steps * (kv_block + dkv_block), "steps": steps}


# -- building blocks ---------------------------------------------------------------------------
def _ring_loops(inp: PlanInput, group: tuple[int, ...], kind: str, seq_local: int, heads: int,
                kv_heads: int) -> list[RingLoop]:
    """attention/ring.py on `group`: forward P-1 K/V sends; backward P-1 K/V sends plus P sends
    of the travelling dK/dV accumulator (accum dtype). seq_local = tokens per ring rank. Under
    a window that leaves ring distances out: the windowed ring (`_direct_steps`)."""
    block = 2 * inp.batch * seq_local * kv_heads * inp.model.head_dim
    needed = _window_steps(inp, kind, len(group), seq_local * len(group))
    if needed is not None:
        fwd, bwd = _direct_steps(inp, heads, seq_local, block, needed)
    else:
        loads = ring_step_loads(kind, inp.causal, len(group), seq_local, inp.attention_rows(heads),
                                inp.model.head_dim)
        fwd, bwd = loop_steps(inp, loads, block, True)
    return [RingLoop(group, "fwd", fwd), RingLoop(group, "bwd", bwd)]


def _window_steps(inp: PlanInput, kind: str, ring: int, seq_len: int) -> int | None:
    """How many ring distances carry visible K/V under the input's window, when not all of them
    (attention/ring.py then sends straight to those ranks); None: the plain ring."""
    if inp.window is None or ring == 1:
        return None
    needed = len(windowed_ring_steps(kind, ring, seq_len, inp.window_pair, inp.causal))
    return None if needed == ring - 1 else needed


def _direct_steps(inp: PlanInput, heads: int, seq_local: int, block_elems: int, needed: int) -> tuple[Steps, Steps]:
    """The windowed ring (bytes: `windowed_ring_bytes`): the own block and one block per needed
    distance, one K/V send per distance forward and one K/V plus one dK/dV send backward, in
    flight under the blocks before. Every rank computes about (W + 2T) x seq_local pairs per
    head (`PlanInput.window_fraction`), spread evenly over those blocks: a window balances any
    layout."""
    per_block = -(-min(inp.window + 2 * DEFAULT_TILE, seq_local * (needed + 1)) // (needed + 1))
    rows = inp.batch * heads * inp.attention_fraction * inp.sink_factor
    fwd_load, bwd_load = balanced_loads(((seq_local, per_block, False),), rows, inp.model.head_dim)
    kv, dkv = Send(block_elems, inp.itemsize, "kv"), Send(block_elems, inp.acc_itemsize, "dkv")
    fwd = tuple(Step(fwd_load, (kv,) if s < needed else ()) for s in range(needed + 1))
    bwd = tuple(Step(bwd_load, (kv, dkv) if s < needed else ()) for s in range(needed + 1))
    return Steps(fwd), Steps(bwd)


def _local_compute(inp: PlanInput, heads: int, seq: int) -> list[Compute]:
    fwd, bwd = local_load(seq, inp.causal, inp.attention_rows(heads), inp.model.head_dim)
    return [Compute(fwd, "fwd"), Compute(bwd, "bwd")]


def _ulysses_around(inp: PlanInput, group: tuple[int, ...], inner_fwd: list, inner_bwd: list) -> list[Stage]:
    """attention/ulysses.py: one fused all-to-all of q,k,v (K/V heads replicated to the degree)
    and the inverse all-to-all of the output; backward mirrors both in the input dtype."""
    m, degree = inp.model, len(group)
    rep = kv_replication(m.heads, m.kv_heads, degree)
    tokens = inp.batch * inp.tokens_per_rank
    qkv = Collective("all_to_all", tokens * (m.heads + 2 * m.kv_heads * rep) * m.head_dim, inp.itemsize,
                     group, "fwd", "qkv")
    out = Collective("all_to_all", tokens * m.heads * m.head_dim, inp.itemsize, group, "fwd", "out")
    dout, dqkv = (replace(c, phase="bwd", what="d" + c.what) for c in (out, qkv))
    return [qkv, *inner_fwd, out, dout, *inner_bwd, dqkv]


def _split_phase(stages: list[Stage]) -> tuple[list[Stage], list[Stage]]:
    return [s for s in stages if s.phase == "fwd"], [s for s in stages if s.phase == "bwd"]


# -- schedules ---------------------------------------------------------------------------------
def local_schedule(inp: PlanInput, cfg: Config, rank: int) -> list[Stage]:
    """sp = 1 (tensor / pipeline / data parallelism around local attention): the whole sequence."""
    return _local_compute(inp, inp.model.heads, inp.seq_len)


def ring_schedule(inp: PlanInput, cfg: Config, rank: int) -> list[Stage]:
    group = inp.cluster.ranks
    return _ring_loops(inp, group, cfg.layout, inp.tokens_per_rank, inp.model.heads, inp.model.kv_heads)


def ulysses_schedule(inp: PlanInput, cfg: Config, rank: int) -> list[Stage]:
    group = inp.cluster.ranks
    fwd, bwd = _split_phase(_local_compute(inp, inp.model.heads // inp.world, inp.seq_len))
    return _ulysses_around(inp, group, fwd, bwd)


def usp_schedule(inp: PlanInput, cfg: Config, rank: int) -> list[Stage]:
    m, ud, rd = inp.model, cfg.ulysses, cfg.ring
    ulysses_group, ring_group = usp_groups(inp.world, ud, rank)
    kv_heads = m.kv_heads * kv_replication(m.heads, m.kv_heads, ud) // ud
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
    fwd, bwd = all_pairs_load(cfg.layout, inp.causal, inp.world, inp.tokens_per_rank, inp.attention_rows(m.heads),
                              m.head_dim)
    return [Collective("all_gather", kv, inp.itemsize, group, "fwd", "kv"), Compute(fwd, "fwd"), Compute(bwd, "bwd"),
            Collective("reduce_scatter", kv, inp.acc_itemsize, group, "bwd", "dkv")]


def _exchange(inp: PlanInput, me: int, dst: int, src: int, elems: int, itemsize: int, phase: str,
              what: str) -> list[RingLoop]:
    """One exposed P2P exchange (send to dst, receive from src); nothing when it is this rank."""
    if dst == me:
        return []
    return [RingLoop((me, dst, src), phase, _single_send(elems, itemsize, what))]


@lru_cache(maxsize=256)
def _single_send(elems: int, itemsize: int, what: str) -> Steps:
    return Steps((Step(None, (Send(elems, itemsize, what),)),))


def wallfacer_schedule(inp: PlanInput, cfg: Config, rank: int) -> list[Stage]:
    """attention/wallfacer.py. Forward: team all-gather of q,k,v; skewed placement of the team
    K/V (P2P); ring forward on the sub-ring with C*n-token blocks; combine = all-gather of the
    partial LSEs + reduce-scatter of the weighted outputs. Backward: team all-gather of dO and
    O; ring backward on the sub-ring; reduce-scatter of dQ; reverse placement of dK/dV (P2P);
    reduce-scatter of dK/dV."""
    m, b, n, c = inp.model, inp.batch, inp.tokens_per_rank, cfg.team_size
    grid = wallfacer_grid(inp, cfg)
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
    m, team_tokens = inp.model, cfg.team_size * inp.tokens_per_rank
    loads = wallfacer_step_loads(cfg.layout, inp.causal, inp.world, cfg.team_size, team_tokens,
                                 inp.attention_rows(m.heads), m.head_dim)
    block = 2 * inp.batch * team_tokens * m.kv_dim
    fwd, bwd = loop_steps(inp, loads, block, len(ring) > 1)
    return [RingLoop(ring, "fwd", fwd), RingLoop(ring, "bwd", bwd)]


def fpdt_host_bytes(inp: PlanInput, cfg: Config) -> dict[str, int]:
    """Host<->device copies of one FPDT call with offload (0 without), per phase: every chunk
    put in the ChunkStore goes to the host, every get comes back (attention/fpdt.py)."""
    if not cfg.offload:
        return {"fwd": 0, "bwd": 0}
    u, s = cfg.chunks, fpdt_chunk_sizes(inp, cfg)
    pairs = u * (u + 1) // 2 if inp.causal else u * u  # (q chunk, kv chunk) blocks
    fwd = u * (s["q"] + s["kv"] + s["o"] + s["lse"]) + u * s["q"] + pairs * s["kv"]
    bwd = u * s["do"] + pairs * s["dq"] + u * s["kv"] + pairs * (s["q"] + s["o"] + s["lse"] + s["do"] + s["dq"])
    if not inp.causal:  # this rank's dK/dV pieces of chunks 0..u-2 wait for the last K/V chunk
        m = inp.model
        bwd += 2 * (u - 1) * 2 * inp.batch * (inp.tokens_per_rank // u) * m.kv_heads * m.head_dim * inp.itemsize
    return {"fwd": fwd, "bwd": bwd}


def fpdt_schedule(inp: PlanInput, cfg: Config, rank: int) -> list[Stage]:
    """attention/fpdt.py: per chunk, one fused q,k,v all-to-all and one all-to-all of the output;
    backward: per chunk all-to-alls of dO, of dK/dV (input dtype) and of dQ. Same volume as
    Ulysses in u times as many calls; chunk copies to/from the host hidden under compute."""
    m, u, group = inp.model, cfg.chunks, inp.cluster.ranks
    rep = kv_replication(m.heads, m.kv_heads, inp.world)
    piece_tokens = inp.batch * inp.tokens_per_rank // u

    def a2a(heads: int, phase: str, what: str) -> list[Stage]:
        return [Collective("all_to_all", piece_tokens * heads * m.head_dim, inp.itemsize, group, phase, what)] * u

    fwd, bwd = chunked_load(u, inp.seq_len // u, inp.causal, inp.attention_rows(m.heads // inp.world), m.head_dim)
    host = fpdt_host_bytes(inp, cfg)
    return (a2a(m.heads + 2 * m.kv_heads * rep, "fwd", "qkv") + [Compute(fwd, "fwd", host["fwd"])]
            + a2a(m.heads, "fwd", "out") + a2a(m.heads, "bwd", "dout")
            + [Compute(bwd, "bwd", host["bwd"])]
            + a2a(2 * m.kv_heads * rep, "bwd", "dkv") + a2a(m.heads, "bwd", "dq"))

