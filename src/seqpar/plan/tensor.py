"""Tensor-parallel traffic of one training step: what `seqpar.tensor_parallel` moves per rank,
byte for byte equal to what its `TensorParallelTraffic` counts (tested).

With the Megatron-SP plan each of the n_layers blocks all-gathers its tokens twice (before the
attention and the MLP projections) and reduce-scatters twice (after wo and w2); the embedding
reduce-scatters once and the LM head all-gathers once. Backward turns every all-gather into a
reduce-scatter of the same size and back, and activation checkpointing runs the blocks' forward
collectives once more, up to the last one whose output backward needs (the attention's
reduce-scatter: torch's non-reentrant checkpoint stops early, so the MLP's is not rerun).
torch's `loss_parallel` all-reduces three fp32 (fp64) values per token
(the max logit, the sum of exponentials, the target logit) in forward; the norms' weights
(used on token shards) all-reduce their Partial gradients over tp once per step: in the
gradient sync (kind tp_grad_all_reduce), or, with FSDP2, inside backward (tp_all_reduce).
"""
from __future__ import annotations

from .stages import Collective

__all__ = ["tensor_parallel_traffic", "tensor_parallel_collectives"]


def tensor_parallel_traffic(*, tp: int, n_layers: int, dim: int, tokens: int, act_bytes: int, loss_bytes: int,
                            norm_params: int, param_bytes: int, recompute: bool = False,
                            fsdp: bool = False, embedding: bool = True, head: bool = True) -> dict[str, int]:
    """Bytes sent per rank per training step, by kind (seqpar.comm's conventions: all-gather
    (n-1) x shard, reduce-scatter (n-1) x output shard, all-reduce 2 (n-1)/n x tensor).

    tokens: batch x tokens of this rank's sequence shard (before the tp split); act_bytes: the
    activations' element size (2 under bf16 autocast); loss_bytes: 4 (8 in fp64); `embedding` /
    `head`: this rank's pipeline stage holds the embedding / the LM head and loss (both without
    a pipeline); norm_params: the norm weights this rank holds.
    """
    if tp == 1:
        return {}
    shard = tokens // tp * dim * act_bytes * (tp - 1)  # one token-shard collective
    # forward: the blocks' 2 gathers each and the head's; the blocks' 2 scatters and the embedding's;
    # backward swaps them (a gather's gradient is a scatter)
    gathers = 4 * n_layers + head + embedding + (2 * n_layers if recompute else 0)
    # torch's checkpoint stops recomputing after the last saved tensor: w2's reduce-scatter is not rerun
    scatters = 4 * n_layers + head + embedding + (n_layers if recompute else 0)
    out = {"tp_all_gather": gathers * shard, "tp_reduce_scatter": scatters * shard}
    if head:
        out["tp_all_reduce"] = 3 * 2 * (tp - 1) * tokens * loss_bytes // tp
    norms = 2 * (tp - 1) * norm_params * param_bytes // tp
    if fsdp:  # FSDP2 reduces the Partial gradients over tp inside backward, with the other tp traffic
        out["tp_all_reduce"] = out.get("tp_all_reduce", 0) + norms
    else:     # the trainer's gradient sync does (seqpar.parallel.reduce_partial_gradients)
        out["tp_grad_all_reduce"] = norms
    return out


def tensor_parallel_collectives(*, group: tuple[int, ...], n_layers: int, dim: int, tokens: int, act_bytes: int,
                                loss_bytes: int, recompute: bool = False, embedding: bool = True,
                                head: bool = True) -> list[Collective]:
    """The calls behind `tensor_parallel_traffic` for one pass of `tokens` (forward, backward and
    recompute; not the norms' once-per-step gradient all-reduce) on the tp `group`, as timed
    stages: each all-gather / reduce-scatter moves one [tokens / tp, dim] shard (comm.py's
    convention); `embedding` / `head`: this pipeline stage holds the embedding / the LM head
    (its loss all-reduces 3 values per token). With both their bytes are the formula's (tested)."""
    tp = len(group)
    shard = tokens // tp * dim

    def calls(kind: str, count: int, phase: str) -> list[Collective]:
        return [Collective(kind, shard, act_bytes, group, phase, "tp_activations")] * count

    out = calls("all_gather", 2 * n_layers + head, "fwd") + calls("reduce_scatter", 2 * n_layers + embedding, "fwd")
    if head:
        out.append(Collective("all_reduce", 3 * tokens, loss_bytes, group, "fwd", "tp_loss"))
    out += calls("all_gather", 2 * n_layers + embedding, "bwd") + calls("reduce_scatter", 2 * n_layers + head, "bwd")
    if recompute:  # the blocks' forward again, up to the attention's reduce-scatter
        out += calls("all_gather", 2 * n_layers, "bwd") + calls("reduce_scatter", n_layers, "bwd")
    return out
