"""`seqpar train`: train a byte-level Llama-style model with sequence parallelism.

    seqpar train                                 # 4 local gloo processes, wallfacer, stdlib corpus
    seqpar train --config tiny --steps 50        # a packaged config (src/seqpar/configs/tiny.toml)
    seqpar train --strategy usp --ulysses 2 --layout zigzag --data enwik8
    torchrun --nproc-per-node 8 -m seqpar train --config my.toml   # cluster: NCCL on GPUs

Configuration: defaults < config file (TOML or YAML; flat keys or [model]/[data]/[optim]/
[parallel]/[output] tables) < command-line flags. `train(cfg, group)` is the training loop
on an already-initialised process group (what the launchers and the tests call).

Loss normalisation: each rank computes the *sum* of its tokens' losses; one all-reduce
gives the global token count C over all dp x sp ranks, and each rank back-propagates
sum_local * world / C. Gradient averaging over the world (or sp then dp, or FSDP's
reduce-scatter) then yields exactly the gradient of the mean token loss of the global
batch, i.e. what one process computes on the whole batch.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import seqpar

from .attention import STRATEGIES
from .checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from .comm import Comm
from .data import SequenceLoader, open_tokens, shard_batch, split_tokens, stdlib_corpus
from .layout import LAYOUTS
from .metrics import (JsonlLog, ProgressBar, default_peak_tflops, peak_memory_mb, plot_loss_curve, read_jsonl,
                      training_flops_per_token)
from .model import ModelConfig, Transformer
from .parallel import ParallelMesh, average_gradients

__all__ = ["TrainConfig", "Trainer", "train", "load_config", "build_config", "add_arguments", "main",
           "loss_and_backward"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
SECTIONS = ("model", "data", "optim", "parallel", "output")
_MODEL_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "mlp_chunks", "loss_chunks",
               "activation_checkpointing")
_SHAPE_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")


def _opt(default: Any, help_text: str):
    """A TrainConfig field with its --help text."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    """Everything a training run needs; every field is a `--flag` and a config-file key."""

    # model (byte-level by default: vocab 256)
    vocab_size: int = _opt(256, "vocabulary size (256 for raw bytes)")
    dim: int = _opt(256, "model width")
    n_layers: int = _opt(4, "decoder blocks")
    n_heads: int = _opt(8, "attention heads")
    n_kv_heads: int = _opt(4, "key/value heads (GQA when < n_heads)")
    ffn_dim: int = _opt(0, "SwiGLU hidden size; 0: 8/3 * dim rounded up to 32")
    mlp_chunks: int = _opt(1, "FPDT chunked MLP (recompute in backward)")
    loss_chunks: int = _opt(1, "FPDT chunked LM head + cross-entropy")
    activation_checkpointing: bool = _opt(False, "recompute every block in backward")
    # data
    data: str = _opt("", "raw byte file, .npy or .bin token file; empty: Python stdlib corpus")
    corpus_bytes: int = _opt(4_000_000, "size of the stdlib corpus")
    val_fraction: float = _opt(0.05, "held-out tail of the data for validation")
    seq_len: int = _opt(1024, "global sequence length (sharded over sp ranks)")
    batch: int = _opt(1, "sequences per data-parallel rank and step")
    # optimisation
    steps: int = _opt(150, "optimizer steps")
    lr: float = _opt(3e-3, "peak learning rate (AdamW)")
    min_lr: float = _opt(3e-4, "learning rate at the end of the cosine decay")
    warmup: int = _opt(15, "linear warmup steps")
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "global gradient-norm clip; 0: off")
    seed: int = _opt(0, "initial weights and data order")
    dtype: str = _opt("float32", "float32 | bfloat16 (autocast, fp32 weights) | float64")
    # parallelism
    nproc: int = _opt(4, "local processes when not under torchrun")
    dp: int = _opt(1, "data-parallel degree")
    sp: int = _opt(0, "sequence-parallel degree; 0: world size / dp")
    strategy: str = _opt("wallfacer", "attention strategy: local ring ulysses usp allgather wallfacer lss fpdt")
    ulysses: int = _opt(0, "Ulysses degree (usp); 0: the strategy's default")
    ring: int = _opt(0, "ring degree (usp); 0: the strategy's default")
    teams: int = _opt(0, "WallFacer team size C; 0: 2 for wallfacer when sp % 4 == 0")
    layout: str = _opt("zigzag", "token layout: contiguous | zigzag | striped")
    chunks: int = _opt(1, "FPDT sequence chunks")
    offload: bool = _opt(False, "FPDT host offload of K/V chunks")
    kernel: str = _opt("auto", "block attention kernel")
    strategy_options: dict = field(default_factory=dict, metadata={"help": "extra seqpar.init options"})
    fsdp: bool = _opt(False, "shard parameters with FSDP2 fully_shard over all ranks")
    # output
    out_dir: str = _opt("runs/train", "log, plot, config, checkpoints, cached corpus")
    log_every: int = _opt(10, "progress-bar period (steps)")
    eval_every: int = _opt(50, "validation period (and at the end); 0: only at the end")
    eval_batches: int = _opt(2, "validation batches")
    checkpoint_every: int = _opt(50, "checkpoint period (and at the end); 0: never")
    keep_checkpoints: int = _opt(2, "checkpoints kept; 0: all")
    resume: str = _opt("", "'latest' or a checkpoint directory")
    peak_tflops: float = _opt(0.0, "per-device peak TFLOP/s for MFU; 0: auto (GPU table, 0.1 per CPU process)")
    progress: bool = _opt(True, "progress bar and summary on rank 0")
    plot: bool = _opt(True, "loss-curve PNG at the end")

    # -- derived -------------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        return ModelConfig(**{k: getattr(self, k) for k in _MODEL_KEYS})

    def sp_size(self, world: int) -> int:
        return self.sp or world // self.dp

    def strategy_kwargs(self, sp: int) -> dict[str, Any]:
        """Keyword arguments of seqpar.init for this strategy (0 = leave the strategy's default)."""
        kwargs: dict[str, Any] = {"layout": self.layout, "kernel": self.kernel, **self.strategy_options}
        teams = self.teams or (2 if self.strategy == "wallfacer" and sp % 4 == 0 else 0)
        for name, value in (("ulysses", self.ulysses), ("ring", self.ring), ("teams", teams)):
            if value:
                kwargs[name] = value
        if self.chunks != 1:
            kwargs["chunks"] = self.chunks
        if self.offload:
            kwargs["offload"] = True
        return kwargs

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- validation ----------------------------------------------------------------------------
    def validate(self, world: int | None = None) -> None:
        """Raise ValueError for anything that cannot work (world: number of ranks, default nproc)."""
        world = world or self.nproc
        self.model_config()  # model shape errors
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("layout", self.layout, LAYOUTS)
        for name in ("seq_len", "batch", "steps", "nproc", "dp", "chunks", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sp", "ulysses", "ring", "teams", "warmup", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "corpus_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("need 0 <= beta1, beta2 < 1, weight_decay >= 0 and grad_clip >= 0")
        if self.peak_tflops < 0:
            raise ValueError(f"peak_tflops must be >= 0 (0 = auto), got {self.peak_tflops}")
        self._validate_mesh(world)

    def _validate_mesh(self, world: int) -> None:
        sp = self.sp_size(world)
        if sp < 1 or self.dp * sp != world:
            raise ValueError(f"dp ({self.dp}) x sp ({self.sp or 'auto'}) must equal the number of processes "
                             f"({world})")
        if self.strategy == "local" and sp != 1:
            raise ValueError(f"strategy 'local' needs sp = 1, got sp = {sp}; pick a sequence-parallel strategy")
        granularity = sp * self.chunks * (2 if self.layout == "zigzag" else 1)
        if self.seq_len % granularity:
            raise ValueError(f"seq_len {self.seq_len} must be a multiple of {granularity} (sp {sp} x chunks "
                             f"{self.chunks}" + (" x 2 for zigzag" if self.layout == "zigzag" else "") + ")")


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose from {sorted(choices)}")


# -- configuration files and flags -----------------------------------------------------------------
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_DEFAULTS = TrainConfig()


def _field_type(name: str) -> type:
    return type(getattr(_DEFAULTS, name))


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check a config-file value against the field's type (ints are accepted for floats)."""
    want = _field_type(name)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ValueError(f"{source}: {name} must be {want.__name__}, got {value!r}")
    return value


def _flatten(raw: dict[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key in SECTIONS:
            flat.update(_flatten(value, f"{source} [{key}]"))
        elif key in _FIELDS:
            flat[key] = _coerce(key, value, source)
        else:
            raise ValueError(f"{source}: unknown key {key!r}; valid keys: {sorted(_FIELDS)} "
                             f"(optionally grouped in tables {list(SECTIONS)})")
    return flat


def _config_path(name: str) -> Path:
    """A config file path, or the name of a packaged config (seqpar/configs/<name>.toml)."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = resources.files("seqpar") / "configs" / f"{path.stem}.toml"
    if path.suffix in ("", ".toml") and packaged.is_file():
        return Path(str(packaged))
    available = sorted(p.name[:-5] for p in (resources.files("seqpar") / "configs").iterdir()
                       if p.name.endswith(".toml"))
    raise FileNotFoundError(f"config file {name!r} not found (packaged configs: {available})")


def load_config(name: str) -> dict[str, Any]:
    """Read a TOML or YAML config file into flat TrainConfig keys (clear errors for bad keys/values)."""
    path = _config_path(name)
    text = path.read_bytes()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            raw = yaml.safe_load(text) or {}
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            raw = tomllib.loads(text.decode())
    except Exception as e:  # noqa: BLE001 - tomllib/yaml parse errors have several types
        raise ValueError(f"cannot parse config file {str(path)!r}: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {str(path)!r} must hold a table/mapping of keys")
    return _flatten(raw, str(path))


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--strategy-option expects KEY=VALUE, got {text!r}")
    for parse in (int, float):
        with contextlib.suppress(ValueError):
            return key, parse(value)
    return key, {"true": True, "false": False}.get(value.lower(), value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML/YAML config file or packaged config name (default, tiny, ...)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    for name, f in _FIELDS.items():
        flag = "--" + name.replace("_", "-")
        kind = _field_type(name)
        help_text = f"{f.metadata['help']} (default: {getattr(_DEFAULTS, name)!r})".replace("%", "%%")
        if name == "strategy_options":
            parser.add_argument("--strategy-option", dest=name, action="append", metavar="KEY=VALUE",
                                help="extra seqpar.init option (repeatable)")
        elif kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=None, metavar=kind.__name__.upper(),
                                help=help_text)


def build_config(argv: list[str]) -> TrainConfig:
    """TrainConfig from `seqpar train` arguments (for scripts and tests)."""
    parser = argparse.ArgumentParser(prog="seqpar train")
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = load_config(args.config) if getattr(args, "config", None) else {}
    for name in _FIELDS:
        given = getattr(args, name, None)
        if given is None:
            continue
        values[name] = dict(_parse_option(o) for o in given) if name == "strategy_options" else given
    return TrainConfig(**values)


# -- the training loop ---------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to min_lr at `steps` (step is 0-based)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def loss_and_backward(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
                      positions: torch.Tensor, world: Comm, autocast=contextlib.nullcontext) -> float:
    """Forward + backward of this rank's shard with the global-mean normalisation (see module doc).

    Returns the global mean token loss of the batch (identical on every rank).
    """
    with autocast():
        loss_sum, count = model(tokens, positions, labels)
    totals = torch.stack([loss_sum.detach().double(), count.double()])
    world.all_reduce(totals, kind="loss_all_reduce")
    if totals[1] <= 0:
        raise ValueError("the batch has no labelled tokens (all labels are ignore_index)")
    (loss_sum * (world.size / totals[1].item())).backward()
    return (totals[0] / totals[1]).item()


def _device_for(group: dist.ProcessGroup | None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _apply_fsdp(model: Transformer, group: dist.ProcessGroup | None, device: torch.device) -> None:
    """FSDP2: shard every block and the root over all ranks of `group` (works on CPU/gloo too)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(group or dist.group.WORLD, device.type)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (nanoGPT convention)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


class Trainer:
    """One rank's training state: mesh, context, model, optimizer, loaders, logs."""

    def __init__(self, cfg: TrainConfig, group: dist.ProcessGroup | None = None):
        world = dist.get_world_size(group)
        cfg.validate(world)
        self.cfg, self.group = cfg, group
        self.rank = dist.get_rank(group)
        self.device = _device_for(group)
        self.mesh = ParallelMesh(cfg.sp_size(world), group)
        self.ctx = seqpar.init(cfg.strategy, group=self.mesh.sp_group, stats=self.mesh.stats,
                               **cfg.strategy_kwargs(self.mesh.sp))
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model_cfg = cfg.model_config()
        param_dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
        self.model = Transformer(self.model_cfg, self.ctx).to(device=self.device, dtype=param_dtype)
        self.num_params = self.model.num_params()
        if cfg.fsdp:
            _apply_fsdp(self.model, group, self.device)
        self.optimizer = _optimizer(self.model, cfg)
        self._build_loaders()
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.step = 0
        if cfg.resume:
            self._resume()
        self.flops_per_token = training_flops_per_token(self.model_cfg, cfg.seq_len, causal=True)
        self.peak_tflops = cfg.peak_tflops or default_peak_tflops(self.device, cfg.torch_dtype)
        self.log = JsonlLog(self.out_dir / "metrics.jsonl", keep_until_step=self.step if cfg.resume else None) \
            if self.rank == 0 else None

    def _build_loaders(self) -> None:
        cfg = self.cfg
        data = open_tokens(cfg.data or stdlib_corpus(Path(cfg.out_dir) / "data", cfg.corpus_bytes))
        if data.vocab_size > cfg.vocab_size:
            raise ValueError(f"data {data.path!r} needs vocab_size >= {data.vocab_size}, the model has "
                             f"{cfg.vocab_size}")
        train_tokens, val_tokens = split_tokens(data, cfg.val_fraction, cfg.seq_len)
        common = dict(seq_len=cfg.seq_len, batch=cfg.batch, vocab_size=cfg.vocab_size, dp=self.mesh.dp,
                      dp_rank=self.mesh.dp_rank)
        self.loader = SequenceLoader(train_tokens, seed=cfg.seed, **common)
        self.val_loader = SequenceLoader(val_tokens, seed=cfg.seed + 1, **common)

    def _autocast(self):
        if self.cfg.dtype == "bfloat16":
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
        tokens, labels, positions = shard_batch(self.ctx, self.loader.next(), self.device)
        loss = loss_and_backward(self.model, tokens, labels, positions, self.mesh.world_comm, self._autocast)
        self._sync_gradients()
        grad_norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.ctx.check_inputs = False  # shapes never change: verified across ranks on the first step
        self.step += 1
        return self._record(loss, lr, grad_norm, seconds)

    def _sync_gradients(self) -> None:
        if self.cfg.fsdp:  # FSDP reduce-scatters (averages) inside backward; count its bytes (estimate)
            n, pbytes = self.mesh.size, self.num_params * self.model.output.weight.element_size()
            vol = pbytes * (n - 1) // n
            self.mesh.stats.record("fsdp_all_gather_est", 2 * vol, 2 * vol)  # forward + backward re-gather
            self.mesh.stats.record("fsdp_reduce_scatter_est", vol, vol)
            return
        mode = "double" if self.cfg.strategy == "lss" else "flat"
        average_gradients(self.model.parameters(), self.mesh, mode=mode)

    def _clip(self) -> float:
        if not self.cfg.grad_clip:
            return float("nan")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _record(self, loss: float, lr: float, grad_norm: float, seconds: float) -> dict[str, Any]:
        tokens = self.mesh.dp * self.cfg.batch * self.cfg.seq_len
        comm = self.mesh.stats.snapshot()
        flops_per_s = self.flops_per_token * tokens / seconds
        return {"type": "train", "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "step_time_s": seconds, "tokens_per_s": tokens / seconds,
                "mfu": flops_per_s / (self.peak_tflops * 1e12 * self.mesh.size),
                "peak_mem_mb": peak_memory_mb(self.device), "comm_bytes": comm["total"]["sent"],
                "comm": {k: v["sent"] for k, v in comm.items() if k != "total"}}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over `eval_batches` fixed validation batches (same on every rank)."""
        totals = torch.zeros(2, dtype=torch.float64)
        for i in range(self.cfg.eval_batches):
            tokens, labels, positions = shard_batch(self.ctx, self.val_loader.batch_at(i), self.device)
            with self._autocast():
                loss_sum, count = self.model(tokens, positions, labels)
            totals += torch.stack([loss_sum.double().cpu(), count.double().cpu()])
        totals = totals.to(self.device)
        self.mesh.world_comm.all_reduce(totals, kind="loss_all_reduce")
        return (totals[0] / totals[1]).item()

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self) -> Path:
        meta = {"loader": self.loader.state_dict(), "model": self.model_cfg.to_dict(), "config": self.cfg.to_dict()}
        return save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, meta, self.group,
                               keep=self.cfg.keep_checkpoints)

    def _resume(self) -> None:
        path = resolve_checkpoint(self.cfg.resume, self.ckpt_root)
        meta = load_checkpoint(path, self.model, self.optimizer, self.group)
        saved = {k: meta.get("model", {}).get(k) for k in _SHAPE_KEYS}
        wanted = {k: getattr(self.model_cfg, k) for k in _SHAPE_KEYS}
        if saved != wanted:
            raise ValueError(f"checkpoint {str(path)!r} holds a model of shape {saved}, this run has {wanted}")
        self.loader.load_state_dict(meta["loader"])
        self.step = int(meta["step"])
        if self.step != self.loader.step:
            raise ValueError(f"checkpoint {str(path)!r} is inconsistent: step {self.step} vs loader step "
                             f"{self.loader.step}")

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to cfg.steps; returns {"losses", "val_losses", "records"} (records on rank 0 only)."""
        cfg = self.cfg
        bar = ProgressBar(cfg.steps) if self.rank == 0 and cfg.progress else None
        losses, val_losses, records = [], [], []
        if self.rank == 0:
            self._write_config()
        while self.step < cfg.steps:
            record = self.train_step()
            losses.append(record["loss"])
            self._emit(record, records)
            last = self.step == cfg.steps
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                val = self.evaluate()
                val_losses.append((self.step, val))
                self._emit({"type": "val", "step": self.step, "val_loss": val}, records)
            if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or last):
                self.save()
            if bar and (self.step % cfg.log_every == 0 or last):
                bar.update(self.step, f"loss {record['loss']:.3f}  {record['tokens_per_s']:,.0f} tok/s  "
                                      f"mfu {100 * record['mfu']:.1f}%  " + (f"val {val_losses[-1][1]:.3f}"
                                                                          if val_losses else ""))
        if bar:
            bar.close()
        self._finish()
        return {"losses": losses, "val_losses": val_losses, "records": records}

    def _emit(self, record: dict[str, Any], records: list) -> None:
        if self.log is not None:
            self.log.write(record)
            records.append(record)

    def _write_config(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        info = {"config": self.cfg.to_dict(), "num_params": self.num_params, "world_size": self.mesh.size,
                "context": self.ctx.describe(), "torch": torch.__version__}
        (self.out_dir / "config.json").write_text(json.dumps(info, indent=1, default=str))

    def _finish(self) -> None:
        if self.log is None:
            return
        self.log.close()
        if self.cfg.plot:
            title = f"{self.cfg.strategy} sp={self.mesh.sp} dp={self.mesh.dp} ({self.num_params / 1e6:.2f}M params)"
            plot_loss_curve(read_jsonl(self.log.path), self.out_dir / "loss.png", title)
        if self.cfg.progress:
            print(f"seqpar train: done; log {self.log.path}" + (f", plot {self.out_dir / 'loss.png'}" if self.cfg.plot
                  else "") + (f", checkpoints {self.ckpt_root}" if self.cfg.checkpoint_every else ""),
                  file=sys.stderr)


def train(cfg: TrainConfig, group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Run training on an initialised process group (default WORLD); collective over `group`."""
    return Trainer(cfg, group).run()


# -- launching -----------------------------------------------------------------------------------
def prepare(cfg: TrainConfig, world: int) -> TrainConfig:
    """Validate and resolve the data path (building the stdlib corpus if needed) before any worker starts."""
    cfg.validate(world)
    if not cfg.data:  # built once here (atomically), so workers find it cached
        cfg = dataclasses.replace(cfg, data=str(stdlib_corpus(Path(cfg.out_dir) / "data", cfg.corpus_bytes)))
    split_tokens(open_tokens(cfg.data), cfg.val_fraction, cfg.seq_len)
    if cfg.resume:
        resolve_checkpoint(cfg.resume, Path(cfg.out_dir) / "checkpoints")
    return cfg


def _local_worker(rank: int, world: int, rendezvous: str, cfg_dict: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}/init", rank=rank, world_size=world)
    try:
        train(TrainConfig(**cfg_dict))
    except (ValueError, FileNotFoundError) as e:
        Path(rendezvous, f"error_rank{rank}").write_text(str(e))
        raise
    dist.destroy_process_group()


def launch_local(cfg: TrainConfig) -> None:
    """Spawn cfg.nproc gloo workers on this machine (file:// rendezvous) and train."""
    with tempfile.TemporaryDirectory(prefix="seqpar-train-") as rendezvous:
        try:
            mp.start_processes(_local_worker, args=(cfg.nproc, rendezvous, cfg.to_dict()), nprocs=cfg.nproc,
                               join=True, start_method="spawn")
        except mp.ProcessRaisedException:
            errors = sorted(Path(rendezvous).glob("error_rank*"))
            if errors:  # a configuration/data error found inside a worker: report it plainly
                raise ValueError(errors[0].read_text()) from None
            raise


def launch_torchrun(cfg: TrainConfig) -> None:
    """Under torchrun: NCCL on GPUs (one per local rank), gloo otherwise."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        train(cfg)
    finally:
        dist.destroy_process_group()


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun else cfg.nproc
    if args.print_config:
        cfg.validate(world)
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    if under_torchrun:  # every rank prepares: the corpus cache is written atomically
        launch_torchrun(prepare(cfg, world))
        return 0
    cfg = prepare(cfg, world)
    print(f"seqpar train: {cfg.nproc} local gloo processes, strategy {cfg.strategy} (dp={cfg.dp}, "
          f"sp={cfg.sp_size(world)}), seq_len {cfg.seq_len}, data {cfg.data}, out {cfg.out_dir}", file=sys.stderr)
    launch_local(cfg)
    return 0
