"""Per-rank checks of the model, data loader and training loop (run inside a ProcessWorld).

Each function runs on every rank of a real gloo world and returns plain data (rank 0's
full-sequence tensors are gathered with `ctx.unshard`), so a test compares an n-process
run with a 1-process run of the same function.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import seqpar
from seqpar.attention import get_strategy
from seqpar.data import SequenceLoader, shard_batch
from seqpar.model import IGNORE_INDEX, DiTBlock, ModelConfig, Transformer
from seqpar.parallel import ParallelDims, average_gradients
from seqpar.train import TrainConfig, Trainer, loss_and_backward, train

# (strategy, seqpar.init kwargs = TrainConfig overrides) on 4 processes: every strategy, causally balanced
STRATEGY_CASES = [
    ("ring", {"layout": "zigzag"}),
    ("ulysses", {}),
    ("usp", {"ulysses": 2, "layout": "zigzag"}),
    ("allgather", {"layout": "striped"}),
    ("wallfacer", {"team_size": 2, "layout": "zigzag"}),
    ("lss", {}),
    ("fpdt", {"chunks": 2}),
]
TINY_MODEL = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)


def grad_mode(strategy: str) -> str:
    """Gradient averaging the trainer uses: LSS's double averaging, flat otherwise."""
    return "double" if get_strategy(strategy).double_grad_averaging else "flat"


def transformer_step(strategy: str, init_kwargs: dict[str, Any] | None = None, *, model: dict | None = None,
                     batch: int = 2, seq_len: int = 64, dp: int = 1, seed: int = 0) -> dict[str, Any]:
    """One forward/backward of the Transformer on a global batch of dp * batch random sequences,
    ~30% of labels ignored (so ranks count different numbers of tokens).

    Returns rank 0's view: the global mean loss, logits of its dp rank's samples
    [batch, seq_len, vocab] in global order, and every parameter's averaged gradient; and this
    rank's own share of the loss before the all-reduce: `local_loss_sum` and `local_count`
    (labelled tokens in its shard), which differ between ranks and add up to the global.
    """
    mesh = ParallelDims(dist.get_world_size() // dp)
    ctx = seqpar.init(strategy, group=mesh.sp_group, stats=mesh.stats, **(init_kwargs or {}))
    cfg = ModelConfig(**{**TINY_MODEL, **(model or {})})
    torch.manual_seed(seed)
    net = Transformer(cfg, ctx).double()
    gen = torch.Generator().manual_seed(seed + 1)
    windows = torch.randint(0, cfg.vocab_size, (dp * batch, seq_len + 1), generator=gen)
    ignored = torch.rand(dp * batch, seq_len, generator=gen) < 0.3  # uneven token counts per rank
    rows = slice(mesh.dp_rank * batch, (mesh.dp_rank + 1) * batch)
    tokens, labels, positions = shard_batch(ctx, windows[rows])
    labels = labels.masked_fill(ctx.shard(ignored[rows]), IGNORE_INDEX)
    loss = loss_and_backward(net, tokens, labels, positions, mesh.batch_comm)
    average_gradients(net.parameters(), mesh, mode=grad_mode(strategy))
    with torch.no_grad():
        logits = ctx.unshard(net(tokens, positions))
        local_sum, local_count = net(tokens, positions, labels)
    return {"loss": loss, "logits": logits, "grads": {n: p.grad.clone() for n, p in net.named_parameters()},
            "dp_rank": mesh.dp_rank, "local_loss_sum": float(local_sum), "local_count": int(local_count)}


def dit_step(strategy: str, init_kwargs: dict[str, Any] | None = None, *, batch: int = 2, seq: int = 32,
             dim: int = 32, heads: int = 4, seed: int = 0) -> dict[str, Any]:
    """Forward/backward of one DiTBlock on sharded patch tokens: out, dx, dc and parameter grads
    of the loss sum(out * w) over the full sequence (partial grads summed over ranks)."""
    ctx = seqpar.init(strategy, **(init_kwargs or {}))
    torch.manual_seed(seed)
    block = DiTBlock(dim, heads, ctx).double()
    with torch.no_grad():  # adaLN-Zero starts as the identity: randomise it so every path counts
        nn.init.normal_(block.adaLN_modulation[1].weight, std=0.3)
        nn.init.normal_(block.adaLN_modulation[1].bias, std=0.3)
    gen = torch.Generator().manual_seed(seed + 1)
    x, w = (torch.randn(batch, seq, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    c = torch.randn(batch, dim, generator=gen, dtype=torch.float64).requires_grad_()
    x_local = ctx.shard(x).requires_grad_()
    out = block(x_local, c)
    (out * ctx.shard(w)).sum().backward()
    summed = lambda t: ctx.comm.all_reduce(t.clone())  # noqa: E731 - sum of per-rank partial grads
    return {"out": ctx.unshard(out.detach()), "dx": ctx.unshard(x_local.grad), "dc": summed(c.grad),
            "grads": {n: summed(p.grad) for n, p in block.named_parameters()}}


def loader_sharding(strategy: str, init_kwargs: dict[str, Any] | None = None, *, seq_len: int = 48,
                    batch: int = 2, dp: int = 1, steps: int = 2) -> dict[str, Any]:
    """Shard loader windows over a token array whose value is its own index, so every token tells
    where it came from; returns consistency flags and the positions/offsets this rank used."""
    mesh = ParallelDims(dist.get_world_size() // dp)
    ctx = seqpar.init(strategy, group=mesh.sp_group, stats=mesh.stats, **(init_kwargs or {}))
    source = np.arange(10_000, dtype=np.int64)
    loader = SequenceLoader(source, seq_len, batch, vocab_size=len(source), dp=mesh.dp, dp_rank=mesh.dp_rank,
                            seed=7)
    ok = {"tokens": True, "labels": True, "roundtrip": True}
    offsets = []
    for step in range(steps):
        mine = loader.global_offsets(step)[mesh.dp_rank * batch:(mesh.dp_rank + 1) * batch]
        window = loader.next()
        tokens, labels, positions = shard_batch(ctx, window)
        expect = torch.from_numpy(mine)[:, None] + positions[None, :]
        ok["tokens"] &= bool(torch.equal(tokens, expect))
        ok["labels"] &= bool(torch.equal(labels, expect + 1))
        ok["roundtrip"] &= bool(torch.equal(ctx.unshard(tokens), window[:, :-1]))
        offsets.append(mine.tolist())
    return {**ok, "positions": positions.tolist(), "offsets": offsets, "dp_rank": mesh.dp_rank,
            "sp_rank": mesh.sp_rank, "loader_state": loader.state_dict()}


def _full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full gradient (FSDP's DTensor shards all-gathered: collective)."""
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = g.detach().cpu().clone()
    return grads


def _param_digest(model: nn.Module) -> str:
    """sha256 of this rank's local parameter bytes (replicas must agree bitwise across ranks)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        h.update(name.encode())
        h.update(local.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def first_step_gradients(cfg: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """Every parameter's gradient of the first training step, as the optimizer receives it:
    the real `Trainer.train_step` (forward, backward, gradient averaging or FSDP's
    reduce-scatter) with clipping off, captured by an optimizer step pre-hook.

    Full (unsharded) gradients on rank 0, None elsewhere. Uses its own out_dir subfolder and
    never resumes, so it can run next to `run_training(cfg)`.
    """
    trainer = Trainer(TrainConfig.of(**{**cfg, "grad_clip": 0.0, "resume": "", "checkpoint_every": 0,
                                     "out_dir": os.path.join(cfg["out_dir"], "first_step")}))
    captured: dict[str, torch.Tensor] = {}
    hook = trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: captured.update(
        _full_grads(trainer.model)))
    try:
        trainer.train_step()
    finally:
        hook.remove()
        if trainer.log is not None:
            trainer.log.close()
    if not captured:  # the trainer skipped the optimizer step (non-finite loss or gradient norm)
        raise RuntimeError("first_step_gradients: the first step took no optimizer step")
    if trainer.mesh.pp > 1:  # each stage holds its own parameters: gather every stage's names
        stages = [None] * trainer.mesh.pp
        dist.all_gather_object(stages, captured, group=trainer.mesh.pp_group)
        captured = {name: g for stage in stages for name, g in stage.items()}
    return captured if trainer.rank == 0 else None


def run_training(cfg: dict[str, Any], *, gradients: bool = False) -> dict[str, Any]:
    """Train(TrainConfig.of(**cfg)) on this world: losses and val losses (global means, the same on
    every rank), rank 0's metrics records (per-step loss, grad_norm, comm bytes, ...) and
    `param_digest`, a hash of this rank's parameters after training (bitwise the same on every
    rank unless FSDP shards them). gradients=True adds `first_step_grads`
    (`first_step_gradients(cfg)`, rank 0; None elsewhere)."""
    first = first_step_gradients(cfg) if gradients else None
    trainer = Trainer(TrainConfig.of(**cfg))
    result = trainer.run()
    return {"losses": result["losses"], "val_losses": result["val_losses"], "records": result["records"],
            "param_digest": _param_digest(trainer.model), "first_step_grads": first}


def training_error(cfg: dict[str, Any]) -> str:
    """The ValueError/FileNotFoundError message training raises on this rank ('' if it trains)."""
    try:
        train(TrainConfig.of(**cfg))
    except (ValueError, FileNotFoundError) as e:
        return f"{type(e).__name__}: {e}"
    return ""


def empty_batch_error() -> str:
    """backward_global_mean on a batch whose labels are all ignored: the error text."""
    from seqpar.comm import Comm, CommStats
    from seqpar.train.trainer import backward_global_mean
    w = torch.ones(2, requires_grad=True)
    try:
        backward_global_mean((w * 0).sum(), torch.tensor(0), Comm(None, CommStats()))
    except ValueError as e:
        return str(e)
    return ""


def step_overheads(cfg: dict[str, Any], steps: int = 6, warmup: int = 2) -> dict[str, float]:
    """Seconds per step of the trainer's pieces around forward/backward, on this rank, as
    `Trainer.run` calls them: the stop-signal agreement (one all-reduce), gradient averaging,
    the gradient norm (its host sync), the metrics record, and the whole step; medians over
    `steps` steps after `warmup`."""
    import statistics

    trainer = Trainer(TrainConfig.of(**cfg))
    timings: dict[str, list[float]] = {}

    def timed(name, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timings.setdefault(name, []).append(time.perf_counter() - t0)
        return run

    from seqpar.train import trainer as trainer_module
    for name in ("_agreed_stop_signal", "_sync_gradients", "_record"):
        setattr(trainer, name, timed(name, getattr(trainer, name)))
    clip = trainer_module.clip_gradients  # a module function the step calls (norm, its host sync, clip)
    trainer_module.clip_gradients = timed("_clip", clip)
    step = timed("step", trainer.train_step)
    unsynced = timed("step_unsynced", trainer.train_step)
    try:
        for _ in range(warmup + steps):
            trainer._agreed_stop_signal()
            step()
            if trainer.ddp:  # interleaved: the same step with DDP's all-reduce off (its exposed cost)
                trainer._agreed_stop_signal()
                with _ddp_sync_off(trainer.model):
                    unsynced()
    finally:
        trainer_module.clip_gradients = clip
    if trainer.log is not None:
        trainer.log.close()
    out = {name: statistics.median(values[-steps:]) for name, values in timings.items()}
    if trainer.ddp:  # DDP syncs inside backward: its cost is what a step with sync takes longer
        out["_sync_gradients"] = max(0.0, out["step"] - out.pop("step_unsynced"))
    return out


@contextlib.contextmanager
def _ddp_sync_off(model: nn.Module):
    """composable replicate's no_sync: this step's backward does not all-reduce."""
    from torch.distributed._composable import replicate
    state = replicate.state(model)
    state._no_sync = True
    try:
        yield
    finally:
        state._no_sync = False


def ddp_gradient_sync(cfg: dict[str, Any]) -> dict[str, Any]:
    """One training step: whether torch's DDP (composable replicate) synced the gradients, the
    all-reduce bytes and calls it recorded, and what a ring all-reduce of every gradient once
    sends (2 (n-1)/n x gradient bytes over the dp x sp ranks)."""
    from torch.distributed._composable import replicate
    trainer = Trainer(TrainConfig.of(**cfg))
    trainer.train_step()
    comm = trainer.mesh.stats.snapshot().get("grad_all_reduce", {"sent": 0, "calls": 0})
    n = trainer.mesh.batch_size
    grad_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    if trainer.log is not None:
        trainer.log.close()
    return {"ddp": replicate.state(trainer.model) is not None, "sent": comm["sent"], "calls": comm["calls"],
            "expected": 2 * (n - 1) * grad_bytes // n}


def checkpoint_write_failure(cfg: dict[str, Any], failing_rank: int) -> dict[str, Any]:
    """Train one step and checkpoint it, then make `failing_rank`'s next checkpoint write fail
    with ENOSPC (its RNG file, after DCP wrote the shards): every rank's error message and what
    is left in the checkpoint directory."""
    import errno

    from seqpar import checkpoint as ckpt_module
    trainer = Trainer(TrainConfig.of(**cfg))
    trainer.train_step()
    trainer.save()
    trainer.train_step()
    real_write = Path.write_bytes

    def full_disk(path, data):
        if path.name == f"rng_rank{failing_rank}.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, data)

    Path.write_bytes = full_disk
    try:
        trainer.save()
        message = ""
    except ckpt_module.CheckpointWriteError as e:
        message = str(e)
    finally:
        Path.write_bytes = real_write
        if trainer.log is not None:
            trainer.log.close()
    root = trainer.ckpt_root
    return {"message": message, "left": sorted(p.name for p in root.iterdir()),
            "latest": (root / "latest").read_text().strip()}
