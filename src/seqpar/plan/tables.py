"""Busiest-rank tables and attention loads per step, from the layouts' causal block rules.

`layout.block_pairs(kind, causal, q_rank, kv_rank, n)` depends only on whether the K/V block
comes from an earlier, the same or a later outer rank, so each table costs O(P) or less: the
(query, key) pairs of the busiest rank per step (`*_pairs`, what the flops model and the
tests use) and the `Load` of each step (`*_load(s)`: the kernel calls of each class of ranks
and its share of the world, timed per call by `Hardware`).
"""
from __future__ import annotations

from functools import lru_cache

from ..attention.wallfacer import WallFacerGrid
from ..layout import block_pairs
from .stages import Load, balanced_loads, work_of

__all__ = ["pair_count", "block_class_pairs", "block_class_calls", "ring_step_pairs", "all_pairs_busiest",
           "wallfacer_step_pairs", "ring_step_loads", "all_pairs_load", "wallfacer_step_loads", "local_load",
           "chunked_load"]


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
    grid = WallFacerGrid(world, team_size)
    cls = block_class_pairs(kind, causal, team_tokens)
    return tuple(max(cls[k] for k in {_order(t, grid.kv_team(t, a, s)) for t in range(grid.team_count)
                                      for a in range(team_size)}) for s in range(grid.ring_len))


# -- loads: kernel calls per step (the busiest rank's candidates and the world's mean) -----------------
@lru_cache(maxsize=None)
def block_class_calls(kind: str, causal: bool, n_local: int) -> dict[str, tuple[tuple[int, int, bool], ...]]:
    """The kernel calls (q rows, kv rows, causal) of each class of block_class_pairs."""
    def calls(q_rank: int, kv_rank: int) -> tuple[tuple[int, int, bool], ...]:
        return tuple((_rows(q, n_local), _rows(kv, n_local), c)
                     for q, kv, c in block_pairs(kind, causal, q_rank, kv_rank, n_local))
    return {"before": calls(1, 0), "same": calls(0, 0), "after": calls(0, 1)}


def _class_loads(kind: str, causal: bool, n_local: int, rows: int, head_dim: int,
                 shares: dict[str, float]) -> tuple[Load, Load]:
    """(forward, backward) loads of a step whose ranks hold the classes in `shares` (fractions
    of the world's ranks)."""
    cls = block_class_calls(kind, causal, n_local)
    return tuple(Load(tuple((work_of([(cls[k], 1.0)], rows, head_dim, backward), w) for k, w in shares.items() if w))
                 for backward in (False, True))


@lru_cache(maxsize=None)
def ring_step_loads(kind: str, causal: bool, size: int, n_local: int, rows: int,
                    head_dim: int) -> tuple[tuple[Load, Load], ...]:
    """Per ring step, (forward, backward) loads: step 0 the own block; at step s >= 1 the ranks
    r >= s (a share (size-s)/size) hold an earlier block, the others a later one."""
    steps = [_class_loads(kind, causal, n_local, rows, head_dim, {"same": 1.0})]
    steps += [_class_loads(kind, causal, n_local, rows, head_dim, {"before": (size - s) / size, "after": s / size})
              for s in range(1, size)]
    return tuple(steps)


@lru_cache(maxsize=None)
def all_pairs_load(kind: str, causal: bool, size: int, n_local: int, rows: int, head_dim: int) -> tuple[Load, Load]:
    """Every rank attends all K/V blocks: rank r has r earlier and size-1-r later blocks (rank 0
    or size-1 is the busiest); one class per rank, or one for all when the blocks are alike."""
    cls = block_class_calls(kind, causal, n_local)
    ranks = [0] if cls["before"] == cls["after"] else range(size)
    return tuple(Load(tuple((work_of([(cls["same"], 1.0), (cls["before"], float(r)), (cls["after"], size - 1.0 - r)],
                                     rows, head_dim, backward), 1.0 / len(ranks)) for r in ranks))
                 for backward in (False, True))


@lru_cache(maxsize=None)
def wallfacer_step_loads(kind: str, causal: bool, world: int, team_size: int, team_tokens: int, rows: int,
                         head_dim: int) -> tuple[tuple[Load, Load], ...]:
    """Per sub-ring step, the loads over every (team, member) (team-level rules, C*n-token blocks)."""
    grid = WallFacerGrid(world, team_size)
    steps = []
    for s in range(grid.ring_len):
        shares: dict[str, float] = {}
        for t in range(grid.team_count):
            for a in range(team_size):
                k = _order(t, grid.kv_team(t, a, s))
                shares[k] = shares.get(k, 0.0) + 1.0 / world
        steps.append(_class_loads(kind, causal, team_tokens, rows, head_dim, shares))
    return tuple(steps)


@lru_cache(maxsize=None)
def local_load(seq: int, causal: bool, rows: int, head_dim: int) -> tuple[Load, Load]:
    """One whole-sequence call per rank (Ulysses' local attention: nothing to merge)."""
    return balanced_loads(((seq, seq, causal),), rows, head_dim, merged=False)


@lru_cache(maxsize=None)
def chunked_load(chunks: int, chunk: int, causal: bool, rows: int, head_dim: int) -> tuple[Load, Load]:
    """FPDT: every (q chunk, kv chunk) pair of `chunks` chunks of `chunk` tokens, causal ones on
    the diagonal and only below it."""
    if causal:
        calls = ((chunk, chunk, True),) * chunks + ((chunk, chunk, False),) * (chunks * (chunks - 1) // 2)
    else:
        calls = ((chunk, chunk, False),) * (chunks * chunks)
    return balanced_loads(calls, rows, head_dim)  # work_of adds up equal calls
