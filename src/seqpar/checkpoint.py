"""Atomic, checksummed distributed checkpoints with torch.distributed.checkpoint (DCP).

Layout under the checkpoint root::

    step_00000100/       one complete checkpoint
        .metadata, __*_*.distcp   DCP files (model + optimizer, FSDP-sharded or replicated)
        rng_rank<r>.pt    torch RNG state of each rank
        meta.json         step, loader state, configuration, file checksums; written last
    latest               text file naming the newest complete checkpoint

Every rank writes into ``.tmp-step_...``; then every rank checksums the files it wrote (its
``__<rank>_*.distcp`` shards and ``rng_rank<rank>.pt``; rank 0 also ``.metadata``), rank 0
gathers the digests (all_gather_object: on a shared filesystem or node-local disks alike),
writes meta.json, renames the directory into place and rewrites ``latest`` (write-then-rename),
so a crash at any point leaves either the previous checkpoint or the new one, never half of one.

Integrity: meta.json records ``files`` = {name: {"bytes", "sha256"}} for every other file of the
checkpoint, and ``meta_sha256`` over its own canonical JSON. `resolve_checkpoint` checks that
meta.json is intact and every file exists with its recorded size (stat calls only);
`load_checkpoint` re-hashes every file before loading, split over the ranks by the same
ownership rule, and all ranks agree on the outcome (all_gather_object), so either every rank
loads or every rank raises the same one-line `CorruptCheckpointError`, which names the newest
intact older checkpoint and the --resume argument for it. Checkpoints written before checksums
existed (no ``files`` in meta.json) load unverified.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .io import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "resolve_checkpoint", "read_meta", "verify_checkpoint",
           "latest_checkpoint", "file_digest", "CorruptCheckpointError", "CheckpointWriteError", "LATEST", "META"]

LATEST = "latest"
META = "meta.json"
FILES = "files"              # meta.json: {file name: {"bytes": size, "sha256": hex digest}}
META_DIGEST = "meta_sha256"  # meta.json: sha256 of its own canonical JSON (without this key)
_PREFIX = "step_"
_CHUNK = 1 << 20
_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp|rng_rank(\d+)\.pt")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. a full disk): one line naming the cause, the
    directory and its free space. Nothing partial is left, and older checkpoints are kept."""


class CorruptCheckpointError(ValueError):
    """A checkpoint is incomplete or fails its checksums; the message is one line naming the
    newest intact older checkpoint (or saying there is none)."""


def _name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


# -- checksums -----------------------------------------------------------------------------------
def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of a file, read in 1 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _owner(name: str, world: int) -> int:
    """The rank that checksums a file: the writer of a DCP shard or RNG file (modulo the world
    size, for a resume on fewer ranks), rank 0 for the rest (.metadata)."""
    match = _RANK_FILE.fullmatch(name)
    return int(match.group(1) or match.group(2)) % world if match else 0


def _digest_own_files(directory: Path, rank: int, world: int) -> dict[str, dict[str, Any]]:
    return {p.name: file_digest(p) for p in sorted(directory.iterdir())
            if p.is_file() and p.name != META and not p.name.endswith(".tmp") and _owner(p.name, world) == rank}


def _meta_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _meta_text(record: dict[str, Any]) -> str:
    body = json.loads(json.dumps(record))  # canonical (JSON types, string keys) as read back
    return json.dumps({**body, META_DIGEST: _meta_digest(body)}, indent=1, sort_keys=True)


def _all_gather(obj: Any, group: dist.ProcessGroup | None) -> list[Any]:
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


# -- save ----------------------------------------------------------------------------------------
def save_checkpoint(root: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any], group: dist.ProcessGroup | None = None, keep: int = 2) -> Path:
    """Collectively save model + optimizer + per-rank RNG + `meta` (JSON) + file checksums as
    checkpoint `step`. Keeps the newest `keep` checkpoints up to this one (0 = all). Returns its directory.

    A failure on any rank (a full disk, a read-only directory) is agreed by every rank: the partial
    `.tmp-step_*` directory is removed and every rank raises the same one-line `CheckpointWriteError`.
    """
    root = Path(root)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    final, tmp = root / _name(step), root / f".tmp-{_name(step)}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _raise_agreed(_attempt(lambda: tmp.mkdir(parents=True) if rank == 0 else None), root, tmp, step, group)
    model_sd, optim_sd = get_state_dict(model, optimizer)

    def write_shards() -> None:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), process_group=group)
        buffer = io.BytesIO()  # serialised first: a full disk is then an OSError (ENOSPC) from the write,
        torch.save(_rng_state(), buffer)  # not the zip writer's "unexpected pos" RuntimeError
        (tmp / f"rng_rank{rank}.pt").write_bytes(buffer.getvalue())

    _raise_agreed(_attempt(write_shards, tmp, lambda: _state_bytes(model_sd, optim_sd)), root, tmp, step, group)
    digests = _all_gather(_digest_own_files(tmp, rank, world), group)  # also the barrier: all files written

    def finish() -> None:
        files = {name: d for part in digests for name, d in part.items()}
        record = {**meta, "step": step, "world_size": world, FILES: dict(sorted(files.items()))}
        atomic_write(tmp / META, _meta_text(record))
        _replace_dir(tmp, final)
        atomic_write(root / LATEST, final.name + "\n")
        _prune(root, keep, final.name)

    _raise_agreed(_attempt(finish) if rank == 0 else "", root, tmp, step, group)  # also the final barrier
    return final


def _attempt(write, directory: Path | None = None, needed=lambda: 0) -> str:
    """Run `write`; '' on success, else the root cause in one line (DCP wraps every rank's failure
    in a CheckpointException, a BaseException). torch's zip writer reports a full disk as a
    RuntimeError without errno: when `directory` has less free space than `needed()` bytes (asked
    only after a failure), that is the cause named."""
    try:
        write()
    except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - any write failure: one line
        cause = _root_cause(e)
        if directory is not None and "No space" not in cause and _free_bytes(directory) < needed():
            return os.strerror(28)  # ENOSPC: "No space left on device"
        return cause
    return ""


def _state_bytes(*states: dict) -> int:
    """Bytes of this rank's tensors in `states` (flattened state dicts): what its shards need."""
    leaves = torch.utils._pytree.tree_leaves(states)
    return sum(t.numel() * t.element_size() for t in (x.to_local() if hasattr(x, "to_local") else x
                                                      for x in leaves if torch.is_tensor(x)))


def _root_cause(error: BaseException) -> str:
    """The innermost OSError's strerror (e.g. 'No space left on device'), else the first line."""
    todo = [error]
    for e in todo:  # breadth first over DCP's per-rank failures and the exception chains
        if len(todo) > 64:
            break
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        todo += [f[0] if isinstance(f, tuple) else f for f in (getattr(e, "failures", None) or {}).values()]
        todo += [x for x in (e.__cause__, e.__context__) if x is not None and x not in todo]
    return _describe(error)


def _raise_agreed(error: str, root: Path, tmp: Path, step: int, group: dist.ProcessGroup | None) -> None:
    """Every rank learns whether any rank failed (a MAX all-reduce of a flag, the first message
    gathered); on failure rank 0 removes the partial directory and every rank raises."""
    if not _any_rank(bool(error), group):
        return
    cause = next(m for m in _all_gather(error, group) if m)
    if dist.get_rank(group) == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier(group=group)
    kept = latest_checkpoint(root)
    previous = f"the previous checkpoint {str(kept)!r} is kept" if kept else "no earlier checkpoint"
    raise CheckpointWriteError(f"checkpoint step {step} not written: {cause} in {str(root)!r} "
                               f"({_free_space(root)}); nothing partial left, {previous}")


def _any_rank(flag: bool, group: dist.ProcessGroup | None) -> bool:
    """Whether `flag` is set on any rank of `group` (a MAX all-reduce of a control flag, not data)."""
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def _free_bytes(directory: Path) -> int:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(directory).free
    return 1 << 62


def _free_space(root: Path) -> str:
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage(root)
        return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"
    return "free space unknown"


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


def _prune(root: Path, keep: int, newest: str) -> None:
    """Delete all but the `keep` newest complete checkpoints up to `newest`; checkpoints of later
    steps (left by a run this one resumed before) are not counted and stay until overwritten."""
    if keep <= 0:
        return
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if p.name <= newest and (p / META).is_file())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# -- resolve and verify --------------------------------------------------------------------------
def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint `root/latest` names, if that directory exists."""
    try:
        path = Path(root) / Path(root, LATEST).read_text().strip()
    except OSError:
        return None
    return path if path.is_dir() else None


def resolve_checkpoint(resume: str, root: str | os.PathLike, verify: str = "sizes") -> Path:
    """"latest" -> the checkpoint `root/latest` names; a directory holding `latest` -> the same for
    it; otherwise the given checkpoint directory. Raises FileNotFoundError, or CorruptCheckpointError
    (a ValueError) if it is incomplete or, per `verify`, damaged: "none", "sizes" (every file
    recorded in meta.json exists with its size; stat calls only) or "full" (sha256 of every file)."""
    path = Path(root) if resume == "latest" else Path(resume)
    if (path / LATEST).is_file() or resume == "latest":
        pointer = path / LATEST
        if not pointer.is_file():
            raise FileNotFoundError(f"cannot resume: no checkpoint pointer {str(pointer)!r} "
                                    "(no checkpoint was written yet?)")
        path = path / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    try:
        read_meta(path)
        if not (path / ".metadata").is_file():
            raise ValueError(f"checkpoint {str(path)!r} is incomplete: DCP .metadata is missing")
    except ValueError as e:
        raise CorruptCheckpointError(f"{e}; {_hint(_newest_intact(path))}") from None
    problems = [] if verify == "none" else verify_checkpoint(path, deep=verify == "full")
    if problems:
        raise _corrupt(path, problems, _newest_intact(path))
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
    digest = meta.pop(META_DIGEST, None)
    if digest is not None and digest != _meta_digest(meta):
        raise ValueError(f"checkpoint {str(path)!r} has a corrupt {META}: it fails its own sha256 checksum")
    return meta


def verify_checkpoint(path: str | os.PathLike, rank: int = 0, world: int = 1, deep: bool = True) -> list[str]:
    """Problems of the files of checkpoint `path` that `rank` of `world` checks (all of them for
    rank 0 of 1): missing, wrong size, or (deep) wrong sha256. [] if intact or if it has no
    checksums (written before they existed)."""
    path = Path(path)
    try:
        files = read_meta(path).get(FILES) or {}
    except ValueError as e:
        return [str(e)]
    problems = []
    for name, want in sorted(files.items()):
        if _owner(name, world) != rank:
            continue
        try:
            size = (path / name).stat().st_size
        except OSError:
            problems.append(f"{name} is missing")
            continue
        if size != want["bytes"]:
            problems.append(f"{name} has {size} bytes, meta.json records {want['bytes']}")
        elif deep and file_digest(path / name)["sha256"] != want["sha256"]:
            problems.append(f"{name} fails its sha256 checksum")
    return problems


def _older(path: Path) -> list[Path]:
    """Complete checkpoints beside `path` with an earlier step, newest first."""
    return sorted((p for p in path.parent.glob(f"{_PREFIX}*")
                   if p.name < path.name and p.is_dir() and (p / META).is_file()), reverse=True)


def _newest_intact(path: Path) -> Path | None:
    """The newest older checkpoint whose files all pass their checksums (this process reads them)."""
    return next((p for p in _older(path) if not verify_checkpoint(p)), None)


def _hint(intact: Path | None) -> str:
    if intact is None:
        return "no intact older checkpoint to fall back to (restore the files, or start without --resume)"
    return f"the newest intact checkpoint is {str(intact)!r}: resume from it with --resume {intact}"


def _corrupt(path: Path, problems: list[str], intact: Path | None) -> CorruptCheckpointError:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return CorruptCheckpointError(f"checkpoint {str(path)!r} is corrupt: {problems[0]}{more}; {_hint(intact)}")


def _verify_collectively(path: Path, group: dist.ProcessGroup | None) -> None:
    """Every rank hashes its share of the files; all ranks raise the same error if any fails."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    problems = [p for part in _all_gather(verify_checkpoint(path, rank, world), group) for p in part]
    if not problems:
        return
    candidates = _all_gather([str(p) for p in _older(path)], group)[0]  # rank 0's list on every rank
    intact = None
    for candidate in map(Path, candidates):
        if not any(_all_gather(verify_checkpoint(candidate, rank, world), group)):
            intact = candidate
            break
    raise _corrupt(path, problems, intact)


# -- load ----------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    group: dist.ProcessGroup | None = None, verify: bool = True) -> dict[str, Any]:
    """Collectively verify (checksums, split over the ranks) and restore model + optimizer (+ RNG
    when the world size matches); returns meta."""
    path = Path(path)
    meta = read_meta(path)
    if verify:
        _verify_collectively(path, group)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(path), process_group=group)
    except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - any load failure (CheckpointException is a BaseException) is this one error
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
    if _any_rank(bool(error), group):
        raise ValueError(error or f"checkpoint {str(path.parent)!r}: another rank's RNG file is missing or corrupt")
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_model_state(path: str | os.PathLike, state: dict[str, torch.Tensor]) -> None:
    """Fill `state` (model state-dict keys -> tensors of the right shapes) from checkpoint `path`,
    in this one process, whatever world size and sharding wrote it (no process group). A tensor
    missing or of another shape raises RuntimeError naming the first failure in one line."""
    import warnings
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load({"model": state}, checkpoint_id=str(path), no_dist=True)
        except dcp.CheckpointException as e:  # a BaseException: one line of the first failure
            failure = next(iter(getattr(e, "failures", {}).values()), e)
            raise RuntimeError(str(failure[0] if isinstance(failure, tuple) else failure)) from None

