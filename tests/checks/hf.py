"""Hugging Face causal LMs through seqpar, run inside a ProcessWorld (see tests/test_hf.py).

Each function runs on every rank of a real gloo world with the trainer's own pieces
(`shard_batch`, `loss_and_backward`, `average_gradients`) and returns plain data; the test
compares rank 0's result with a stock single-process transformers model.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import seqpar
from seqpar.data import shard_batch
from seqpar.hf import PREFIX, load_hf_model
from seqpar.model import IGNORE_INDEX
from seqpar.parallel import ParallelDims, average_gradients
from seqpar.train import loss_and_backward

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def hf_step(model_dir: str, strategy: str, init_kwargs: dict[str, Any], window: torch.Tensor, ignored: torch.Tensor,
            cu: list[int] | None = None, dtype: str = "float64", mesh: ParallelDims | None = None,
            activation_checkpointing: bool = False) -> dict[str, Any]:
    """One trainer-style forward/backward of the model in `model_dir` on `window` [batch, seq + 1]
    (`ignored` [batch, seq]: labels set to -100; `cu`: packed-document boundaries).

    Returns the global mean loss, the full-sequence logits and (rank 0 only) every parameter's
    gradient by its HF name."""
    mesh = mesh or ParallelDims(dist.get_world_size())
    ctx = seqpar.init(strategy, group=mesh.sp_group, stats=mesh.stats, **init_kwargs)
    model = load_hf_model(model_dir, ctx, DTYPES[dtype], activation_checkpointing=activation_checkpointing)
    cu_t = None if cu is None else torch.tensor(cu)
    tokens, labels, positions = shard_batch(ctx, window, cu_seqlens=cu_t)
    labels = labels.masked_fill(ctx.shard(ignored, cu_seqlens=cu_t), IGNORE_INDEX)
    loss = loss_and_backward(lambda *a: model(*a, cu_seqlens=cu_t), tokens, labels, positions, mesh.batch_comm)
    average_gradients(model.parameters(), mesh, mode="flat")
    with torch.no_grad():
        logits = ctx.unshard(model(tokens, positions, cu_seqlens=cu_t), cu_seqlens=cu_t)
    grads = {n.removeprefix(PREFIX): p.grad for n, p in model.named_parameters()} if mesh.rank == 0 else None
    return {"loss": loss, "logits": logits if mesh.rank == 0 else None, "grads": grads}


def hf_steps(model_dir: str, cases: list[tuple[str, dict[str, Any]]], window: torch.Tensor, ignored: torch.Tensor,
             **kwargs: Any) -> list[dict[str, Any]]:
    """`hf_step` for each (strategy, init kwargs) case, in one world call."""
    mesh = ParallelDims(dist.get_world_size())
    return [hf_step(model_dir, strategy, kw, window, ignored, mesh=mesh, **kwargs) for strategy, kw in cases]


def hf_errors(cases: list[tuple[str, str, dict[str, Any]]], seq_len: int = 64) -> list[str]:
    """For each (model_dir, mode, forward options): the ValueError text of a forward on a random
    batch ('' when it ran). mode "train" (dropout active) / "eval", or "direct": the HF model
    called without the seqpar context."""
    ctx = seqpar.init("ring")
    out = []
    for model_dir, mode, options in cases:
        model = load_hf_model(model_dir, ctx, torch.float64)
        model.train(mode == "train")
        window = torch.randint(0, model.config.vocab_size, (2, seq_len + 1), generator=torch.Generator().manual_seed(0))
        cu = options.get("cu")
        cu_t = None if cu is None else torch.tensor(cu)
        tokens, labels, positions = shard_batch(ctx, window, cu_seqlens=cu_t)
        try:
            if mode == "direct":
                model.hf_model(input_ids=tokens, position_ids=positions.expand(2, -1), use_cache=False)
            else:
                model(tokens, positions, labels, cu_seqlens=cu_t)
            out.append("")
        except ValueError as e:
            out.append(str(e))
    return out


def hf_train_and_save(model_dir: str, root: str, strategy: str, init_kwargs: dict[str, Any], window: torch.Tensor,
                      fsdp: bool = True) -> dict[str, torch.Tensor] | None:
    """Two AdamW steps of the (FSDP-sharded, like the trainer) model, then `save_checkpoint`
    into `root`; returns rank 0's full trained weights by HF name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from seqpar.checkpoint import save_checkpoint

    mesh = ParallelDims(dist.get_world_size())
    ctx = seqpar.init(strategy, group=mesh.sp_group, stats=mesh.stats, **init_kwargs)
    model = load_hf_model(model_dir, ctx, torch.float32)
    if fsdp:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        dmesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")
        for block in model.layers:
            fully_shard(block, mesh=dmesh)
        fully_shard(model, mesh=dmesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens, labels, positions = shard_batch(ctx, window)
    for _ in range(2):
        opt.zero_grad()
        loss_and_backward(model, tokens, labels, positions, mesh.batch_comm)
        if not fsdp:
            average_gradients(model.parameters(), mesh, mode="flat")
        opt.step()
    save_checkpoint(root, 2, model, opt, {"model_dir": model_dir}, keep=1)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix(PREFIX): v.clone() for k, v in full.items()} if mesh.rank == 0 else None


def builtin_logits(run_dir: str, tokens: list[list[int]]) -> list:
    """Logits of a built-in-model run's newest checkpoint on `tokens` (1-process world)."""
    import json
    from pathlib import Path

    import seqpar
    from seqpar.export import load_builtin
    from seqpar.train import TrainConfig
    config = TrainConfig.from_tables(json.loads((Path(run_dir) / "config.json").read_text())["config"])
    model = load_builtin(Path(run_dir) / "checkpoints", config, seqpar.init("local"))
    t = torch.tensor(tokens)
    with torch.no_grad():
        return model(t, torch.arange(t.shape[1])).tolist()


def hybrid_model_errors(model_types: list[str]) -> list[str]:
    """For each transformers model type: the ValueError text of wrapping a tiny instance for this
    world's sequence-parallel group ('' when accepted)."""
    from transformers import AutoModelForCausalLM

    from checks.hf_sweep import tiny_config
    from seqpar.hf import HFCausalLM
    ctx, out = seqpar.init("ring"), []
    for model_type in model_types:
        hf = AutoModelForCausalLM.from_config(tiny_config(model_type))
        try:
            HFCausalLM(hf, ctx)
            out.append("")
        except ValueError as e:
            out.append(str(e))
    return out
