"""How the trainer lays a model over its ranks: tensor parallelism, compiled blocks, gradient
sync by DDP or FSDP2 parameter sharding (torchtitan's order)."""
from __future__ import annotations

import torch
from torch.distributed.fsdp import fully_shard

from ..parallel import ParallelDims, replicate_gradients
from ..tensor_parallel import parallelize_decoder

__all__ = ["parallelize", "uses_ddp"]


def uses_ddp(dims: ParallelDims, fsdp: bool, double_averaging: bool) -> bool:
    """Whether torch's DDP syncs the gradients (`replicate_gradients`): several dp x sp ranks,
    no FSDP (it reduce-scatters itself), no tensor parallelism (DTensor parameters, which DDP
    does not take: `average_gradients`), and not LSS (its double averaging, sp then dp, stays
    hand-written in `average_gradients(mode="double")`)."""
    return dims.batch_size > 1 and dims.tp == 1 and not fsdp and not double_averaging


def parallelize(model: torch.nn.Module, dims: ParallelDims, fsdp: bool, compile_backend: str | None = None,
                ddp: bool = False) -> torch.nn.Module:
    """torchtitan's order: tensor parallelism first (DTensor shards over the tp mesh), then each
    block compiled in place (`block.compile`: parameter names unchanged) when compile_backend is
    given, then FSDP2 over the dp x sp ranks (2-D with tp); activation checkpointing is the
    model's own option (around the compiled blocks). ddp: without FSDP, gradients averaged by
    torch's DDP inside backward (`replicate_gradients`)."""
    if dims.tp > 1:
        parallelize_decoder(model, dims.tp_mesh)
    if compile_backend:
        for block in model.layers:
            block.compile(backend=compile_backend)
    if not fsdp and ddp:
        replicate_gradients(model, dims)
    if fsdp:
        mesh = dims.batch_mesh
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model
