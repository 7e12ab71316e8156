"""Sequence-chunked MLP and LM loss with recomputation (FPDT, arXiv 2408.16978).

Position-wise work does not need the whole sequence at once. Both functions process
the sequence in `num_chunks` pieces under non-reentrant activation checkpointing: the
forward keeps only each piece's *inputs* (views of tensors that exist anyway), and the
backward recomputes one piece at a time, so the large intermediates — the MLP's
[b, s, 4H] hidden layer, the [b, s, vocab] logits and their gradient — exist for one
piece only. Results are exact: every token goes through the same operations as
unchunked; only the order of the final sum changes.

    y = chunked_mlp(block.mlp, x, num_chunks=4)                   # x [b, s, H]
    loss_sum = chunked_lm_loss(h, lm_head.weight, labels, 4)      # sum of token losses
    loss = loss_sum / count_tokens(labels)                        # (or a global count)

With sequence parallelism, return sums and divide by the token count over the whole
group (or per segment, as LSS does) rather than taking local means.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .kernels import accum_dtype
from .offload import host_store

__all__ = ["chunked_mlp", "chunked_lm_loss", "count_tokens", "offloaded_checkpoint"]

REDUCTIONS = ("sum", "mean")


def _check_chunks(num_chunks: int) -> None:
    if not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks must be a positive integer, got {num_chunks!r}")


def chunked_mlp(mlp: Callable[[Tensor], Tensor], x: Tensor, num_chunks: int, dim: int = 1) -> Tensor:
    """mlp(x) computed on `num_chunks` slices of x along `dim` (the sequence, x [b, s, H]).

    Each slice is recomputed in backward (torch.utils.checkpoint, non-reentrant, RNG state
    preserved so dropout matches), so only one slice's intermediates are alive at a time.
    `mlp` must be position-wise (no mixing along `dim`). num_chunks=1 calls mlp(x) plainly
    (no recomputation); more chunks than positions are capped at the number of positions.
    """
    _check_chunks(num_chunks)
    if x.dim() == 0:
        raise ValueError("chunked_mlp needs an input with a sequence dimension")
    pieces = min(num_chunks, x.shape[dim])
    if pieces <= 1:
        return mlp(x)
    outs = [checkpoint(mlp, piece, use_reentrant=False) for piece in torch.tensor_split(x, pieces, dim=dim)]
    return torch.cat(outs, dim=dim)


def count_tokens(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Number of labels that count in the loss (int64 scalar tensor)."""
    return (labels != ignore_index).sum()


def _token_loss_sum(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """Sum of cross-entropy over the rows of hidden [n, H] against weight [V, H], labels [n]."""
    logits = (hidden @ weight.t()).to(accum_dtype(hidden.dtype))
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def _check_loss_inputs(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int,
                       reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., H] and weight [vocab, H] do not match: hidden{tuple(hidden.shape)}, "
                         f"weight{tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels{tuple(labels.shape)} must have the shape of hidden without its last "
                         f"dimension, {tuple(hidden.shape[:-1])}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64/int32 class indices, got {labels.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes differ")
    counted = labels != ignore_index
    if bool(((labels[counted] < 0) | (labels[counted] >= weight.shape[0])).any()):
        raise ValueError(f"labels must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}")


def chunked_lm_loss(hidden: Tensor, weight: Tensor, labels: Tensor, num_chunks: int, ignore_index: int = -100,
                    reduction: str = "sum") -> Tensor:
    """Cross-entropy of logits = hidden @ weight.T without materialising all logits at once.

    hidden [..., H] (e.g. [b, s, H]), weight [vocab, H], labels hidden.shape[:-1] (class
    indices; `ignore_index` entries do not count). The flattened tokens are split into
    `num_chunks` pieces; each piece's logits (in fp32, fp64 for fp64 inputs) and loss are
    recomputed in backward, so at most one piece's [n/num_chunks, vocab] logits exist.

    reduction "sum" (default): sum of token losses — divide by `count_tokens(labels)`, or a
    count over the sequence-parallel group, for a mean. "mean": the local mean (NaN when
    no token counts, like F.cross_entropy). Returns a scalar in the accumulation dtype.
    """
    _check_chunks(num_chunks)
    _check_loss_inputs(hidden, weight, labels, ignore_index, reduction)
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()
    pieces = max(1, min(num_chunks, flat_labels.numel()))
    if pieces == 1:
        total = _token_loss_sum(flat_hidden, weight, flat_labels, ignore_index)
    else:
        total = torch.stack([
            checkpoint(_token_loss_sum, h, weight, y, ignore_index, use_reentrant=False, preserve_rng_state=False)
            for h, y in zip(torch.tensor_split(flat_hidden, pieces), torch.tensor_split(flat_labels, pieces))
        ]).sum()
    return total / count_tokens(labels, ignore_index) if reduction == "mean" else total


# -- activation checkpointing with the block input in host memory (FPDT / ALST offload) ------
class _OffloadedCheckpoint(torch.autograd.Function):
    """y = block(x, *args) without autograd state on the device: the forward runs under no_grad
    and moves x to host memory; the backward brings x back, recomputes the block with grad and
    back-propagates through it (parameter gradients accumulate as in reentrant checkpointing)."""

    @staticmethod
    def forward(ctx, x: Tensor, block: Callable[..., Tensor], host, *args) -> Tensor:
        ctx.block, ctx.host, ctx.args = block, host, args
        ctx.handle, ctx.x_requires_grad = host.to_host(x), x.requires_grad
        with torch.no_grad():
            return block(x, *args)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, event = ctx.host.to_device(ctx.handle)
        ctx.host.ready(x, event)
        x = x.detach().requires_grad_(ctx.x_requires_grad)
        with torch.enable_grad():
            out = ctx.block(x, *ctx.args)
        torch.autograd.backward(out, grad)
        ctx.handle = None
        return (x.grad, None, None) + (None,) * len(ctx.args)


def offloaded_checkpoint(block: Callable[..., Tensor], x: Tensor, *args) -> Tensor:
    """Activation checkpointing of `block(x, *args)` whose saved input x [b, s, H] lives in host
    memory between forward and backward (pinned buffers and a side stream on CUDA, a
    numpy-owned copy on CPU), so a checkpointed model keeps no per-token state on the device.
    Exact: the backward recomputes the same operations. `args` are not differentiated."""
    return _OffloadedCheckpoint.apply(x, block, host_store(x.device), *args)

