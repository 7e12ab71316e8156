"""The world `seqpar plan --calibrate / --profile` measures: the current torch.distributed
world under torchrun, else a local gloo `seqpar.world.ProcessWorld` of `--world` ranks.

`open_world(size)` is a context manager yielding `run(fn, *args, **kwargs)`, which calls the
module-level function `fn` on every rank and returns rank 0's result (the per-rank functions
reduce their measurements so that every rank returns the same thing).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from ..world import ProcessWorld

__all__ = ["open_world", "under_torchrun", "local_ranks_per_node"]

Run = Callable[..., Any]


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def local_ranks_per_node(size: int) -> int:
    """Ranks per node of the world `open_world(size)` runs: LOCAL_WORLD_SIZE under torchrun,
    all of them for a local world."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", size)) if under_torchrun() else size


@contextmanager
def open_world(size: int) -> Iterator[Run]:

    created = under_torchrun() and not dist.is_initialized()
    if created:
        _init_torchrun_group()
    try:
        if dist.is_initialized():
            if dist.get_world_size() != size:
                raise ValueError(f"--world {size} does not match the running world of {dist.get_world_size()} ranks")
            yield lambda fn, *args, **kwargs: fn(*args, **kwargs)
            return
        # profiles of long sequences run for many minutes, and one block of a ring step for seconds
        with ProcessWorld(size, timeout=6 * 3600.0, pg_timeout=1800.0) as pw:
            yield lambda fn, *args, **kwargs: pw.run(fn, *args, **kwargs)[0]
    finally:
        if created:
            dist.destroy_process_group()


def _init_torchrun_group() -> None:

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
