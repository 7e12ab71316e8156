"""The training loop: `Trainer` (one rank's state and steps) and `train(cfg, group)`.

Loss normalisation: each rank computes the *sum* of its tokens' losses; one all-reduce
over the batch group (the dp x sp ranks holding different tokens; the tp ranks of one
sp rank hold the same tokens and the same, tensor-parallel, loss) gives the global token
count C, and each rank back-propagates sum_local * (dp x sp) / C. Gradient averaging over
the batch group (or sp then dp, or FSDP's reduce-scatter) then yields exactly the
gradient of the mean token loss of the global batch, i.e. what one process computes on
the whole batch. With --pp > 1 the step runs the rank's pipeline stage (seqpar.pipeline), which
applies the same normalisation inside torch's schedule.

Size: one rank's whole run (steps plain or pipelined, evaluation, checkpoints, signals, outputs).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import seqpar

from ..checkpoint import latest_checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
from ..comm import Comm
from ..metrics import (
    JsonlLog,
    ProgressBar,
    TensorBoardLog,
    machine_peak_tflops,
    mfu,
    peak_memory_mb,
    plot_loss_curve,
    read_jsonl,
)
from ..parallel import ParallelDims, average_gradients, reduce_partial_gradients
from ..pipeline import Pipeline
from ..plan import Calibration
from . import control
from .config import TrainConfig
from .parallelize import clip_gradients, parallelize, tensor_parallel_context, uses_ddp
from .tasks import build_task

__all__ = ["Trainer", "train", "lr_at", "loss_and_backward", "backward_global_mean", "NonFiniteError"]


class NonFiniteError(ValueError):
    """Training produced a non-finite loss, gradient norm or state; the message is one line."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to min_lr at `steps` (step is 0-based)."""
    if step < cfg.optim.warmup:
        return cfg.optim.lr * (step + 1) / cfg.optim.warmup
    progress = min(1.0, (step - cfg.optim.warmup) / max(1, cfg.optim.steps - cfg.optim.warmup))
    return cfg.optim.min_lr + 0.5 * (cfg.optim.lr - cfg.optim.min_lr) * (1 + math.cos(math.pi * progress))


def loss_and_backward(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
                      positions: torch.Tensor, world: Comm, autocast=contextlib.nullcontext,
                      cu_seqlens=None) -> float:
    """Forward + backward of this rank's shard with the global-mean normalisation (see module doc);
    cu_seqlens (packed documents) reach every layer.

    Returns the global mean token loss of the batch (identical on every rank).
    """
    extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    with autocast():
        loss_sum, count = model(tokens, positions, labels, **extra)
    return backward_global_mean(loss_sum, count, world)


def backward_global_mean(loss_sum: torch.Tensor, count: torch.Tensor, world: Comm) -> float:
    """Back-propagate this rank's share of the global mean: one all-reduce of (sum, count) over
    the world, then backward of loss_sum * world / global_count (see the module docstring).
    Returns the global mean (identical on every rank)."""
    totals = torch.stack([loss_sum.detach().double(), count.double()])
    world.all_reduce(totals, kind="loss_all_reduce")
    (loss_sum * (world.size / totals[1]).to(loss_sum.dtype)).backward()  # no host sync before backward
    count_global, mean = totals.tolist()[1], (totals[0] / totals[1]).item()
    if count_global <= 0:
        raise ValueError("the batch has no labelled tokens (all labels are ignore_index)")
    return mean


def _device_for(group: dist.ProcessGroup | None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (nanoGPT convention)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=1e-8)


class Trainer:
    """One rank's training state: mesh, context, model, optimizer, loaders, logs."""

    def __init__(self, cfg: TrainConfig, group: dist.ProcessGroup | None = None):
        world = dist.get_world_size(group)
        cfg.validate(world)
        self.cfg, self.group = cfg, group
        self.rank = dist.get_rank(group)
        self.device = _device_for(group)
        self.mesh = ParallelDims(cfg.sp_size(world), group, tp=cfg.parallel.tp, device_type=self.device.type,
                                 pp=cfg.parallel.pp)
        self.settings = cfg.strategy_settings(world)
        self.ctx = seqpar.init(cfg.parallel.strategy, group=self.mesh.sp_group, stats=self.mesh.stats,
                               kernel=cfg.parallel.kernel, **self.settings.init_kwargs())
        self.task = build_task(cfg, self.ctx, self.mesh.dp, self.mesh.dp_rank, self.device)
        self.model = self.task.model
        self.num_params = sum(p.numel() for p in self.model.parameters())  # the whole model (before a split)
        par = cfg.parallel  # with --pp > 1: this rank's stage (the model pruned in place) and schedule
        self.pipeline = Pipeline(self.model, self.mesh, par.pp_schedule, par.microbatches, self.device) \
            if par.pp > 1 else None
        self.ddp = uses_ddp(self.mesh, par.fsdp, self.ctx.strategy.double_grad_averaging) and self.pipeline is None
        parallelize(self.model, self.mesh, cfg.parallel.fsdp, cfg.parallel.compile_backend if cfg.parallel.compile
                    else None, ddp=self.ddp, root=self.pipeline.module if self.pipeline is not None else None)
        self.optimizer = _optimizer(self.model, cfg)
        self.out_dir = Path(cfg.output.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.step = 0
        if cfg.output.resume:
            self._resume()
        self.peak_tflops, self.peak_source = self._peak_tflops()
        self.log = JsonlLog(self.out_dir / "metrics.jsonl", keep_until_step=self.step if cfg.output.resume else None) \
            if self.rank == 0 else None
        self.board = TensorBoardLog(self.out_dir / "tensorboard", purge_step=self.step + 1 if cfg.output.resume
                                    else None) if self.rank == 0 and cfg.output.tensorboard else None

    def _peak_tflops(self) -> tuple[float, str]:
        """Peak TFLOP/s of the machines this run occupies, MFU's denominator: per machine
        --peak-tflops; else the calibration's matmul rate with every rank computing, times its
        ranks per node (--calibration or <out_dir>/calibration.json); else `machine_peak_tflops`
        (CPU: measured once with all cores and cached per machine; GPU: the table, per device).
        Times the machines (world / local ranks; GPUs: every rank is a device). The same for
        any number of processes on a machine, so MFU ratios are tokens/s ratios."""
        per_machine, source = self._machine_peak()
        world = self.mesh.size
        machines = world if self.device.type == "cuda" else max(1, world // int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                                               world)))
        self.peak_machine_tflops, self.machines = per_machine, machines
        return per_machine * machines, source

    def _machine_peak(self) -> tuple[float, str]:
        cfg = self.cfg
        if cfg.output.peak_tflops:
            return cfg.output.peak_tflops, "--peak-tflops"
        path = cfg.calibration_path()
        if path.is_file():
            with contextlib.suppress(ValueError, KeyError):
                cal = Calibration.load(path)
                return cal.peak_flops_per_process(cfg.optim.dtype) * cal.ranks_per_node / 1e12, f"calibration {path}"
        if self.device.type == "cuda":
            return machine_peak_tflops(self.device, cfg.optim.torch_dtype)
        found = [None]
        if self.rank == 0:  # one process measures (all cores) while the others wait; then all read the value
            found = [machine_peak_tflops(self.device, cfg.optim.torch_dtype)]
        dist.broadcast_object_list(found, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                                   group=self.group)
        return found[0]

    def _autocast(self):
        if self.cfg.optim.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- steps ---------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """One optimizer step on the next global batch; returns its metrics record."""
        cfg, step = self.cfg, self.step
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.mesh.stats.reset()
        t0 = time.perf_counter()
        batch = self.task.batch("train", self.task.step)  # prefetched: waits only when the loader fell behind
        data_wait = time.perf_counter() - t0
        self.task.advance()
        with tensor_parallel_context(self.mesh):
            if self.pipeline is not None:  # the schedule runs forward and backward: both under autocast
                with self._autocast():
                    loss = self.pipeline.train_step(*batch)
            else:
                with self._autocast():
                    loss_sum, count = self.task.loss_terms(batch)
                loss = backward_global_mean(loss_sum, count, self.mesh.batch_comm)
        self._sync_gradients()
        grad_norm = clip_gradients(self.model.parameters(), self.cfg.optim.grad_clip, self.mesh.pp_group)
        # the loss is all-reduced and the norm is of the averaged (or FSDP-global) gradient, so every
        # rank sees the same values and takes the same decision without another collective
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.step += 1
        record = self._record(loss, lr, grad_norm, seconds, self.task.flops_per_token(batch), skipped=not finite)
        record["data_wait_s"] = data_wait
        self._nonfinite_skips = 0 if finite else getattr(self, "_nonfinite_skips", 0) + 1
        if not finite and (cfg.faults.nonfinite == "stop" or self._nonfinite_skips > cfg.faults.max_skips):
            if self.log is not None:  # the failing step is logged (loss / grad_norm null) before stopping
                self.log.write(record)
            raise NonFiniteError(self._nonfinite_message(loss, grad_norm))
        return record

    def _nonfinite_message(self, loss: float, grad_norm: float) -> str:
        cfg = self.cfg
        why = (f"{self._nonfinite_skips} consecutive non-finite steps (--nonfinite skip tolerates --max-skips "
               f"{cfg.faults.max_skips})" if cfg.faults.nonfinite == "skip" else "--nonfinite stop")
        last = latest_checkpoint(self.ckpt_root)
        where = (f"the last checkpoint is {str(last)!r} (resume with --resume {last}, perhaps with a lower --lr)"
                 if last else "no checkpoint was written")
        return (f"non-finite training at step {self.step}: loss {loss:.6g}, grad norm {grad_norm:.6g}; {why}: "
                f"stopped before the optimizer update, no checkpoint written for it; {where}")

    def _sync_gradients(self) -> None:
        if self.cfg.parallel.fsdp:  # FSDP reduce-scatters (averages) inside backward; count its bytes (estimate)
            n = self.mesh.batch_size  # each tp rank's shard of the parameters, over its dp x sp ranks
            pbytes = self.num_params * next(self.model.parameters()).element_size() // self.mesh.tp
            vol = pbytes * (n - 1) // n
            self.mesh.stats.record("fsdp_all_gather_est", 2 * vol, 2 * vol)  # forward + backward re-gather
            self.mesh.stats.record("fsdp_reduce_scatter_est", vol, vol)
            reduce_partial_gradients(self.model.parameters(), self.mesh.stats)
            return
        if self.ddp:  # DDP averaged the gradients inside backward (and counted its bytes)
            return
        mode = "double" if self.ctx.strategy.double_grad_averaging else "flat"  # LSS: sp, then dp
        average_gradients(self.model.parameters(), self.mesh, mode=mode)

    def _record(self, loss: float, lr: float, grad_norm: float, seconds: float, flops_per_token: float,
                skipped: bool = False) -> dict[str, Any]:
        tokens = self.mesh.dp * self.task.tokens_per_batch
        comm = self.mesh.stats.snapshot()
        return {"type": "train", "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "skipped": skipped, "step_time_s": seconds, "tokens_per_s": tokens / seconds,
                "mfu": mfu(flops_per_token, tokens, seconds, self.peak_tflops),
                "peak_mem_mb": peak_memory_mb(self.device), "comm_bytes": comm["total"]["sent"],
                "comm": {k: v["sent"] for k, v in comm.items() if k != "total"}}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over `eval_batches` fixed validation batches (same on every rank)."""
        totals = torch.zeros(2, dtype=torch.float64)
        for i in range(self.cfg.output.eval_batches):
            with tensor_parallel_context(self.mesh), self._autocast():  # pipeline: zeros but on the last stage
                loss_sum, count = (self.pipeline or self.task).loss_terms(self.task.batch("val", i))
            totals += torch.stack([loss_sum.double().cpu(), count.double().cpu()])
        totals = totals.to(self.device)
        self.mesh.batch_comm.all_reduce(totals, kind="loss_all_reduce")
        return self.pipeline.share(totals) if self.pipeline is not None else (totals[0] / totals[1]).item()

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self) -> Path:
        self._check_finite_state()
        meta = {"loader": self.task.loader_state(), "model": self.task.shape(), "config": self.cfg.to_dict()}
        return save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, meta, self.group,
                               keep=self.cfg.output.keep_checkpoints)

    def _check_finite_state(self) -> None:
        """Refuse (on every rank) to checkpoint non-finite weights or optimizer state: a MAX all-reduce
        of a local flag, as FSDP ranks hold different shards."""
        tensors = [*self.model.parameters()]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        bad = any(not torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all() for t in tensors
                  if t.is_floating_point())
        flag = torch.tensor([float(bad)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if flag.item():
            last = latest_checkpoint(self.ckpt_root)
            raise NonFiniteError(f"non-finite weights or optimizer state at step {self.step}: not writing a "
                                 "checkpoint; " + (f"the last checkpoint is {str(last)!r} (resume with --resume "
                                                   f"{last})" if last else "no checkpoint was written"))

    def _resume(self) -> None:
        path = resolve_checkpoint(self.cfg.output.resume, self.ckpt_root)  # sizes only; load_checkpoint hashes
        meta = load_checkpoint(path, self.model, self.optimizer, self.group)
        wanted = self.task.shape()
        saved = {k: meta.get("model", {}).get(k) for k in wanted}
        if saved != wanted:
            raise ValueError(f"checkpoint {str(path)!r} holds a model of shape {saved}, this run has {wanted}")
        self.task.load_loader_state(meta["loader"])
        self.step = int(meta["step"])
        if self.step != self.task.step:
            raise ValueError(f"checkpoint {str(path)!r} is inconsistent: step {self.step} vs loader step "
                             f"{self.task.step}")

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to cfg.optim.steps; returns {"losses", "val_losses", "records"} (records on rank 0 only)."""
        cfg = self.cfg
        bar = ProgressBar(cfg.optim.steps) if self.rank == 0 and cfg.output.progress else None
        losses, val_losses, records = [], [], []
        if self.rank == 0:
            self._write_config()
        first_step, saved = self.step, (None, None)  # (step, path) of the newest checkpoint saved here
        self._run_t0 = time.perf_counter()
        try:
            self._loop(bar, first_step, saved, losses, val_losses, records)
        finally:
            self.task.close()
            if self.board is not None:
                self.board.close()
        if bar:
            bar.close()
        self._finish()
        return {"losses": losses, "val_losses": val_losses, "records": records}

    def _loop(self, bar: ProgressBar | None, first_step: int, saved: tuple, losses: list, val_losses: list,
              records: list) -> None:
        cfg = self.cfg
        while self.step < cfg.optim.steps:
            signum = self._agreed_stop_signal()
            if signum:
                self._stop(signum, first_step, saved, bar)
            record = self.train_step()
            control.report_step(self.step)
            losses.append(record["loss"])
            self._emit(record, records)
            last = self.step == cfg.optim.steps
            if (cfg.output.eval_every and self.step % cfg.output.eval_every == 0) or last:
                val = self.evaluate()
                val_losses.append((self.step, val))
                self._emit({"type": "val", "step": self.step, "val_loss": val}, records)
            if cfg.output.checkpoint_every and (self.step % cfg.output.checkpoint_every == 0 or last):
                saved = (self.step, self.save())
            if bar and (self.step % cfg.output.log_every == 0 or last):
                bar.update(self.step, f"loss {record['loss']:.3f}  {record['tokens_per_s']:,.0f} tok/s  "
                                      f"mfu {100 * record['mfu']:.1f}%  " + (f"val {val_losses[-1][1]:.3f}"
                                                                          if val_losses else ""))

    def _agreed_stop_signal(self) -> int:
        """The stop signal any rank received (SIGTERM over SIGINT), 0 if none: one tiny MAX all-reduce,
        so every rank stops after the same step."""
        flag = torch.tensor([float(control.stop_signal())], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())

    def _stop(self, signum: int, first_step: int, saved: tuple, bar: ProgressBar | None) -> None:
        """Stop on a signal at this step boundary: SIGTERM saves a checkpoint first (collectively)."""
        checkpoint, reason = None, ""
        if signum != signal.SIGTERM:
            reason = f"{control.signal_name(signum)} stops without saving; send SIGTERM to checkpoint first"
        elif not self.cfg.output.checkpoint_every:
            reason = "checkpoints are off (--checkpoint-every 0)"
        elif self.step == first_step:
            reason = "no step completed since the start"
        else:
            checkpoint = str(saved[1] if saved[0] == self.step else self.save())
        if bar:
            bar.close()
        if self.log is not None:
            self.log.close()
        raise control.TrainingStopped(signum, self.step, checkpoint, reason)

    def _emit(self, record: dict[str, Any], records: list) -> None:
        if self.log is not None:
            self.log.write(record)
            records.append(record)
        if self.board is not None:
            self.board.write(record)

    def _write_config(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        info = {"config": self.cfg.to_dict(), "num_params": self.num_params, "world_size": self.mesh.size,
                "packed_documents": self.task.packed, "peak_tflops": self.peak_tflops, "peak_source": self.peak_source,
                "peak_machine_tflops": self.peak_machine_tflops, "machines": self.machines,
                "context": self.ctx.describe(), "torch": torch.__version__}
        (self.out_dir / "config.json").write_text(json.dumps(info, indent=1, default=str))

    def _task_outputs(self) -> list[Path]:
        """The task's end-of-run outputs (collective: every rank), with a progress bar and "outputs"
        events in the log on rank 0 (one per sampler forward, then the seconds and their share of the run)."""
        bar = ProgressBar(1) if self.log is not None and self.cfg.output.progress else None
        t0 = time.perf_counter()

        def progress(done: int, total: int) -> None:
            if self.log is not None:
                self.log.write({"type": "outputs", "step": self.step, "done": done, "total": total,
                                "seconds": time.perf_counter() - t0})
            if bar is not None:
                bar.total = total
                bar.update(done, "sampling")

        outputs = self.task.finish(self.out_dir, write=self.log is not None, progress=progress)
        seconds = time.perf_counter() - t0
        if bar is not None and outputs:
            bar.close()
        if self.log is not None and outputs:
            run_s = time.perf_counter() - getattr(self, "_run_t0", t0)
            self.log.write({"type": "outputs", "step": self.step, "seconds": seconds,
                            "share_of_run": seconds / max(run_s, 1e-9), "files": [str(p) for p in outputs]})
        return outputs

    def _finish(self) -> None:
        outputs = self._task_outputs()
        if self.log is None:
            return
        self.log.close()
        if self.cfg.output.plot:
            title = (f"{self.cfg.parallel.strategy} sp={self.mesh.sp} dp={self.mesh.dp} tp={self.mesh.tp} "
                     f"({self.num_params / 1e6:.2f}M params)")
            plot_loss_curve(read_jsonl(self.log.path), self.out_dir / "loss.png", title, self.task.loss_label)
        if self.cfg.output.progress:
            out = self.cfg.output
            print(f"seqpar train: done; log {self.log.path}" + (f", plot {self.out_dir / 'loss.png'}" if out.plot
                  else "") + "".join(f", {p.stem} {p}" for p in outputs)
                  + (f", checkpoints {self.ckpt_root}" if out.checkpoint_every else ""), file=sys.stderr)


def train(cfg: TrainConfig, group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Run training on an initialised process group (default WORLD); collective over `group`."""
    return Trainer(cfg, group).run()

