"""The parallel layout: pipeline x data x sequence x tensor parallelism on one mesh, and gradient averaging.

`ParallelDims(sp, group, tp=..., pp=...)` lays the ranks of a group (default WORLD) out as a
grid in USP's order, tensor parallelism innermost (consecutive ranks, so inside a node),
pipeline stages outermost:

    rank = ((pp_rank * dp + dp_rank) * sp + sp_rank) * tp + tp_rank

and holds, for this rank, every group the run needs: the sequence-parallel group (what the
strategy's context shards the sequence over), the data-parallel group, the tensor-parallel
group (a torch `DeviceMesh` for `torch.distributed.tensor.parallel`), and the *batch* group
(dp x sp ranks of one tp rank: all the ranks that hold different tokens, over which loss sums
and gradients are reduced). It validates once and every part of the trainer asks it.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import replicate
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate

from .comm import Comm, CommStats
from .mesh import Mesh

__all__ = ["ParallelDims", "average_gradients", "reduce_partial_gradients", "replicate_gradients", "MESH_ORDER",
           "PP_MESH_ORDER"]

#: mesh dimensions from the outermost (slowest varying over consecutive ranks) to the innermost
#: (with pp > 1 the DeviceMesh has a "pp" dimension in front: PP_MESH_ORDER)
MESH_ORDER = ("dp", "sp", "tp")
PP_MESH_ORDER = ("pp", *MESH_ORDER)


class ParallelDims:
    """pp x dp x sp x tp process groups of one rank (tp innermost, then sp, then dp, then pp).

    Attributes: `pp`, `dp`, `sp`, `tp` (degrees), `pp_rank`, `dp_rank`, `sp_rank`, `tp_rank`;
    `sp_group`, `dp_group`, `tp_group`, `batch_group` (dp x sp ranks of this stage and tp rank),
    `pp_group` (the stages of this (dp, sp, tp) point; built only when pp > 1, else None);
    `sp_comm`, `dp_comm`, `batch_comm` (byte-counted); `device_mesh` (a torch DeviceMesh over
    ("dp", "sp", "tp"), with "pp" in front when pp > 1) and `tp_mesh` / `batch_mesh` (its
    tensor-parallel and flattened dp x sp dimensions, for parallelize_module and fully_shard).
    """

    def __init__(self, sp: int, group: dist.ProcessGroup | None = None, stats: CommStats | None = None,
                 tp: int = 1, device_type: str = "cpu", pp: int = 1):
        self.mesh = Mesh(group)
        size = self.mesh.size
        if tp < 1 or sp < 1 or pp < 1 or size % (sp * tp * pp):
            raise ValueError(f"pp ({pp}) x sp ({sp}) x tp ({tp}) must divide the number of ranks ({size}): set "
                             f"--pp/--sp/--tp so that pp x dp x sp x tp = {size}")
        self.pp, self.sp, self.tp, self.dp = pp, sp, tp, size // (sp * tp * pp)
        self.stats = stats if stats is not None else CommStats()
        self.pp_rank, rest = divmod(self.mesh.rank, self.dp * sp * tp)
        self.dp_rank, rest = divmod(rest, sp * tp)
        self.sp_rank, self.tp_rank = divmod(rest, tp)
        coords = [(p, d, s, t) for p in range(pp) for d in range(self.dp) for s in range(sp)
                  for t in range(tp)]  # index = group rank
        self.tp_group = self._partition(coords, lambda c: (c[0], c[1], c[2]))
        self.sp_group = self._partition(coords, lambda c: (c[0], c[1], c[3]))
        self.dp_group = self._partition(coords, lambda c: (c[0], c[2], c[3]))
        self.batch_group = self._partition(coords, lambda c: (c[0], c[3]))
        self.pp_group = self._partition(coords, lambda c: c[1:]) if pp > 1 else None
        self.sp_comm = Comm(self.sp_group, self.stats)
        self.dp_comm = Comm(self.dp_group, self.stats)
        self.batch_comm = Comm(self.batch_group, self.stats)
        self.device_type = device_type
        self._device_mesh: DeviceMesh | None = None
        self._batch_mesh: DeviceMesh | None = None

    def _partition(self, coords: list[tuple[int, ...]], key) -> dist.ProcessGroup:
        """The group of ranks sharing key(coords) with this rank (collective: every rank, same order)."""
        blocks: dict = {}
        for rank, c in enumerate(coords):
            blocks.setdefault(key(c), []).append(rank)
        return self.mesh.partition(list(blocks.values()))

    @property
    def rank(self) -> int:
        return self.mesh.rank

    @property
    def size(self) -> int:
        return self.mesh.size

    @property
    def batch_size(self) -> int:
        """Ranks holding different tokens (of one stage): dp x sp."""
        return self.dp * self.sp

    @property
    def device_mesh(self) -> DeviceMesh:
        """torch DeviceMesh over ("dp", "sp", "tp"), ("pp", "dp", "sp", "tp") when pp > 1, built
        from this layout's groups (made on first use)."""
        if self._device_mesh is None:
            groups, names = [self.dp_group, self.sp_group, self.tp_group], MESH_ORDER
            if self.pp > 1:
                groups, names = [self.pp_group, *groups], PP_MESH_ORDER
            ranks = torch.tensor(self.mesh.global_ranks).view(*(getattr(self, n) for n in names))  # [(pp,) dp, sp, tp]
            self._device_mesh = DeviceMesh.from_group(groups, self.device_type, mesh=ranks, mesh_dim_names=names)
        return self._device_mesh

    @property
    def tp_mesh(self) -> DeviceMesh:
        """The tensor-parallel dimension (what `parallelize_module` shards over)."""
        return self.device_mesh["tp"]

    @property
    def batch_mesh(self) -> DeviceMesh:
        """The dp x sp dimensions flattened into one ("batch"): what FSDP2 shards over (with tp > 1
        FSDP2 joins it with the parameters' tp dimension itself: 2-D FSDP x TP)."""
        if self._batch_mesh is None:
            self._batch_mesh = self.device_mesh["dp", "sp"]._flatten("batch")
        return self._batch_mesh

    def __repr__(self) -> str:
        return (f"ParallelDims(pp={self.pp}, dp={self.dp}, sp={self.sp}, tp={self.tp}, pp_rank={self.pp_rank}, "
                f"dp_rank={self.dp_rank}, sp_rank={self.sp_rank}, tp_rank={self.tp_rank})")


def _local_grad(p: nn.Parameter) -> torch.Tensor:
    """This rank's gradient as a plain tensor (a tensor-parallel shard for DTensor parameters)."""
    return p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad


def _flat_grads(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([_local_grad(p).reshape(-1) for p in params])


def _unflatten_into(flat: torch.Tensor, params: list[nn.Parameter]) -> None:
    offset = 0
    for p in params:
        grad = _local_grad(p)
        n = grad.numel()
        grad.copy_(flat[offset:offset + n].view_as(grad))
        offset += n


def reduce_partial_gradients(params: Iterable[nn.Parameter], stats: CommStats | None = None) -> None:
    """Sum the tensor-parallel partial gradients (norm weights of sequence-sharded activations are
    used by every tp rank on its own tokens: their gradients are Partial over tp) into Replicate
    ones, counting the all-reduce bytes as kind "tp_grad_all_reduce"."""
    for p in params:
        grad = p.grad
        if not isinstance(grad, DTensor) or not any(isinstance(pl, Partial) for pl in grad.placements):
            continue
        n = grad.device_mesh.size()
        p.grad = grad.redistribute(placements=[Replicate() if isinstance(pl, Partial) else pl
                                               for pl in grad.placements])
        if stats is not None:
            nbytes = 2 * (n - 1) * grad.to_local().numel() * grad.element_size() // n
            stats.record("tp_grad_all_reduce", nbytes, nbytes)


def _average(params: list[nn.Parameter], comm: Comm, kind: str) -> None:
    """Average the grads of `params` over comm's group with one bucketed all-reduce."""
    if not params or comm.size == 1:
        return
    flat = _flat_grads(params)
    comm.all_reduce(flat, kind=kind)
    _unflatten_into(flat / comm.size, params)


def average_gradients(params: Iterable[nn.Parameter], mesh: ParallelDims, mode: str = "flat",
                      segment_local: Iterable[nn.Parameter] = ()) -> None:
    """Average gradients so every rank holds the gradient of the mean loss over all samples.

    Tensor-parallel partial gradients are first summed over tp (`reduce_partial_gradients`); then
    mode "flat": one all-reduce over the dp x sp ranks (of this tp rank).
    mode "double" (LSS Transformer): average over the sequence group, then over the
    data-parallel group. `segment_local` parameters (e.g. a position-embedding shard that
    each sequence rank owns alone) skip the sequence-group step: they are averaged over the
    data-parallel group only and scaled by 1/sp, which is exactly their share of the mean.
    """
    params = [p for p in params if p.grad is not None]
    reduce_partial_gradients(params, mesh.stats)
    local_ids = {id(p) for p in segment_local}
    shared = [p for p in params if id(p) not in local_ids]
    local = [p for p in params if id(p) in local_ids]
    if mode == "flat":
        if local:
            raise ValueError("segment-local parameters need mode='double'")
        _average(shared, mesh.batch_comm, "grad_all_reduce")
    elif mode == "double":
        _average(shared, mesh.sp_comm, "grad_all_reduce_sp")
        _average(shared, mesh.dp_comm, "grad_all_reduce_dp")
        for p in local:
            _local_grad(p).div_(mesh.sp)
        _average(local, mesh.dp_comm, "grad_all_reduce_dp")
    else:
        raise ValueError(f"unknown gradient averaging mode {mode!r}; use 'flat' or 'double'")


def replicate_gradients(model: nn.Module, mesh: ParallelDims) -> None:
    """Average gradients over the batch group (dp x sp ranks) with torch's DDP, composable
    `replicate` (parameter names unchanged), inside backward: the gradients of the mean loss
    over all samples, as `average_gradients(mode="flat")` computes them.

    One bucket, fixed from the first step: DDP would rebuild its buckets after the first
    iteration (parameters in the order their gradients became ready), so a run resumed from a
    checkpoint would reduce in another layout than the run it continues, and gloo's sums in
    another order (not bitwise the same). Here the buckets are rebuilt once at construction, in
    parameter order (what DDP's Join hook does), and never again; one bucket holds every
    gradient (`gradient_as_bucket_view`: the gradients are views of it, no copies). Its bytes
    are counted as kind "grad_all_reduce" (2 (n-1)/n x gradient bytes, a ring all-reduce's).
    Plain tensors only: with tensor parallelism (DTensor parameters) use `average_gradients`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    total_mb = sum(p.numel() * p.element_size() for p in params) / 2 ** 20
    replicate(model, process_group=mesh.batch_group, bucket_cap_mb=total_mb + 1, gradient_as_bucket_view=True)
    state = replicate.state(model)
    state.lazy_init()  # build DDP now (replicate builds it lazily in the first forward)
    ddp = state._ddp
    ddp.reducer._push_all_rebuilt_params()  # the fixed layout: parameter order, rebuilt once now
    ddp.reducer._rebuild_buckets()
    n, stats = mesh.batch_size, mesh.stats

    def counted_allreduce(group, bucket):
        nbytes = 2 * (n - 1) * bucket.buffer().numel() * bucket.buffer().element_size() // n
        stats.record("grad_all_reduce", nbytes, nbytes)
        return allreduce_hook(group, bucket)

    ddp.register_comm_hook(mesh.batch_group, counted_allreduce)
