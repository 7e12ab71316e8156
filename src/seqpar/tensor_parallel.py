"""Tensor parallelism for the built-in decoder on torch's own API (`torch.distributed.tensor.parallel`).

Megatron-style with sequence parallelism between blocks (torchtitan's Llama plan):

    tok_embeddings   RowwiseParallel   vocabulary rows sharded; output reduce-scattered over tokens
    *_norm, norm     SequenceParallel  on [batch, seq_local / tp, dim] token shards
    attention        all-gather tokens in; wq, wk, wv ColwiseParallel (local heads); wo RowwiseParallel
                     (reduce-scatter over tokens out)
    mlp              all-gather tokens in; w1, w3 ColwiseParallel; w2 RowwiseParallel (reduce-scatter out)
    output           ColwiseParallel: vocabulary-parallel logits, DTensor Shard(-1) for `loss_parallel`

The DiT (`parallelize_dit`) keeps its tokens replicated over the tp ranks (its adaLN modulation and
embedders act on every token with replicated weights): Megatron TP without SP, Q/K/V and the
MLP's first layer column-parallel, the output projections row-parallel with an all-reduce.

Each tp rank's n_heads / tp query heads and n_kv_heads / tp K/V heads go through the sequence-
parallel strategy on its own sp group: attention itself is unchanged. The traffic torch's
collectives move is counted per kind by `TensorParallelTraffic` into the run's CommStats.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils._python_dispatch import TorchDispatchMode

from .comm import CommStats

__all__ = ["parallelize_decoder", "parallelize_dit", "parallelize_hf", "TensorParallelTraffic",
           "check_tensor_parallel", "check_decoder_chunkings", "HF_STYLES"]


def check_tensor_parallel(tp: int, n_heads: int, n_kv_heads: int, tokens_per_rank: int | None = None) -> None:
    """One-line errors for a tp degree the model cannot take (heads split over tp ranks, token shards
    for the sequence-parallel norms)."""
    if tp == 1:
        return
    if n_heads % tp or n_kv_heads % tp:
        raise ValueError(f"--tp {tp} must divide n_heads ({n_heads}) and n_kv_heads ({n_kv_heads}): each tensor-"
                         f"parallel rank holds whole heads")
    if tokens_per_rank is not None and tokens_per_rank % tp:
        raise ValueError(f"--tp {tp} must divide each sequence-parallel rank's {tokens_per_rank} tokens (the norms "
                         f"and residual stream are sharded over tp ranks by tokens): change --seq-len or --tp")


def check_decoder_chunkings(model) -> None:
    """The FPDT chunkings TP's sharding replaces are refused with tp > 1 (`model`: a ModelConfig or
    the trainer's [model] section, both carry these fields)."""
    if model.mlp_chunks > 1 or model.loss_chunks > 1 or model.chunked_blocks or model.offload_activations:
        raise ValueError("tensor parallelism shards the MLP and the LM head already: drop --mlp-chunks, "
                         "--loss-chunks, --chunked-blocks and --offload-activations with --tp > 1")


def _block_plan() -> dict:
    return {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                        desired_input_layouts=(Replicate(), None, None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "mlp_norm": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.w1": ColwiseParallel(),
        "mlp.w3": ColwiseParallel(),
        "mlp.w2": RowwiseParallel(output_layouts=Shard(1)),
    }


def parallelize_decoder(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard the built-in `Transformer` over `tp_mesh` in place (see the module doc); returns it.
    The model then takes this tp rank's full sequence shard ([batch, seq_local] tokens, identical on
    the tp ranks of one sp rank) and returns the same (loss_sum, count) on every tp rank."""
    cfg = model.cfg
    check_tensor_parallel(tp_mesh.size(), cfg.n_heads, cfg.n_kv_heads)
    check_decoder_chunkings(cfg)
    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    }  # a pipeline stage's pruned model (seqpar.pipeline) holds None for the parts of other stages
    parallelize_module(model, tp_mesh, {name: style for name, style in plan.items()
                                        if getattr(model, name) is not None})
    for block in model.layers:
        if block is not None:
            parallelize_module(block, tp_mesh, _block_plan())
    model.tensor_parallel = True
    return model


def parallelize_dit(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard the DiT's blocks over `tp_mesh` in place (attention heads and MLP hidden units); the
    tokens, the embedders, the modulation and the final layer stay replicated over tp."""
    cfg = model.cfg
    check_tensor_parallel(tp_mesh.size(), cfg.n_heads, cfg.n_kv_heads or cfg.n_heads)
    for block in model.layers:
        parallelize_module(block, tp_mesh, {
            "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=Replicate()),
            "mlp.0": ColwiseParallel(), "mlp.2": RowwiseParallel(output_layouts=Replicate()),
        })
    model.tensor_parallel = True
    return model


#: transformers' tensor-parallel plan styles and torch's parallel styles that do the same
#: (replicated hidden states between layers: Megatron TP without sequence parallelism)
HF_STYLES = {
    "colwise": ColwiseParallel,
    "rowwise": RowwiseParallel,
    "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
    "rowwise_rep": RowwiseParallel,
    "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
}


def hf_tensor_parallel_plan(hf_model: nn.Module) -> dict:
    """The model's own transformers TP plan (the instance's `_tp_plan`, else config.base_model_tp_plan
    under the base model's prefix) in torch's parallel styles. Tied input and output embeddings stay
    replicated (sharding one Parameter two ways would untie it). A one-line error when the model has
    no plan or uses a style torch's API cannot express here."""
    name = type(hf_model).__name__
    plan = dict(getattr(hf_model, "_tp_plan", None) or {})
    if not any("layers" in key for key in plan):
        base = getattr(hf_model.config.get_text_config(), "base_model_tp_plan", None) or {}
        plan.update({f"{hf_model.base_model_prefix}.{key}": style for key, style in base.items()})
    if not any("layers" in key for key in plan):
        raise ValueError(f"--tp: {name} has no tensor-parallel plan in transformers (config.base_model_tp_plan); "
                         f"train it with --tp 1")
    embeddings, head = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    if head is not None and embeddings.weight is head.weight:
        plan = {key: style for key, style in plan.items() if style not in ("embedding_rowwise",)
                and hf_model.get_submodule(key.split("*")[0].rstrip(".")) not in (embeddings, head)}
    unknown = sorted({style for style in plan.values() if style not in HF_STYLES})
    if unknown:
        raise ValueError(f"--tp: {name}'s tensor-parallel plan uses {unknown}, which seqpar does not map to torch's "
                         f"parallel styles ({sorted(HF_STYLES)}); train it with --tp 1")
    return {key: HF_STYLES[style]() for key, style in plan.items()}


def parallelize_hf(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard an `HFCausalLM` over `tp_mesh` by its transformers TP plan, applied with torch's
    `parallelize_module` (heads and MLP columns split, output projections all-reduced, the LM head
    gathered); each tp rank's local heads reach seqpar's attention through transformers' own
    `view(..., -1, head_dim)`."""
    hf = model.hf_model
    text = hf.config.get_text_config()
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    check_tensor_parallel(tp_mesh.size(), text.num_attention_heads, kv_heads)
    parallelize_module(hf, tp_mesh, hf_tensor_parallel_plan(hf))
    return model


# -- traffic ----------------------------------------------------------------------------------------
def _group_size(name: str) -> int:
    return _resolve_process_group(name).size()


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _sent(op_name: str, args: tuple) -> tuple[str, int] | None:
    """(kind, bytes sent per rank) of one functional collective, the comm layer's conventions
    (seqpar.comm): all-gather (n-1) x shard, reduce-scatter (n-1) x output shard, all-reduce
    2 (n-1)/n x tensor."""
    x = args[0]
    if op_name == "all_gather_into_tensor":
        n = args[1]
        return "tp_all_gather", (n - 1) * _bytes(x)
    if op_name == "reduce_scatter_tensor":
        n = args[2]
        return "tp_reduce_scatter", (n - 1) * _bytes(x) // n
    if op_name == "all_reduce":
        n = _group_size(args[2])
        return "tp_all_reduce", 2 * (n - 1) * _bytes(x) // n
    if op_name == "all_to_all_single":
        n = _group_size(args[3])
        return "tp_all_to_all", (n - 1) * _bytes(x) // n
    return None


class TensorParallelTraffic(TorchDispatchMode):
    """Counts the functional collectives DTensor issues (forward and backward) into `stats`, by
    kind: tp_all_gather, tp_reduce_scatter, tp_all_reduce, tp_all_to_all. Use it around forward
    and backward (`with TensorParallelTraffic(stats):`)."""

    def __init__(self, stats: CommStats):
        super().__init__()
        self.stats = stats

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor desugar the op into local ops and collectives, seen here next
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        packet = func._overloadpacket
        if getattr(packet, "_qualified_op_name", "").startswith("_c10d_functional::"):
            counted = _sent(packet.__name__, args)
            if counted is not None:
                kind, nbytes = counted
                self.stats.record(kind, nbytes, nbytes)
        return func(*args, **(kwargs or {}))
