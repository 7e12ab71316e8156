"""Launching `seqpar train`: a local world of gloo worker processes, or one rank under torchrun."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..checkpoint import resolve_checkpoint
from ..data import open_tokens, split_tokens, stdlib_corpus
from .config import TrainConfig, config_from_args
from .trainer import train

__all__ = ["prepare", "launch_local", "launch_torchrun", "main"]


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
