"""Fault handling of `seqpar train`: non-finite training and checkpoint integrity.

Non-finite training has a real cause here, no fault injection: a run resumed from a good
checkpoint with lr = 1e30 (float32) applies one huge AdamW update, after which the next
backward gives a NaN gradient norm. Checkpoint corruption is real damage to the files: 4 KiB
flipped inside a tensor of a DCP shard, or a truncated `.metadata`.

Every test runs a tiny model (2 layers, dim 32, 64 tokens) on a 2-rank gloo world.
"""
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from checks.train import run_training, training_error
from seqpar.data import stdlib_corpus
from seqpar.train import TrainConfig, Trainer, build_config
from seqpar.train.config import FLAGS

WORLD = 2
BASE = dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=64, batch=2, warmup=1, lr=1e-2,
            min_lr=1e-3, dtype="float32", eval_every=0, eval_batches=1, progress=False, plot=False, strategy="ring",
            layout="zigzag", nproc=WORLD)
HUGE_LR = dict(lr=1e30, min_lr=0.0)  # one AdamW step moves every weight by ~1e30: the next backward is NaN
LATEST_NAME = "latest"
FLOAT_FIELDS = [name for name, flag in FLAGS.items() if flag.kind is float]


def file_digest(path):
    data = open(path, "rb").read()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def ckpt_name(step):
    return f"step_{step:08d}"


def strict_records(path):
    """Parse a JSON-lines file as strict JSON (RFC 8259): NaN / Infinity tokens are an error."""
    def reject(token):
        raise ValueError(f"non-standard JSON token {token} in {path}")
    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def train_records(out_dir):
    return [r for r in strict_records(out_dir / "metrics.jsonl") if r["type"] == "train"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(stdlib_corpus(tmp_path_factory.mktemp("corpus"), max_bytes=60_000))


@pytest.fixture(scope="module")
def good_run(worlds, corpus, tmp_path_factory):
    """4 healthy steps with checkpoints at steps 2 and 4: (config, losses)."""
    out = tmp_path_factory.mktemp("good")
    cfg = {**BASE, "data": corpus, "out_dir": str(out), "steps": 4, "checkpoint_every": 2, "keep_checkpoints": 2}
    return cfg, worlds.run(WORLD, run_training, cfg)[0]["losses"]


@pytest.fixture
def run_copy(good_run, tmp_path):
    """A private copy of the good run's directory, and its config pointing there."""
    cfg, _ = good_run
    shutil.copytree(cfg["out_dir"], tmp_path / "run")
    return {**cfg, "out_dir": str(tmp_path / "run")}, tmp_path / "run"


def one_error(errors):
    assert len(set(errors)) == 1, errors  # every rank raised the same error
    assert "\n" not in errors[0], errors[0]
    return errors[0]


# -- non-finite hyper-parameters -----------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_nonfinite_hyperparameters_are_rejected(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be a finite number"):
        TrainConfig.of(**{name: value}).validate(world=4)


def test_nonfinite_strategy_option_is_rejected():
    with pytest.raises(ValueError, match="strategy option scale must be a finite number"):
        build_config(["--strategy-option", "scale=nan"]).validate(world=4)


def test_nonfinite_values_in_config_files_and_flags_are_rejected(tmp_path):
    """TOML `nan`/`inf` literals and `--lr inf` never reach training: one line, exit code 2."""
    (tmp_path / "c.toml").write_text("[optim]\ngrad_clip = nan\nweight_decay = inf\n")
    with pytest.raises(ValueError, match="weight_decay must be a finite number|grad_clip must be a finite number"):
        build_config(["--config", str(tmp_path / "c.toml")]).validate(world=4)
    cmd = [sys.executable, "-m", "seqpar", "train", "--config", "tiny", "--nproc", "1", "--strategy", "local",
           "--steps", "1", "--corpus-bytes", "60000", "--no-plot", "--out-dir", str(tmp_path / "run"), "--lr", "inf"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == "seqpar train: error: lr must be a finite number, got inf"


# -- non-finite training ----------------------------------------------------------------------------------
def test_nonfinite_run_stops_keeps_the_good_checkpoint_and_strict_log(worlds, run_copy):
    """Resumed at step 4 with lr 1e30 and no clipping: step 5 applies a ~1e30 update, step 6's gradient
    norm is NaN (found although clipping is off). The run stops at step 6 with one line naming the
    step, loss and norm and the last good checkpoint; nothing is written for step 6, the good
    checkpoints and `latest` stay; metrics.jsonl is strict JSON (the bad step's norm is null)."""
    cfg, out = run_copy
    cfg = {**cfg, **HUGE_LR, "grad_clip": 0.0, "steps": 10, "resume": "latest"}
    error = one_error(worlds.run(WORLD, training_error, cfg))
    good = out / "checkpoints" / ckpt_name(4)
    assert re.search(r"non-finite training at step 6: loss \S+, grad norm nan; --nonfinite stop", error), error
    assert f"the last checkpoint is '{good}' (resume with --resume {good}" in error, error
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [LATEST_NAME, ckpt_name(2), ckpt_name(4)]
    assert (ckpts / LATEST_NAME).read_text().strip() == ckpt_name(4)
    records = train_records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert math.isfinite(records[4]["grad_norm"]) and records[5]["grad_norm"] is None and records[5]["skipped"]
    assert all(r["grad_norm"] is not None for r in records[:5])  # computed (finite) without clipping too


def checkpoint_tensors(path, tmp_path):
    """Model weights and AdamW state of a DCP checkpoint, read in this process (no process group)."""
    dcp_to_torch_save(path, tmp_path / f"{path.name}.pt")
    state = torch.load(tmp_path / f"{path.name}.pt", weights_only=False)
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    for name, moments in state["optim"]["state"].items():
        flat.update({f"optim.{name}.{k}": v for k, v in moments.items()})
    return flat


def test_skip_mode_skips_without_updating_and_stops_after_max_skips(worlds, run_copy, tmp_path):
    """--nonfinite skip: steps 6 and 7 are non-finite and skipped (no update: their checkpoints hold
    step 5's weights and moments), the run goes on and checkpoints them; the 3rd consecutive
    non-finite step (8) exceeds --max-skips 2 and stops the run."""
    cfg, out = run_copy
    cfg = {**cfg, **HUGE_LR, "steps": 10, "resume": "latest", "nonfinite": "skip", "max_skips": 2,
           "checkpoint_every": 1, "keep_checkpoints": 0}
    error = one_error(worlds.run(WORLD, training_error, cfg))
    assert "non-finite training at step 8" in error and "3 consecutive non-finite steps" in error, error
    records = train_records(out)
    assert [(r["step"], r["skipped"]) for r in records[4:]] == [(5, False), (6, True), (7, True), (8, True)]
    assert all(r["grad_norm"] is None for r in records[5:])
    ckpts = out / "checkpoints"
    assert (ckpts / LATEST_NAME).read_text().strip() == ckpt_name(7) and not (ckpts / ckpt_name(8)).exists()
    states = [checkpoint_tensors(ckpts / ckpt_name(s), tmp_path) for s in (5, 6, 7)]
    assert states[0].keys() == states[1].keys() == states[2].keys() and len(states[0]) > 20
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]) and torch.equal(value, states[2][name]), name


def poisoned_save(cfg):
    """Rank 1 alone holds a NaN weight: Trainer.save must refuse on every rank (collective decision)."""
    import torch.distributed as dist
    trainer = Trainer(TrainConfig.of(**cfg))
    if dist.get_rank() == 1:
        with torch.no_grad():
            next(trainer.model.parameters()).view(-1)[0] = float("nan")
    try:
        trainer.save()
    except ValueError as e:
        return str(e)
    return ""


def test_nonfinite_weights_are_never_checkpointed(worlds, run_copy):
    cfg, out = run_copy
    errors = worlds.run(WORLD, poisoned_save, {**cfg, "resume": "latest"})
    assert all("non-finite weights or optimizer state at step 4: not writing a checkpoint" in e for e in errors), errors
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [LATEST_NAME, ckpt_name(2), ckpt_name(4)]


# -- checkpoint integrity ----------------------------------------------------------------------------------
def flip_tensor_bytes(shard, nbytes=4096):
    """Invert `nbytes` in the middle of the largest tensor stored in a DCP shard (located with the
    checkpoint's .metadata), where only a checksum can notice: the file still loads."""
    meta = pickle.loads((shard.parent / ".metadata").read_bytes())
    offset, length = max((v.offset, v.length) for v in meta.storage_data.values()
                         if v.relative_path == shard.name and v.length >= 4 * nbytes)
    data = bytearray(shard.read_bytes())
    start = offset + (length - nbytes) // 2
    data[start:start + nbytes] = bytes(b ^ 0xFF for b in data[start:start + nbytes])
    shard.write_bytes(bytes(data))


def test_meta_json_records_a_checksum_of_every_file(good_run):
    ckpt = good_run[0]["out_dir"] + "/checkpoints/" + ckpt_name(4)
    meta = json.loads(open(f"{ckpt}/meta.json").read())
    names = sorted(n for n in os.listdir(ckpt) if n != "meta.json")
    assert sorted(meta["files"]) == names
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rng_rank1.pt"} <= set(names)
    assert all(meta["files"][n] == file_digest(f"{ckpt}/{n}") for n in names)
    assert len(meta["meta_sha256"]) == 64


def test_flipped_shard_is_refused_naming_the_intact_checkpoint_which_resumes_bitwise(worlds, run_copy, good_run):
    cfg, out = run_copy
    ckpts = out / "checkpoints"
    flip_tensor_bytes(ckpts / ckpt_name(4) / "__0_0.distcp")
    error = one_error(worlds.run(WORLD, training_error, {**cfg, "resume": "latest", "steps": 6}))
    intact = ckpts / ckpt_name(2)
    assert error.split(": ", 1)[1] == (f"checkpoint '{ckpts / ckpt_name(4)}' is corrupt: __0_0.distcp fails its sha256 "
                     f"checksum; the newest intact checkpoint is '{intact}': resume from it with --resume {intact}")
    resumed = worlds.run(WORLD, run_training, {**cfg, "resume": error.rsplit("--resume ", 1)[1]})[0]
    assert resumed["losses"] == good_run[1][2:]  # steps 3, 4 again, bitwise
    assert not any(file_digest(ckpts / ckpt_name(4) / n) != d for n, d in
                   json.loads((ckpts / ckpt_name(4) / "meta.json").read_text())["files"].items())  # rewritten


def cli(run_cfg, out, *extra):
    keys = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "seq_len", "batch", "warmup", "lr", "min_lr",
            "eval_every", "eval_batches", "strategy", "layout", "nproc", "data", "checkpoint_every")
    flags = [a for k in keys for a in (f"--{k.replace('_', '-')}", str(run_cfg[k]))]
    cmd = [sys.executable, "-m", "seqpar", "train", *flags, "--no-plot", "--no-progress", "--out-dir", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_truncated_metadata_is_one_line_through_the_cli(run_copy):
    cfg, out = run_copy
    meta = out / "checkpoints" / ckpt_name(4) / ".metadata"
    size = meta.stat().st_size
    meta.write_bytes(meta.read_bytes()[: size // 2])
    proc = cli(cfg, out, "--resume", "latest", "--steps", "6")
    intact = out / "checkpoints" / ckpt_name(2)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        f"seqpar train: error: checkpoint '{out / 'checkpoints' / ckpt_name(4)}' is corrupt: .metadata has "
        f"{size // 2} bytes, meta.json records {size}; the newest intact checkpoint is '{intact}': resume from it "
        f"with --resume {intact}"]


def test_flipped_shard_is_one_error_line_through_the_cli(run_copy):
    """Caught inside the workers (the launcher only checks sizes): still one error line, no traceback."""
    cfg, out = run_copy
    flip_tensor_bytes(out / "checkpoints" / ckpt_name(4) / "__1_0.distcp")
    proc = cli(cfg, out, "--resume", "latest", "--steps", "6")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert all(line.startswith("seqpar train: ") for line in lines), proc.stderr  # notes, banner, the error
    errors = [line for line in lines if line.startswith("seqpar train: error:")]
    intact = out / "checkpoints" / ckpt_name(2)
    assert errors == [f"seqpar train: error: checkpoint '{out / 'checkpoints' / ckpt_name(4)}' is corrupt: "
                      f"__1_0.distcp fails its sha256 checksum; the newest intact checkpoint is '{intact}': resume "
                      f"from it with --resume {intact}"], proc.stderr


def test_a_failed_checkpoint_write_is_one_agreed_line_and_leaves_nothing(worlds, tmp_path):
    """ENOSPC on one rank only (its RNG file): every rank raises the same one-line error naming the
    cause, the directory and its free space; the partial .tmp-step_* directory is gone and the
    previous checkpoint stays the latest."""
    from checks.train import checkpoint_write_failure
    from seqpar.data import stdlib_corpus
    corpus = str(stdlib_corpus(tmp_path / "corpus", max_bytes=60_000))
    cfg = dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=64, batch=1, steps=2,
               warmup=1, strategy="ring", progress=False, plot=False, data=corpus, out_dir=str(tmp_path / "run"),
               checkpoint_every=0, eval_batches=1)
    results = worlds.run(2, checkpoint_write_failure, cfg, 1)
    messages = {r["message"] for r in results}
    assert len(messages) == 1
    message, = messages
    assert message.startswith("checkpoint step 2 not written: No space left on device in ")
    assert "MiB free of" in message and "step_00000001' is kept" in message and "\n" not in message
    assert results[0]["left"] == ["latest", "step_00000001"] and results[0]["latest"] == "step_00000001"


@pytest.fixture
def small_disk(tmp_path):
    """A 2.5 MiB tmpfs (root only: skipped where mounting is not allowed): room for one checkpoint
    of the tiny config on 2 ranks (1.7 MiB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()[:100]}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("first_fits", [True, False], ids=["second-checkpoint", "first-checkpoint"])
def test_a_full_disk_stops_the_run_with_one_line(tmp_path, small_disk, first_fits):
    """`seqpar train` on a full disk: rc 1, one line (no tracebacks), nothing partial left; the
    checkpoint that fitted stays the latest."""
    from seqpar.data import stdlib_corpus
    corpus = stdlib_corpus(tmp_path / "corpus", max_bytes=60_000)
    if not first_fits:  # fill the disk so that not even the first checkpoint fits
        (small_disk / "ballast").write_bytes(b"\0" * (2 * 2**20))
    out = small_disk / "run"
    cmd = [sys.executable, "-m", "seqpar", "train", "--config", "tiny", "--nproc", "2", "--steps", "3",
           "--out-dir", str(out), "--checkpoint-every", "1", "--keep-checkpoints", "1", "--data", str(corpus),
           "--no-progress", "--no-plot"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "Traceback" in line or "not written" in line]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "MiB free of 2.5 MiB" in lines[0], \
        proc.stderr[-2000:]
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert not [n for n in left if n.startswith(".tmp-")], left
    if first_fits:
        assert "step_00000001' is kept" in lines[0] and left == ["latest", "step_00000001"]
    else:
        assert "no earlier checkpoint" in lines[0] and "step_00000001" not in left
