"""Pipeline parallelism of the built-in decoder on torch's own API (`torch.distributed.pipelining`).

The model is built whole on every rank (same seed: the same weights as one process), then
`split_transformer` deletes what a stage does not own, torchtitan's manual split: the blocks of
other stages become None (`model.layers[i] = None`, so the remaining parameters keep their full
names, `layers.3.attention.wq.weight`: DCP checkpoints are layout-free), the embedding stays on
the first stage only, the final norm and LM head on the last.

`Pipeline` runs one stage with a torch schedule (`ScheduleGPipe`, `Schedule1F1B`) over the
pipeline group; inside a stage the blocks' attention runs the sequence-parallel strategy on
the stage's own sp group, unchanged. Stage inputs are [microbatch, seq_local] tokens (first
stage) or [microbatch, seq_local, dim] activations; the rope positions and packed-document
boundaries of each microbatch reach every stage by attribute (set per step, indexed by the
schedule's microbatch id), never through the pipeline. The last stage's loss function returns
each microbatch's loss SUM times (dp x sp) / global label count, so the gradients are those of
the global token mean whatever the microbatching (see train/trainer.py).

`ScheduleInterleaved1F1B` (--pp-schedule interleaved-1f1b) gives every rank 2 virtual stages,
loop style (rank r runs stages r and r + pp, so the blocks go 0..pp-1 and back to rank 0): it runs
on gloo in torch 2.13 (its batched P2P included), exact like the others.

With tensor parallelism a stage sends its tp rank's token shard (see `StageModule`); with FSDP2
the `StageModule` is the root FSDP module (its forward runs the model's parts).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from .comm import CommStats
from .model import IGNORE_INDEX, Transformer
from .parallel import ParallelDims

__all__ = ["PP_SCHEDULES", "VIRTUAL_STAGES", "rank_stages", "stage_layers", "split_transformer", "StageModule",
           "CountingStage", "Pipeline", "check_pipeline", "pipeline_p2p_bytes"]

#: --pp-schedule names -> torch schedule classes
PP_SCHEDULES: dict[str, Any] = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
                                "interleaved-1f1b": ScheduleInterleaved1F1B}
#: stages per rank of each schedule (interleaved: 2 virtual stages, loop style)
VIRTUAL_STAGES = {"gpipe": 1, "1f1b": 1, "interleaved-1f1b": 2}


def check_pipeline(pp: int, n_layers: int, batch: int, microbatches: int, schedule: str) -> None:
    """Every pipeline constraint, one-line ValueErrors naming the flag to change."""
    if pp < 1 or microbatches < 1:
        raise ValueError(f"--pp ({pp}) and --microbatches ({microbatches}) must be >= 1")
    if schedule not in PP_SCHEDULES:
        raise ValueError(f"unknown --pp-schedule {schedule!r}; choose from {sorted(PP_SCHEDULES)}")
    if schedule == "1f1b" and microbatches < pp:
        raise ValueError(f"--pp-schedule 1f1b needs --microbatches >= --pp ({pp}), got {microbatches}: raise "
                         "--microbatches or use gpipe")
    rounds = max(1, microbatches // pp)
    if schedule == "interleaved-1f1b" and microbatches % rounds:
        raise ValueError(f"--pp-schedule interleaved-1f1b runs --microbatches in rounds of --pp ({pp}): "
                         f"{microbatches} is not a multiple of {rounds} rounds; use a multiple of --pp")
    stages = pp * VIRTUAL_STAGES[schedule]
    if n_layers % stages:
        raise ValueError(f"n_layers ({n_layers}) must be divisible by the {stages} pipeline stages (--pp {pp}"
                         f"{' x 2 virtual stages of interleaved-1f1b' if stages > pp else ''}): each stage owns as "
                         f"many blocks")
    if batch % microbatches:
        raise ValueError(f"--batch ({batch}) must be divisible by --microbatches ({microbatches})")


def stage_layers(n_layers: int, stage: int, stages: int) -> range:
    """The block indices stage `stage` of `stages` owns (contiguous, equal counts)."""
    per = n_layers // stages
    return range(stage * per, (stage + 1) * per)


def rank_stages(pp_rank: int, pp: int, virtual: int) -> list[int]:
    """The stage indices a pipeline rank runs, loop style: pp_rank, pp_rank + pp, ... (`virtual` of them)."""
    return [pp_rank + k * pp for k in range(virtual)]


def split_transformer(model: Transformer, stage: int | list[int], stages: int) -> Transformer:
    """Delete, in place, what the stage(s) `stage` of `stages` do not own: other stages' blocks
    (set to None, so names stay global), the embedding unless stage 0 is owned, the final norm
    and LM head unless the last stage is."""
    owned = [stage] if isinstance(stage, int) else list(stage)
    own = {i for s in owned for i in stage_layers(len(model.layers), s, stages)}
    for i in range(len(model.layers)):
        if i not in own:
            model.layers[i] = None
    if 0 not in owned:
        model.tok_embeddings = None
    if stages - 1 not in owned:
        model.norm = None
        model.output = None
    return model


class StageModule(nn.Module):
    """What `PipelineStage` runs: the pruned model's part, one microbatch at a time.

    forward(x): x tokens [microbatch, seq_local] (first stage) or activations [microbatch,
    seq_local, dim] -> activations [microbatch, seq_local, dim] (normed on the last stage).
    `extras[chunk]` = (positions, cu_seqlens) of microbatch `chunk` (set per step);
    `chunk` is set by `CountingStage` before each forward.

    With tensor parallelism (the model parallelized by `parallelize_decoder`) the residual stream
    between blocks is already this tp rank's plain token shard [microbatch, seq_local / tp, dim]
    (Megatron-SP: the blocks' row-parallel outputs are reduce-scattered over tokens and returned
    as local tensors): a stage sends it as it is to the same tp rank of the next stage (the
    pipeline group pairs ranks of equal (dp, sp, tp) coordinates). The last stage's final norm
    returns a DTensor: its local shard is what the loss function gets (the LM head's
    ColwiseParallel takes it back as Shard(1))."""

    def __init__(self, model: Transformer, layers: range | None = None, first: bool = True, last: bool = True):
        super().__init__()
        self.model, self.layers, self.first, self.last = model, layers, first, last
        self.extras: list[tuple[Tensor, Any]] = []
        self.chunk = 0

    def forward(self, x: Tensor) -> Tensor:
        positions, cu_seqlens = self.extras[self.chunk]
        m = self.model
        if self.first and m.tok_embeddings is not None:
            x = m.tok_embeddings(x)
        x = m.run_layers(x, positions, cu_seqlens, only=self.layers)
        if self.last and m.norm is not None:
            x = m.norm(x)
        return x.to_local() if isinstance(x, DTensor) else x


def _nbytes(ops: list[dist.P2POp]) -> int:
    return sum(op.tensor.numel() * op.tensor.element_size() for op in ops)


class CountingStage(PipelineStage):
    """torch's PipelineStage that tells its module the microbatch id and counts its P2P bytes
    (activations forward, their gradients backward) into `stats` as kind "pp_p2p"."""

    def __init__(self, *args, stats: CommStats, **kwargs):
        super().__init__(*args, **kwargs)
        self.stats = stats

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        self.submod.chunk = fwd_chunk_id
        return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    def _count(self, ops: list[dist.P2POp], sent: bool) -> list[dist.P2POp]:
        if ops:
            n = _nbytes(ops)
            self.stats.record("pp_p2p", n if sent else 0, 0 if sent else n)
        return ops

    def get_fwd_send_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        return self._count(super().get_fwd_send_ops(fwd_chunk_id), True)

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        return self._count(super().get_bwd_send_ops(bwd_chunk_id), True)

    def get_fwd_recv_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        return self._count(super().get_fwd_recv_ops(fwd_chunk_id), False)

    def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        return self._count(super().get_bwd_recv_ops(bwd_chunk_id), False)


def pipeline_p2p_bytes(stage: int, stages: int, microbatch: int, seq_local: int, dim: int, element_size: int,
                       microbatches: int, virtual: int = 1) -> tuple[int, int]:
    """(sent, received) P2P bytes of one training step on pipeline rank `stage` of `stages` (with
    `virtual` stages per rank: `rank_stages`): one activation [microbatch, seq_local, dim] per
    microbatch forward to the next stage and its gradient back, for each stage the rank runs."""
    act = microbatch * seq_local * dim * element_size * microbatches
    total = stages * virtual
    links = sum((s < total - 1) + (s > 0) for s in rank_stages(stage, stages, virtual))
    return act * links, act * links


def _split_rows(value: Any, parts: int) -> list[Any]:
    """A batch-major value cut into `parts` row blocks as torch's schedules cut tensors
    (tensor_split over dim 0); a shared value ([seq_local] positions, one cu_seqlens) repeated."""
    if isinstance(value, (list, tuple)):
        per = len(value) // parts
        return [list(value[i * per:(i + 1) * per]) for i in range(parts)]
    if isinstance(value, Tensor) and value.dim() == 2:
        return list(value.tensor_split(parts, dim=0))
    return [value] * parts


class Pipeline:
    """One rank's pipeline stage(s) of a Transformer and its torch schedule.

    model: the full Transformer (pruned in place by `split_transformer` to the stages of this
    rank: `rank_stages(dims.pp_rank, ...)`, one unless the schedule is interleaved); the P2P runs
    over `dims.pp_group` (stage s on its rank s mod pp), its bytes are counted in `dims.stats`;
    loss sums are reduced over `dims.batch_comm` (the stage's dp x sp). `module` is the first of
    the rank's `StageModule`s (`modules`, one per stage)."""

    def __init__(self, model: Transformer, dims: ParallelDims, schedule: str, microbatches: int,
                 device: torch.device):
        rank, pp = dims.pp_rank, dims.pp
        self.virtual = VIRTUAL_STAGES[schedule]
        self.stage_ids, self.total = rank_stages(rank, pp, self.virtual), pp * self.virtual
        self.model = split_transformer(model, self.stage_ids, self.total)
        self.stage, self.stages, self.group, self.microbatches = rank, pp, dims.pp_group, microbatches
        self.first, self.last = rank == 0, rank == pp - 1  # this rank feeds the tokens / computes the loss
        self.tp = dims.tp
        self.modules = [StageModule(model, stage_layers(len(model.layers), s, self.total), s == 0,
                                    s == self.total - 1) for s in self.stage_ids]
        self.module = self.modules[0]
        self.stats, self.device, self.batch_comm = dims.stats, device, dims.batch_comm
        self.schedule_cls = PP_SCHEDULES[schedule]
        self.scale = torch.ones((), dtype=torch.float64)
        self._shape: tuple | None = None
        self._schedule = None

    def _build(self, tokens: Tensor, dtype: torch.dtype) -> None:
        """The stage(s) and schedule for microbatches of this shape (static metadata: no shape
        handshake over the group); rebuilt when the shape changes."""
        mb = tokens.shape[0] // self.microbatches
        shape = (mb, tokens.shape[1] // self.tp, self.model.cfg.dim)  # this tp rank's token shard
        if self._shape == (shape, dtype):
            return
        act = torch.empty(shape, dtype=dtype, device="meta", requires_grad=True)  # gradients flow back
        stages = [CountingStage(module, s, self.total, self.device, output_args=(act,), group=self.group,
                                stats=self.stats,
                                input_args=(torch.empty(shape[:2], dtype=torch.long, device="meta") if s == 0
                                            else act,))
                  for module, s in zip(self.modules, self.stage_ids)]
        self._schedule = self.schedule_cls(stages if self.virtual > 1 else stages[0], self.microbatches,
                                           loss_fn=self._loss, scale_grads=False)
        self._shape = (shape, dtype)

    def _loss(self, h: Tensor, labels: Tensor) -> Tensor:
        """A microbatch's loss sum x (dp x sp) / global label count (set per step)."""
        loss_sum = self.model._loss_sum(h, labels)
        return loss_sum * self.scale.to(loss_sum.dtype)

    def _set_extras(self, positions: Tensor, cu_seqlens: Any) -> None:
        extras = list(zip(_split_rows(positions, self.microbatches), _split_rows(cu_seqlens, self.microbatches)))
        for module in self.modules:
            module.extras = extras

    def train_step(self, tokens: Tensor, labels: Tensor, positions: Tensor, cu_seqlens: Any) -> float:
        """Forward and backward of every microbatch; returns the global mean token loss (every rank).

        The last stage counts the global labels first (one all-reduce over its batch group),
        so its loss function back-propagates sum x (dp x sp) / count; the mean is then reduced
        over the batch group and handed to the other stages over the pipeline group."""
        batch_comm = self.batch_comm
        self._build(tokens, next(self.model.parameters()).dtype)
        self._set_extras(positions, cu_seqlens)
        totals = torch.zeros(2, dtype=torch.float64, device=labels.device)
        if self.last:
            count = (labels != IGNORE_INDEX).sum().double().reshape(1)
            batch_comm.all_reduce(count, kind="loss_all_reduce")
            if count.item() <= 0:
                raise ValueError("the batch has no labelled tokens (all labels are ignore_index)")
            self.scale = batch_comm.size / count[0]
        losses: list[Tensor] = []
        if self.first:
            self._schedule.step(tokens)
        elif self.last:
            self._schedule.step(target=labels, losses=losses)
        else:
            self._schedule.step()
        if self.last:
            totals[0] = torch.stack([x.detach().double() for x in losses]).sum() / batch_comm.size
            batch_comm.all_reduce(totals, kind="loss_all_reduce")
            totals[1] = 1.0
        return self.share(totals)

    def share(self, totals: Tensor) -> float:
        """totals[0] / totals[1] of the last stage's (sum, count), zeros elsewhere, on every stage:
        a sum over the pipeline group."""
        dist.all_reduce(totals, group=self.group)
        self.stats.record("loss_all_reduce", totals.numel() * 8, totals.numel() * 8)
        return (totals[0] / totals[1]).item()

    @torch.no_grad()
    def loss_terms(self, batch: tuple) -> tuple[Tensor, Tensor]:
        """(loss sum, label count) of this rank's tokens (tokens, labels, positions, cu_seqlens) by a
        plain forward through the stages (blocking send/recv, whole batch): the values on the last
        stage, zeros elsewhere (a Task's loss_terms, for evaluation)."""
        tokens, labels, positions, cu_seqlens = batch
        dtype = next(self.model.parameters()).dtype
        peer = lambda s: dist.get_global_rank(self.group, s % self.stages)  # noqa: E731 - stage s's rank
        for module, s in zip(self.modules, self.stage_ids):
            module.extras, module.chunk = [(positions, cu_seqlens)], 0
            x = tokens
            if s > 0:
                x = torch.empty(tokens.shape[0], tokens.shape[1] // self.tp, self.model.cfg.dim, dtype=dtype,
                                device=tokens.device)
                dist.recv(x, src=peer(s - 1), group=self.group)
            h = module(x)
            if s < self.total - 1:
                dist.send(h.contiguous(), dst=peer(s + 1), group=self.group)
        if not self.last:
            zero = torch.zeros((), dtype=torch.float64, device=tokens.device)
            return zero, zero
        return self.model._loss_sum(h, labels), (labels != IGNORE_INDEX).sum()
