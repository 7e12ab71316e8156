"""Launching `seqpar train`: a local world of gloo worker processes, or one rank under torchrun.

Before anything is spawned or written, `check` runs every check that needs no process group
(the config, the output directory, the strategy's degrees and kernel), then the launcher
takes the output directory's lock (`control.RunLock`) and `resolve_inputs` opens the data and
the checkpoint to resume. Configuration errors are therefore one line, exit code 2, in the
time it takes to import torch.

The local launcher supervises its workers (`control.supervise`): SIGTERM/SIGINT are forwarded
(SIGTERM: every rank stops after the same step and saves a checkpoint; SIGINT: they stop
without one), a rank whose heartbeat stops for `--stall-timeout` seconds is named and the run
stopped, a failing rank stops the others within a second, and workers die with the launcher.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..attention.ulysses import kv_replication
from ..checkpoint import CheckpointWriteError, latest_checkpoint, read_meta, resolve_checkpoint
from ..corpus import corpus_kind
from ..data import find_documents, open_tokens, split_tokens, stdlib_corpus
from ..hf import hf_model_shape
from ..images import image_loaders
from ..kernels import get_kernel
from ..tensor_parallel import check_tensor_parallel
from ..world import init_local_gloo, start_ranks
from . import control
from .auto import choose, ensure_calibration, needs_no_plan
from .auto_profile import choose_by_measurement, format_step_profile
from .config import AUTO, DTYPES, TrainConfig, config_from_args, flat_values
from .tasks import prepared_corpus, tokenized_corpus
from .trainer import lr_at, train

__all__ = ["check", "prepare", "resolve_inputs", "resume_note", "launch_local", "launch_torchrun", "main"]


# -- checks before anything starts -----------------------------------------------------------------------

def _latest(cfg: TrainConfig) -> str | None:
    """The run's newest complete checkpoint (what `--resume latest` would load), or None."""
    path = latest_checkpoint(Path(cfg.output.out_dir) / "checkpoints")
    return None if path is None else str(path)


def check_out_dir(out_dir: str) -> None:
    """The output directory exists (created here) and is a writable directory."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out-dir {out_dir!r} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create --out-dir {out_dir!r}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--out-dir {out_dir!r} is not writable")


def check_strategy(cfg: TrainConfig, world: int, device: str = "cpu") -> None:
    """What the first attention call would check inside the workers, run here with the same code:
    the Ulysses head split of the strategy's resolved settings (of each tensor-parallel rank's
    heads), an --hf-model's heads over --tp, and the kernel for the run's dtype (`cfg.validate`
    already resolved the strategy's options, degrees and layout)."""
    settings = cfg.strategy_settings(world)
    tp = cfg.parallel.tp
    if cfg.model.hf_model:
        shape = hf_model_shape(cfg.model.hf_model)
        heads, kv_heads = shape["n_heads"], shape["n_kv_heads"]
        check_tensor_parallel(tp, heads, kv_heads)
    else:
        m = cfg.dit_config() if cfg.model.kind == "dit" else cfg.model_config()
        heads, kv_heads = m.n_heads, m.n_kv_heads
    if settings.ulysses > 1:  # each tensor-parallel rank's heads are split over the Ulysses degree
        kv_replication(heads // tp, kv_heads // tp, settings.ulysses)
    if cfg.parallel.kernel != "auto":  # attention runs in the autocast dtype (bf16) or the parameter dtype
        get_kernel(cfg.parallel.kernel, device, DTYPES[cfg.optim.dtype])


def check(cfg: TrainConfig, world: int, device: str = "cpu") -> None:
    """Everything that can be checked without data or a process group (raises ValueError)."""
    cfg.validate(world)
    check_out_dir(cfg.output.out_dir)
    check_strategy(cfg, world, device)


def resolve_inputs(cfg: TrainConfig, lead: bool = True) -> TrainConfig:
    """Open the data (building the stdlib corpus once, atomically; tokenizing a corpus, or the
    stdlib corpus with an --hf-model's tokenizer, once) and the checkpoint to resume. `lead`: this
    process prepares a corpus (local rank 0); the others wait for its cache entry."""
    if cfg.model.kind == "dit":
        image_loaders(cfg.dit.image_size, 1)  # the photos load and crop (skimage present, sizes valid)
        if cfg.output.resume:
            resolve_checkpoint(cfg.output.resume, Path(cfg.output.out_dir) / "checkpoints")
        return cfg
    if cfg.data.data and corpus_kind(cfg.data.data):
        prepared = prepared_corpus(cfg, lead)
        if lead and cfg.output.progress:
            print(f"seqpar train: {prepared.describe(cfg.data.data)}", file=sys.stderr)
        cfg = cfg.replace(data=str(prepared.path))
    if not cfg.data.data:
        cfg = cfg.replace(data=str(stdlib_corpus(Path(cfg.output.out_dir) / "data", cfg.data.corpus_bytes)))
    vocab = cfg.model.vocab_size
    if cfg.model.hf_model:
        from ..hf import hf_vocab_size
        cfg, vocab = cfg.replace(data=tokenized_corpus(cfg)), hf_vocab_size(cfg.model.hf_model)
    data = open_tokens(cfg.data.data)
    if data.vocab_size > vocab:  # the same check as LanguageTask
        raise ValueError(f"data {data.path!r} needs vocab_size >= {data.vocab_size}, the model has {vocab}")
    data = find_documents(data, cfg.data.separator)  # a corrupt index or an absent separator: one line
    split_tokens(data, cfg.data.val_fraction, cfg.data.seq_len, cfg.data.val_seed)
    if cfg.output.resume:
        resolve_checkpoint(cfg.output.resume, Path(cfg.output.out_dir) / "checkpoints")
    return cfg


def documents_note(cfg: TrainConfig) -> str:
    """How the run treats document boundaries, for the launch line."""
    if cfg.model.kind == "dit":
        return f"{cfg.dit.image_size}x{cfg.dit.image_size} crops of scikit-image's photos"
    if not cfg.data.pack_documents:
        return "documents not packed (--no-pack-documents)"
    data = find_documents(open_tokens(cfg.data.data), cfg.data.separator)
    if data.doc_starts is None:
        return "no document boundaries in the data (add <file>.docs.npy or --doc-separator to pack)"
    return f"{len(data.doc_starts)} packed documents (mean length {round(len(data) / len(data.doc_starts))})"


def prepare(cfg: TrainConfig, world: int, device: str = "cpu") -> TrainConfig:
    """`check` + `resolve_inputs`: validate and resolve the data path before any worker starts."""
    check(cfg, world, device)
    return resolve_inputs(cfg)


_SCHEDULE_KEYS = ("steps", "warmup", "lr", "min_lr")


def resume_note(cfg: TrainConfig) -> str | None:
    """One line when a resumed run changes the LR schedule (or has nothing left to train)."""
    if not cfg.output.resume:
        return None
    path = resolve_checkpoint(cfg.output.resume, Path(cfg.output.out_dir) / "checkpoints")
    meta = read_meta(path)
    start, saved = int(meta["step"]), flat_values(meta.get("config", {}))
    if cfg.optim.steps <= start:
        return (f"seqpar train: note: checkpoint {path.name} is at step {start}, --steps is {cfg.optim.steps}: "
                "nothing left to train")
    now = {k: getattr(cfg.optim, k) for k in _SCHEDULE_KEYS}
    changed = {k: saved[k] for k in _SCHEDULE_KEYS if k in saved and saved[k] != now[k]}
    if not changed:
        return None
    before, after = lr_at(start, cfg.replace(**changed)), lr_at(start, cfg)
    what = ", ".join(f"--{k.replace('_', '-')} {v} -> {now[k]}" for k, v in changed.items())
    return (f"seqpar train: note: resuming {path.name} with {what}: the LR schedule (warmup, then cosine to "
            f"min_lr at --steps) is recomputed, not restarted: from step {start + 1} the LR follows the new "
            f"{cfg.optim.steps}-step curve (lr {after:.3g} at step {start + 1}, {before:.3g} on the old one)")


# -- local launch ---------------------------------------------------------------------------------------
def _local_worker(rank: int, world: int, control_dir: str, cfg_dict: dict[str, Any], parent_pid: int) -> None:
    control.die_with_parent(parent_pid)
    control.install_stop_handlers()
    cfg = TrainConfig.from_tables(cfg_dict)
    control.start_heartbeat(control_dir, rank, min(1.0, control.stall_limit(cfg) / 5), parent_pid)
    try:
        init_local_gloo(rank, world, f"{control_dir}/init", cfg.faults.timeout)
        train(cfg)
    except control.TrainingStopped as stop:
        if rank == 0:
            control.write_record(control_dir, "stopped.json", stop.to_dict())
    except (ValueError, FileNotFoundError) as e:  # a configuration/data error: reported as one line
        control.write_record(control_dir, f"error_rank{rank}.json", control.error_record(e, config_error=True))
        sys.exit(1)
    except CheckpointWriteError as e:  # a full disk: one line, no traceback (rc 1)
        control.write_record(control_dir, f"error_rank{rank}.json", control.error_record(e, config_error=False,
                                                                                         one_line=True))
        sys.exit(1)
    except BaseException as e:  # noqa: BLE001 - reported by the launcher with its traceback
        control.write_record(control_dir, f"error_rank{rank}.json", control.error_record(e, config_error=False))
        sys.exit(1)
    dist.destroy_process_group()


def _report(outcome: control.Outcome, cfg: TrainConfig) -> int:
    """Print the one line of a run that did not finish; returns the exit code."""
    latest = _latest(cfg)
    resume = f"; latest checkpoint {latest} (resume with --resume latest)" if latest else "; no checkpoint yet"
    if outcome.kind == "done":
        return 0
    if outcome.kind == "stopped":
        stop = outcome.stop or {}
        print(control.stop_message(outcome.signum, stop.get("step"), stop.get("checkpoint"),
                                   stop.get("reason") or outcome.message, latest), file=sys.stderr)
        return 128 + outcome.signum
    if outcome.kind == "stalled":
        print(f"seqpar train: {outcome.message}{resume}", file=sys.stderr)
        return 1
    errors, first = outcome.errors, outcome.first_failure
    config_errors = [e for r, e in sorted(errors.items(), key=lambda kv: kv[0] != first) if e["config"]]
    if config_errors:  # e.g. a strategy rejecting its options inside seqpar.init
        raise ValueError(config_errors[0]["message"])
    rank = first if first is not None else min(errors, default=0)
    if errors.get(rank, {}).get("one_line"):
        print(f"seqpar train: {errors[rank]['message']}", file=sys.stderr)
        return 1
    if rank in errors:
        print(errors[rank]["traceback"].rstrip(), file=sys.stderr)
        what = errors[rank]["message"].splitlines()[0] if errors[rank]["message"] else "an error"
    else:
        code = outcome.exitcodes[rank]
        what = (f"killed by {control.signal_name(-code)}" if code is not None and code < 0
                else f"exit code {code}")
    print(f"seqpar train: rank {rank} failed ({what}); stopped the other workers{resume}", file=sys.stderr)
    return 1


def launch_local(cfg: TrainConfig, signals: control.SignalCatcher | None = None) -> int:
    """Spawn cfg.parallel.nproc gloo workers (file:// rendezvous) and supervise them; returns the exit code."""
    with contextlib.ExitStack() as stack:
        signals = signals or stack.enter_context(control.SignalCatcher())
        control_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="seqpar-train-"))
        procs = []
        try:
            procs += start_ranks(_local_worker, cfg.parallel.nproc,
                                 lambda rank: (rank, cfg.parallel.nproc, control_dir, cfg.to_dict(), os.getpid()))
            outcome = control.supervise(procs, control_dir, signals, stall=control.stall_limit(cfg),
                                        startup_limit=cfg.faults.timeout, stop_grace=cfg.faults.stop_grace)
        finally:
            for p in procs:
                if p.pid is not None and p.exitcode is None:
                    p.kill()
                    p.join()
    return _report(outcome, cfg)


# -- torchrun ---------------------------------------------------------------------------------------------
def _init_torchrun_group(cfg: TrainConfig) -> None:
    """The torchrun world's default group, once: `--auto-profile` opens it before training, which
    then keeps it (a second init_process_group on torchrun's store would wait forever)."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.faults.timeout))


def launch_torchrun(cfg: TrainConfig) -> int:
    """Under torchrun: NCCL on GPUs (one per local rank), gloo otherwise; returns the exit code.

    Only the gloo/CPU path is tested: the NCCL/GPU path has never been run in this project (no
    GPU was available). torchrun forwards SIGTERM to every worker; each stops after the same
    step and saves a checkpoint, and rank 0 prints where it is. Workers die with their agent.
    """
    control.install_stop_handlers()
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # started by torchrun's agent: die with it
        control.die_with_parent(os.getppid())
    _init_torchrun_group(cfg)
    try:
        train(cfg)
    except CheckpointWriteError as e:
        if dist.get_rank() == 0:
            print(f"seqpar train: {e}", file=sys.stderr)
        return 1
    except control.TrainingStopped as stop:
        if dist.get_rank() == 0:
            print(control.stop_message(stop.signum, stop.step, stop.checkpoint, stop.reason,
                                       _latest(cfg)), file=sys.stderr)
        return 128 + stop.signum
    finally:
        dist.destroy_process_group()
    return 0


def resolve_auto(cfg: TrainConfig, world: int, lead: bool = True, under_torchrun: bool = False) -> TrainConfig:
    """--strategy auto -> the planner's choice on this world's calibration (train/auto.py);
    other strategies unchanged. Under torchrun every rank reads the same calibration file and
    so makes the same choice; locally a missing calibration is measured once and saved."""
    if cfg.parallel.strategy != AUTO:
        return cfg
    cfg.validate(world)
    if under_torchrun and not cfg.calibration_path().is_file():
        raise ValueError("--strategy auto under torchrun needs --calibration FILE (run `seqpar plan --calibrate` "
                         "under the same torchrun first)")
    if lead and not cfg.calibration_path().is_file():
        print(f"seqpar train: --strategy auto: calibrating this {cfg.sp_size(world)}-rank world once "
              f"(saved to {cfg.calibration_path()})", file=sys.stderr)
    calibration = ensure_calibration(cfg, world)
    ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or None
    if not cfg.parallel.auto_profile or needs_no_plan(cfg, world):
        cfg, line = choose(cfg, world, calibration, ranks_per_node)
        if lead:
            print(f"seqpar train: {line}", file=sys.stderr)
        return cfg
    if under_torchrun:  # the profile and the run share one default group
        _init_torchrun_group(cfg)
    return _measured_choice(cfg, world, calibration, ranks_per_node, lead, under_torchrun)


def _measured_choice(cfg: TrainConfig, world: int, calibration, ranks_per_node: int | None, lead: bool,
                     under_torchrun: bool) -> TrainConfig:
    """--auto-profile K: the profile's trainers read the run's (prepared) data and write under
    the output directory, so they run under its lock as training does (rank 0 takes it and
    prints; one process per node prepares a corpus)."""
    check_out_dir(cfg.output.out_dir)
    with control.RunLock(cfg.output.out_dir) if lead else contextlib.nullcontext() as lock:
        if lead and lock.note:
            print(lock.note, file=sys.stderr)
        prepares = not under_torchrun or int(os.environ.get("LOCAL_RANK", "0")) == 0
        data = resolve_inputs(cfg, prepares).data.data
        chosen, report, line = choose_by_measurement(cfg, world, calibration, data, ranks_per_node, write=lead)
    if lead:
        print(format_step_profile(report), file=sys.stderr)
        print(f"seqpar train: {line}", file=sys.stderr)
    return chosen


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun else cfg.parallel.nproc
    if args.print_config:
        cfg.validate(world)
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    cfg = resolve_auto(cfg, world, not under_torchrun or int(os.environ["RANK"]) == 0, under_torchrun)
    if under_torchrun:  # every rank checks; local rank 0 prepares a corpus, the others wait; rank 0 locks
        lead = int(os.environ["RANK"]) == 0
        check(cfg, world, "cuda" if torch.cuda.is_available() else "cpu")
        with control.RunLock(cfg.output.out_dir) if lead else contextlib.nullcontext() as lock:
            cfg = resolve_inputs(cfg, int(os.environ.get("LOCAL_RANK", "0")) == 0)
            for note in (lock.note if lead else None, resume_note(cfg) if lead else None):
                if note:
                    print(note, file=sys.stderr)
            if lead:
                print(f"seqpar train: {world} torchrun ranks, strategy {cfg.parallel.strategy} on "
                      f"{cfg.parallel.mesh_description(world)}", file=sys.stderr)
            return launch_torchrun(cfg)
    with control.SignalCatcher() as signals:
        check(cfg, world)
        with control.RunLock(cfg.output.out_dir) as lock:
            cfg = resolve_inputs(cfg)
            for note in (lock.note, resume_note(cfg)):
                if note:
                    print(note, file=sys.stderr)
            if signals.received:
                print(control.stop_message(signals.received[0], None, None, "before training started",
                                           _latest(cfg)), file=sys.stderr)
                return 128 + signals.received[0]
            par = cfg.parallel
            print(f"seqpar train: {par.nproc} local gloo processes, strategy {par.strategy} on "
                  f"{par.mesh_description(world)}, {cfg.model.kind}, seq_len {cfg.sequence_length()}, "
                  f"data {cfg.data.data or '-'}, {documents_note(cfg)}, out {cfg.output.out_dir}", file=sys.stderr)
            return launch_local(cfg, signals)
