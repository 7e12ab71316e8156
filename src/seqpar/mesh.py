"""Process-group construction: 2-D meshes carved out of a parent group, no global state.

`Mesh` wraps a parent group (default: WORLD) and creates sub-groups collectively: every
rank of the parent calls the same methods in the same order (torch.distributed requires
this), and each rank keeps the group it belongs to. Groups are cached per Mesh object
only, keyed by their rank lists, so two contexts never share hidden state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch.distributed as dist

__all__ = ["Mesh", "Grid2D", "require_initialized", "PLACEMENTS", "DEFAULT_PLACEMENT", "check_placement", "axis_order",
           "physical_rank"]

# Which traffic stays inside a node: the ranks of a collective group (Ulysses all-to-all,
# WallFacer team) or of a ring (USP ring, WallFacer sub-ring) are made consecutive.
PLACEMENTS = ("collectives_intra", "rings_intra")
DEFAULT_PLACEMENT = "collectives_intra"


def require_initialized() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group "
                           "(or run under `torchrun` / `seqpar.testing.ProcessWorld`) before seqpar.init")


def check_placement(strategy: str, placement: str) -> str:
    if placement not in PLACEMENTS:
        raise ValueError(f"{strategy}: unknown placement {placement!r}; choose from {PLACEMENTS}")
    return placement


def axis_order(placement: str, collective: str, ring: str, outer: Sequence[str] = ()) -> tuple[str, ...]:
    """Named logical axes from slowest to fastest varying over consecutive group ranks.

    Nodes hold consecutive ranks, so the fastest axis is the one kept inside a node: the
    collective axis for ``collectives_intra`` (yunchang's ``use_ulysses_low``), the ring
    axis for ``rings_intra``; `outer` axes vary slowest."""
    inner = (ring, collective) if check_placement("placement", placement) == "collectives_intra" \
        else (collective, ring)
    return (*outer, *inner)


def physical_rank(coords: Mapping[str, int], sizes: Mapping[str, int], order: Sequence[str]) -> int:
    """Group rank of a point of the logical grid: mixed radix over `order` (slowest first)."""
    rank = 0
    for axis in order:
        rank = rank * sizes[axis] + coords[axis]
    return rank


@dataclass(frozen=True)
class Grid2D:
    """Rank r of a group of rows*cols ranks sits at (r // cols, r % cols): rows are contiguous."""

    rows: int
    cols: int

    def coords(self, rank: int) -> tuple[int, int]:
        return divmod(rank, self.cols)

    def row_members(self, row: int) -> list[int]:
        return [row * self.cols + c for c in range(self.cols)]

    def col_members(self, col: int) -> list[int]:
        return [r * self.cols + col for r in range(self.rows)]


class Mesh:
    """Sub-group factory over a parent process group."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        require_initialized()
        self.group = group if group is not None else dist.group.WORLD
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise RuntimeError("this process is not a member of the group given to seqpar")
        self.global_ranks = [dist.get_global_rank(self.group, i) for i in range(self.size)]
        self._cache: dict[tuple[int, ...], dist.ProcessGroup] = {}

    def partition(self, blocks: list[list[int]]) -> dist.ProcessGroup:
        """Create one group per block of parent-group ranks (blocks must partition 0..size-1)
        and return the block containing this rank. Collective over the parent group."""
        flat = sorted(r for b in blocks for r in b)
        if flat != list(range(self.size)):
            raise ValueError(f"blocks {blocks} do not partition ranks 0..{self.size - 1}")
        mine = None
        for block in blocks:
            group = self._group(tuple(block))
            if self.rank in block:
                mine = group
        return mine

    def _group(self, block: tuple[int, ...]) -> dist.ProcessGroup:
        if len(block) == self.size and list(block) == list(range(self.size)):
            return self.group
        if block not in self._cache:
            self._cache[block] = dist.new_group([self.global_ranks[r] for r in block],
                                                use_local_synchronization=False)
        return self._cache[block]

    def grid(self, rows: int, cols: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
        """Split into a rows x cols grid; returns (row_group, col_group) of this rank.
        Row groups are `cols` contiguous ranks (e.g. Ulysses / intra-node), col groups strided."""
        if rows * cols != self.size:
            raise ValueError(f"mesh {rows} x {cols} = {rows * cols} does not match group size {self.size}")
        g = Grid2D(rows, cols)
        row_group = self.partition([g.row_members(r) for r in range(rows)])
        col_group = self.partition([g.col_members(c) for c in range(cols)])
        return row_group, col_group
