"""LSS Transformer (arXiv 2311.02382): one sequence segment per rank.

Attention: each rank's query segment attends the whole sequence; K and V come from one
fused all-gather, dK/dV return to their owners with one fused reduce-scatter (this is
`AllGatherAttention`; layouts zigzag — the default, for causal balance — or contiguous, the
paper's segments, whose last segment does most of the causal work). Output rows are complete
locally, nothing is aggregated.

Training — "double gradient averaging": weight gradients are averaged over the sequence
group (the segments of one sequence) and then over the data-parallel group (different
sequences): `seqpar.parallel.average_gradients(params, mesh, mode="double",
segment_local=segment_local_parameters(model))`. It is exact when each rank's loss is
the mean over its own segment's tokens (equal counts per segment), as in the paper.

Position embeddings follow the paper: the learned absolute table is split by segment,
`SegmentPositionEmbedding` holds only this rank's rows. Those rows are segment-local —
no other rank of the sequence group has them — so their gradients skip the sequence-group
average (which would mix different positions); they are averaged over data parallel and
scaled by 1/sp, their exact share of the mean loss.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .allgather import AllGatherStrategy
from .registry import register

__all__ = ["LssStrategy", "SegmentPositionEmbedding", "segment_local_parameters"]

LSS_LAYOUTS = ("contiguous", "zigzag")


@register("lss")
class LssStrategy(AllGatherStrategy):
    """Segment-per-rank attention over the whole group: one all-gather of K,V forward, one
    reduce-scatter of dK,dV backward."""

    layouts = LSS_LAYOUTS
    # zigzag for causal balance; "contiguous" is the paper's segments (0.72-0.77 of dp, docs/throughput.md)
    default_layout = "zigzag"
    layout_reason = "it splits the sequence into segments: contiguous as in the paper, zigzag for causal balance"
    double_grad_averaging = True
    cost_model = "seqpar.plan.costs:ALLGATHER"  # the same communication and work as allgather


class SegmentPositionEmbedding(nn.Module):
    """Learned absolute position embedding, sharded by segment.

    `ctx` is the SeqParallel context (duck-typed: `positions`, `unshard`, `rank`; attention/ sits
    below context.py). Holds the rows [n_local, dim] of the positions this rank owns in a
    sequence of `max_seq_len` tokens (`ctx.positions(max_seq_len)`: this rank's segment). forward
    takes global positions (e.g. `ctx.positions(seq_len)`) and returns their rows; a
    position this rank does not own raises ValueError (so seq_len must be max_seq_len, or
    any length whose local positions fall in the owned rows).
    """

    def __init__(self, max_seq_len: int, dim: int, ctx: Any, *, init_std: float = 0.02,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.max_seq_len, self.dim, self.ctx = max_seq_len, dim, ctx
        owned = ctx.positions(max_seq_len)  # raises ValueError if max_seq_len does not fit the layout
        row_of = torch.full((max_seq_len,), -1, dtype=torch.long)
        row_of[owned] = torch.arange(owned.numel())
        self.register_buffer("owned_positions", owned.to(device or "cpu"), persistent=False)
        self.register_buffer("row_of", row_of.to(device or "cpu"), persistent=False)
        self.weight = nn.Parameter(torch.empty(owned.numel(), dim, dtype=dtype, device=device))
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, positions: Tensor) -> Tensor:
        """positions [...] (global, int) -> embeddings [..., dim]."""
        if positions.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"positions must be integer indices, got {positions.dtype}")
        if bool(((positions < 0) | (positions >= self.max_seq_len)).any()):
            raise ValueError(f"positions must lie in [0, {self.max_seq_len})")
        rows = self.row_of[positions.long().to(self.row_of.device)]
        if bool((rows < 0).any()):
            raise ValueError(f"rank {self.ctx.rank} holds position rows "
                             f"{_ranges(self.owned_positions)} only (its segment of {self.max_seq_len}); "
                             "it was asked for others: shard the sequence with the same ctx and "
                             "use seq_len = max_seq_len")
        return self.weight[rows]

    @torch.no_grad()
    def load_full_(self, full: Tensor) -> "SegmentPositionEmbedding":
        """Copy this rank's rows from a full [max_seq_len, dim] table (e.g. a 1-process model)."""
        if tuple(full.shape) != (self.max_seq_len, self.dim):
            raise ValueError(f"full table must be [{self.max_seq_len}, {self.dim}], got {tuple(full.shape)}")
        self.weight.copy_(full[self.owned_positions.to(full.device)])
        return self

    @torch.no_grad()
    def full_weight(self) -> Tensor:
        """The whole [max_seq_len, dim] table (all-gather over the sequence group; collective)."""
        return self.ctx.unshard(self.weight.unsqueeze(0))[0]

    def extra_repr(self) -> str:
        return f"max_seq_len={self.max_seq_len}, dim={self.dim}, rows={self.weight.shape[0]}"


def _ranges(positions: Tensor) -> str:
    """Compact 'a..b, c..d' text of a sorted list of positions."""
    pos = positions.tolist()
    starts = [i for i in range(len(pos)) if i == 0 or pos[i] != pos[i - 1] + 1]
    ends = starts[1:] + [len(pos)]
    return ", ".join(f"{pos[a]}..{pos[b - 1]}" for a, b in zip(starts, ends))


def segment_local_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of every SegmentPositionEmbedding in `module` (the `segment_local` of
    `average_gradients(mode="double")`)."""
    return [p for m in module.modules() if isinstance(m, SegmentPositionEmbedding) for p in m.parameters()]
