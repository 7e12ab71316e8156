"""Atomic distributed checkpoints with torch.distributed.checkpoint (DCP).

Layout under the checkpoint root::

    step_00000100/       one complete checkpoint
        .metadata, __*_*.distcp   DCP files (model + optimizer, FSDP-sharded or replicated)
        rng_rank<r>.pt    torch RNG state of each rank
        meta.json         step, loader state, configuration; written last
    latest               text file naming the newest complete checkpoint

Every rank writes into ``.tmp-step_...``; after a barrier rank 0 writes meta.json, renames
the directory into place and rewrites ``latest`` (write-then-rename), so a crash at any
point leaves either the previous checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .data import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "resolve_checkpoint", "read_meta", "LATEST", "META"]

LATEST = "latest"
META = "meta.json"
_PREFIX = "step_"


def _name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(root: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any], group: dist.ProcessGroup | None = None, keep: int = 2) -> Path:
    """Collectively save model + optimizer + per-rank RNG + `meta` (JSON) as checkpoint `step`.

    Keeps the newest `keep` checkpoints (0 = all). Returns the checkpoint directory.
    """
    root = Path(root)
    rank = dist.get_rank(group)
    final, tmp = root / _name(step), root / f".tmp-{_name(step)}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier(group=group)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), process_group=group)
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    dist.barrier(group=group)
    if rank == 0:
        record = {**meta, "step": step, "world_size": dist.get_world_size(group)}
        atomic_write(tmp / META, json.dumps(record, indent=1, sort_keys=True))
        _replace_dir(tmp, final)
        atomic_write(root / LATEST, final.name + "\n")
        _prune(root, keep)
    dist.barrier(group=group)
    return final


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished checkpoint into place, replacing an older one of the same step."""
    if dst.exists():
        old = dst.with_name(f".old-{dst.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if (p / META).is_file())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(resume: str, root: str | os.PathLike) -> Path:
    """"latest" -> the checkpoint `root/latest` names; a directory holding `latest` -> the same for
    it; otherwise the given checkpoint directory. Raises FileNotFoundError/ValueError if unusable."""
    path = Path(root) if resume == "latest" else Path(resume)
    if (path / LATEST).is_file() or resume == "latest":
        pointer = path / LATEST
        if not pointer.is_file():
            raise FileNotFoundError(f"cannot resume: no checkpoint pointer {str(pointer)!r} "
                                    "(no checkpoint was written yet?)")
        path = path / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    read_meta(path)
    if not (path / ".metadata").is_file():
        raise ValueError(f"checkpoint {str(path)!r} is incomplete: DCP .metadata is missing")
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} is incomplete: {META} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {str(path)!r} has a corrupt {META}: {e}") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise ValueError(f"checkpoint {str(path)!r} has a corrupt {META}: no 'step'")
    return meta


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Collectively restore model + optimizer (+ RNG when the world size matches); returns meta."""
    path = Path(path)
    meta = read_meta(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(path), process_group=group)
    except (Exception, dcp.CheckpointException) as e:  # CheckpointException is a BaseException
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or does not match this model/optimizer: "
                         f"{_describe(e)}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if meta.get("world_size") == dist.get_world_size(group):
        _load_rng(path / f"rng_rank{dist.get_rank(group)}.pt", group)
    return meta


def _describe(error: BaseException) -> str:
    """One line for an error; DCP's CheckpointException carries the failures of every rank."""
    if isinstance(error, dcp.CheckpointException) and getattr(error, "failures", None):
        rank, failure = min(error.failures.items())
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"{type(inner).__name__}: {inner} (rank {rank})"
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[-1] if text else ''}"


def _load_rng(path: Path, group: dist.ProcessGroup | None) -> None:
    """Restore this rank's RNG; if any rank cannot, every rank raises (no rank trains on alone)."""
    error = ""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a corrupt checkpoint
        error = f"checkpoint RNG file {str(path)!r} is missing or corrupt: {e}"
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    failed = torch.tensor([float(bool(error))], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)  # control flag, not data
    if failed.item():
        raise ValueError(error or f"checkpoint {str(path.parent)!r}: another rank's RNG file is missing or corrupt")
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
