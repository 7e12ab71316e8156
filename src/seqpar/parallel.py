"""Data x sequence parallel mesh and gradient averaging.

The world (or a given group) of dp * sp ranks is a grid whose rows are the
sequence-parallel groups (sp contiguous ranks: one sequence, split) and whose columns
are the data-parallel groups (same sequence shard position, different samples).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .comm import Comm, CommStats
from .mesh import Mesh

__all__ = ["ParallelMesh", "average_gradients"]


class ParallelMesh:
    """dp x sp process groups: `sp_group` (contiguous ranks), `dp_group` (strided ranks)."""

    def __init__(self, sp: int, group: dist.ProcessGroup | None = None, stats: CommStats | None = None):
        self.mesh = Mesh(group)
        size = self.mesh.size
        if sp < 1 or size % sp:
            raise ValueError(f"sequence-parallel size {sp} must divide the number of ranks ({size})")
        self.sp, self.dp = sp, size // sp
        self.stats = stats if stats is not None else CommStats()
        self.sp_group, self.dp_group = self.mesh.grid(rows=self.dp, cols=sp)
        self.dp_rank, self.sp_rank = divmod(self.mesh.rank, sp)
        self.world_comm = Comm(self.mesh.group, self.stats)
        self.sp_comm = Comm(self.sp_group, self.stats)
        self.dp_comm = Comm(self.dp_group, self.stats)

    @property
    def rank(self) -> int:
        return self.mesh.rank

    @property
    def size(self) -> int:
        return self.mesh.size

    def __repr__(self) -> str:
        return f"ParallelMesh(dp={self.dp}, sp={self.sp}, dp_rank={self.dp_rank}, sp_rank={self.sp_rank})"


def _flat_grads(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def _unflatten_into(flat: torch.Tensor, params: list[nn.Parameter]) -> None:
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def _average(params: list[nn.Parameter], comm: Comm, kind: str) -> None:
    """Average the grads of `params` over comm's group with one bucketed all-reduce."""
    if not params or comm.size == 1:
        return
    flat = _flat_grads(params)
    comm.all_reduce(flat, kind=kind)
    _unflatten_into(flat / comm.size, params)


def average_gradients(params: Iterable[nn.Parameter], mesh: ParallelMesh, mode: str = "flat",
                      segment_local: Iterable[nn.Parameter] = ()) -> None:
    """Average gradients so every rank holds the gradient of the mean loss over all samples.

    mode "flat": one all-reduce over all dp*sp ranks.
    mode "double" (LSS Transformer): average over the sequence group, then over the
    data-parallel group. `segment_local` parameters (e.g. a position-embedding shard that
    each sequence rank owns alone) skip the sequence-group step: they are averaged over the
    data-parallel group only and scaled by 1/sp, which is exactly their share of the mean.
    """
    params = [p for p in params if p.grad is not None]
    local_ids = {id(p) for p in segment_local}
    shared = [p for p in params if id(p) not in local_ids]
    local = [p for p in params if id(p) in local_ids]
    if mode == "flat":
        if local:
            raise ValueError("segment-local parameters need mode='double'")
        _average(shared, mesh.world_comm, "grad_all_reduce")
    elif mode == "double":
        _average(shared, mesh.sp_comm, "grad_all_reduce_sp")
        _average(shared, mesh.dp_comm, "grad_all_reduce_dp")
        for p in local:
            p.grad.div_(mesh.sp)
        _average(local, mesh.dp_comm, "grad_all_reduce_dp")
    else:
        raise ValueError(f"unknown gradient averaging mode {mode!r}; use 'flat' or 'double'")
