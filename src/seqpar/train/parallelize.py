"""How a model is spread over the run's mesh (torchtitan's `parallelize` recipe) and what the
step does around it: tensor parallelism, compiled blocks, then DDP or FSDP2; the tensor-parallel
loss and traffic count around forward and backward; gradient clipping over DTensor and plain
gradients.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from ..dit import DiT
from ..hf import HFCausalLM
from ..parallel import ParallelDims, replicate_gradients
from ..tensor_parallel import TensorParallelTraffic, parallelize_decoder, parallelize_dit, parallelize_hf

__all__ = ["parallelize", "uses_ddp", "tensor_parallel_context", "clip_gradients"]


def uses_ddp(dims: ParallelDims, fsdp: bool, double_averaging: bool) -> bool:
    """Whether torch's DDP syncs the gradients (`replicate_gradients`): several dp x sp ranks,
    no FSDP (it reduce-scatters itself), no tensor parallelism (DTensor parameters, which DDP
    does not take: `average_gradients`), and not LSS (its double averaging, sp then dp, stays
    hand-written in `average_gradients(mode="double")`)."""
    return dims.batch_size > 1 and dims.tp == 1 and not fsdp and not double_averaging


def parallelize(model: torch.nn.Module, dims: ParallelDims, fsdp: bool, compile_backend: str | None = None,
                ddp: bool = False, root: torch.nn.Module | None = None) -> torch.nn.Module:
    """torchtitan's order: tensor parallelism first (DTensor shards over the tp mesh: the built-in
    decoder, the DiT or a Hugging Face decoder by its own plan), then each block compiled in place
    (`block.compile`: parameter names unchanged) when compile_backend is given, then FSDP2 over the
    dp x sp ranks (2-D with tp); activation checkpointing is the model's own option (around the
    compiled blocks). ddp: without FSDP, gradients averaged by torch's DDP inside backward
    (`replicate_gradients`). root: the module whose forward runs the model, FSDP2's root (default the
    model; a pipeline stage's `StageModule`, which calls the model's parts directly)."""
    if dims.tp > 1:
        how = parallelize_dit if isinstance(model, DiT) else parallelize_hf if isinstance(model, HFCausalLM) \
            else parallelize_decoder
        how(model, dims.tp_mesh)
    blocks = [block for block in model.layers if block is not None]  # a pipeline stage holds its own only
    if compile_backend:
        for block in blocks:
            block.compile(backend=compile_backend)
    if not fsdp and ddp:
        replicate_gradients(model, dims)
    if fsdp:
        mesh = dims.batch_mesh
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model if root is None else root, mesh=mesh)
    return model


def tensor_parallel_context(dims: ParallelDims):
    """Around forward and backward with tp > 1: torch's vocabulary-parallel cross-entropy and the
    count of the collectives DTensor issues (kinds tp_*); nothing with tp = 1."""
    if dims.tp == 1:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(loss_parallel())
    stack.enter_context(TensorParallelTraffic(dims.stats))
    return stack


def clip_gradients(parameters: Iterable[torch.nn.Parameter], clip: float, pp_group=None) -> float:
    """Global gradient norm, clipped to `clip` unless it is 0 (always computed, so non-finite
    gradients are seen even without clipping). pp_group: each pipeline stage holds only its
    parameters, so the squared norms of the stages are summed over it first."""
    params = list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if pp_group is not None:
        return _clip_pipeline(params, grads, clip, pp_group)
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if sharded and len(sharded) < len(grads):
        return _clip_mixed(sharded, [g for g in grads if not isinstance(g, DTensor)], clip)
    if clip:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm(grads)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _clip_pipeline(params: list, grads: list, clip: float, pp_group) -> float:
    """The norm over every stage's gradients (plain, or DTensors with tp): one all-reduce of the
    squared stage norms."""
    local = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    if isinstance(local, DTensor):  # tensor-parallel stage: every gradient a DTensor, the norm over tp
        local = local.full_tensor()
    squared = (local.double() ** 2).reshape(1)
    dist.all_reduce(squared, group=pp_group)
    total = squared.sqrt()[0]
    if clip and any(isinstance(g, DTensor) for g in grads):
        _scale_to_clip(grads, clip, float(total))
    elif clip:
        torch.nn.utils.clip_grads_with_norm_(params, clip, total.to(local.dtype))
    return float(total)


def _clip_mixed(sharded: list, plain: list, clip: float) -> float:
    """clip_grad_norm_ for a model whose tensor-parallel weights are DTensors and whose other
    weights (replicated over tp: the DiT's modulation, a Hugging Face model's norms) are plain
    tensors, which torch's foreach kernels cannot take in one list: the norm of each part, one
    total, one clipping coefficient (min(1, clip / (norm + 1e-6)), as clip_grad_norm_)."""
    part = torch.nn.utils.get_total_norm(sharded).full_tensor()
    total = float(torch.stack([part, torch.nn.utils.get_total_norm(plain).to(part.dtype)]).norm())
    if clip:
        _scale_to_clip(sharded + plain, clip, total)
    return total


def _scale_to_clip(grads: list, clip: float, total: float) -> None:
    """Scale gradients of global norm `total` as clip_grads_with_norm_ does: by min(1, clip / (total + 1e-6))."""
    coef = min(1.0, clip / (total + 1e-6))
    for g in grads:
        g.mul_(coef)
