"""`seqpar train`: parity with 1 process, resume, data loading, configs, errors, CLI end to end.

Training parity runs a few steps of the real training loop in fp64 on 4 gloo processes
and compares every step's global mean loss and gradient norm with a 1-process run of the
same global batch (tolerance 1e-9 relative: a few AdamW steps amplify 1e-16 rounding only
mildly), and every parameter's gradient of the first step, unclipped, within 1e-10 of the
largest reference value. Losses alone cannot see a uniform gradient scale (AdamW and
clipping divide it out): the gradient checks catch gradients summed instead of averaged.
Replicated parameters must end bitwise identical on every rank (gradient sync works).
bf16 (autocast) is compared with a 1-process bf16 run within 2e-2 relative.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from checks.train import STRATEGY_CASES, ddp_gradient_sync, loader_sharding, run_training, training_error
from seqpar.data import SequenceLoader, open_tokens, split_tokens, stdlib_corpus, write_token_file
from seqpar.train import TrainConfig, build_config, load_config

PARITY_TOL = 1e-9
GRAD_TOL = 1e-10
BASE = dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=64, batch=2, steps=3,
            warmup=1, lr=1e-2, min_lr=1e-3, dtype="float64", eval_every=0, eval_batches=1, checkpoint_every=0,
            progress=False, plot=False, layout="contiguous", strategy="local")

PARITY_CASES = STRATEGY_CASES  # TrainConfig overrides use the seqpar.init names


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(stdlib_corpus(tmp_path_factory.mktemp("corpus"), max_bytes=60_000))


def config(corpus, out_dir, **overrides):
    return {**BASE, "data": corpus, "out_dir": str(out_dir), **overrides}


@pytest.fixture(scope="module")
def reference(worlds, corpus, tmp_path_factory):
    """1 process, full sequence, the whole global batch (2 sequences); with first-step gradients."""
    return worlds.run(1, run_training, config(corpus, tmp_path_factory.mktemp("ref")), gradients=True)[0]


def assert_losses_match(got, ref, rel=PARITY_TOL):
    assert len(got) == len(ref) == BASE["steps"]
    for step, (a, b) in enumerate(zip(got, ref), 1):
        assert abs(a - b) <= rel * abs(b), f"step {step}: loss {a!r} vs 1-process {b!r}"


def grad_norms(result):
    return [r["grad_norm"] for r in result["records"] if r["type"] == "train"]


def assert_gradients_match(got, ref, rel=PARITY_TOL):
    """Per-step global gradient norms (before clipping) and the first step's unclipped gradients."""
    norms, ref_norms = grad_norms(got), grad_norms(ref)
    assert len(norms) == len(ref_norms) == BASE["steps"]
    for step, (a, b) in enumerate(zip(norms, ref_norms), 1):
        assert abs(a - b) <= rel * abs(b), f"step {step}: grad_norm {a!r} vs 1-process {b!r}"
    grads, ref_grads = got["first_step_grads"], ref["first_step_grads"]
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        bound = GRAD_TOL * max(1.0, ref_grads[name].abs().max().item())
        err = (g - ref_grads[name]).abs().max().item()
        assert err <= bound, f"first-step grad of {name}: max abs error {err:.3e} > {bound:.1e}"


def assert_replicas_identical(results):
    """Every rank's parameters after training are bitwise equal (fails if gradient sync is broken)."""
    digests = [r["param_digest"] for r in results]
    assert len(set(digests)) == 1, f"ranks' parameters differ after training: {digests}"


def test_reference_gradients_are_informative(reference):
    """The 1-process reference itself: real, unclipped gradients (clip 1.0 would bite at these norms)."""
    norms = grad_norms(reference)
    assert all(n > 1.0 for n in norms[:1]), norms  # so clipping is active in the parity runs
    grads = reference["first_step_grads"]
    total = sum(float(g.double().pow(2).sum()) for g in grads.values()) ** 0.5
    assert abs(total - norms[0]) <= 1e-9 * norms[0]  # unclipped gradients of step 1 == its recorded norm


@pytest.mark.parametrize("strategy,overrides", PARITY_CASES, ids=[s for s, _ in PARITY_CASES])
def test_parity_with_one_process(worlds, corpus, tmp_path, reference, strategy, overrides):
    results = worlds.run(4, run_training, config(corpus, tmp_path, strategy=strategy, **overrides), gradients=True)
    assert_replicas_identical(results)
    assert_losses_match(results[0]["losses"], reference["losses"])
    assert_gradients_match(results[0], reference)
    assert results[0]["losses"][-1] < results[0]["losses"][0]  # it trains
    (step, val), = results[0]["val_losses"]
    assert step == BASE["steps"] and abs(val - reference["val_losses"][0][1]) <= PARITY_TOL * val


def test_parity_dp_x_sp(worlds, corpus, tmp_path, reference):
    """dp=2 x sp=2: one sequence per data-parallel rank == the 2-sequence batch on 1 process."""
    results = worlds.run(4, run_training, config(corpus, tmp_path, strategy="ring", dp=2, batch=1,
                                                 layout="zigzag"), gradients=True)
    assert_replicas_identical(results)
    assert_losses_match(results[0]["losses"], reference["losses"])
    assert_gradients_match(results[0], reference)


def test_parity_fsdp_checkpointing_chunked(worlds, corpus, tmp_path, reference):
    """FSDP2 parameter sharding + activation checkpointing + FPDT chunked MLP/loss, still exact."""
    results = worlds.run(4, run_training, config(corpus, tmp_path, strategy="usp", ulysses=2, fsdp=True,
                                                 activation_checkpointing=True, mlp_chunks=2, loss_chunks=2),
                         gradients=True)
    assert_losses_match(results[0]["losses"], reference["losses"])
    assert_gradients_match(results[0], reference)  # full gradients gathered from FSDP's shards
    assert "fsdp_reduce_scatter_est" in results[0]["records"][0]["comm"]


@pytest.mark.parametrize("options", [dict(strategy="ring", layout="zigzag"),
                                     dict(strategy="fpdt", chunks=2, offload=True, chunked_blocks=True)],
                         ids=["ring", "fpdt-chunked-blocks"])
def test_bf16_parity(worlds, corpus, tmp_path, options):
    """bf16 autocast (the chunked blocks re-enter it for their recomputation) vs 1 process."""
    cfg = dict(dtype="bfloat16", steps=3)
    ref = worlds.run(1, run_training, config(corpus, tmp_path / "ref", **cfg))[0]
    got = worlds.run(4, run_training, config(corpus, tmp_path / "sp", **options, **cfg))[0]
    assert_losses_match(got["losses"], ref["losses"], rel=2e-2)


def test_resume_reproduces_losses(worlds, corpus, tmp_path):
    """6 steps straight == the same run resumed from its step-3 checkpoint (bitwise, fp32)."""
    cfg = config(corpus, tmp_path, strategy="ring", layout="zigzag", dtype="float32", steps=6,
                 checkpoint_every=3, eval_every=3)
    straight = worlds.run(4, run_training, cfg)[0]
    ckpt = tmp_path / "checkpoints" / "step_00000003"
    assert (ckpt / "meta.json").is_file() and (tmp_path / "checkpoints" / "latest").read_text().strip() == \
        "step_00000006"
    resumed = worlds.run(4, run_training, {**cfg, "resume": str(ckpt)})[0]
    assert resumed["losses"] == straight["losses"][3:]
    assert resumed["val_losses"] == straight["val_losses"][1:]
    steps = [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the log was cut back to the checkpoint, then continued
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("overrides,ddp", [(dict(strategy="ring", layout="zigzag"), True),
                                            (dict(strategy="ring", layout="zigzag", dp=2, batch=1), True),
                                            (dict(strategy="lss"), False), (dict(strategy="usp", fsdp=True), False)],
                         ids=["sp4", "dp2xsp2", "lss", "fsdp"])
def test_gradients_are_synced_by_ddp(worlds, corpus, tmp_path, overrides, ddp):
    """torch's DDP (composable replicate, one bucket fixed from the first step) averages the
    gradients over the dp x sp ranks: one all-reduce of 2 (n-1)/n x the gradient bytes per step,
    counted as grad_all_reduce. LSS keeps its double averaging (sp then dp) and FSDP its
    reduce-scatter."""
    results = worlds.run(4, ddp_gradient_sync, config(corpus, tmp_path, **overrides))
    for r in results:
        assert r["ddp"] is ddp, r
        if ddp:
            assert r["calls"] == 1 and r["sent"] == r["expected"] > 0, r
        else:
            assert r["calls"] == 0, r


def test_corrupt_or_missing_checkpoint_is_a_clear_error(worlds, corpus, tmp_path):
    cfg = config(corpus, tmp_path, strategy="ring", steps=2, checkpoint_every=2)
    worlds.run(4, run_training, cfg)
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    shard = sorted(ckpt.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    errors = worlds.run(4, training_error, {**cfg, "resume": "latest", "steps": 3})
    assert all("corrupt" in e for e in errors), errors
    (ckpt / "meta.json").unlink()
    errors = worlds.run(4, training_error, {**cfg, "resume": str(ckpt), "steps": 3})
    assert all("incomplete" in e for e in errors), errors
    missing = worlds.run(4, training_error, {**cfg, "resume": str(tmp_path / "nope"), "steps": 3})
    assert all("does not exist" in e for e in missing), missing


@pytest.mark.parametrize("strategy,kwargs,dp", [("usp", {"ulysses": 2, "layout": "zigzag"}, 1),
                                                ("ring", {"layout": "striped"}, 2)])
def test_loader_shards_tokens_labels_positions(worlds, strategy, kwargs, dp):
    results = worlds.run(4, loader_sharding, strategy, kwargs, seq_len=48, batch=2, dp=dp)
    for r in results:
        assert r["tokens"] and r["labels"] and r["roundtrip"], r
        assert r["loader_state"] == {"seed": 7, "step": 2}
    for d in range(dp):  # the sp ranks of one dp rank cover every position once, same samples
        group = [r for r in results if r["dp_rank"] == d]
        assert sorted(p for r in group for p in r["positions"]) == list(range(48))
        assert all(r["offsets"] == group[0]["offsets"] for r in group)
    if dp == 2:  # data-parallel ranks read different samples
        assert results[0]["offsets"] != results[2]["offsets"]


def test_loader_state_resumes_the_same_batches():
    tokens = np.arange(1000, dtype=np.int64)
    a = SequenceLoader(tokens, 16, 2, vocab_size=1000, seed=3)
    batches = [a.next() for _ in range(4)]
    b = SequenceLoader(tokens, 16, 2, vocab_size=1000, seed=3)
    b.load_state_dict(SequenceLoader(tokens, 16, 2, vocab_size=1000, seed=3).state_dict() | {"step": 2})
    assert torch.equal(b.next(), batches[2]) and torch.equal(b.next(), batches[3])


def test_token_files_roundtrip_and_errors(tmp_path):
    tokens = np.arange(300) % 1000
    write_token_file(tmp_path / "t.bin", tokens, vocab_size=1000)
    data = open_tokens(tmp_path / "t.bin")
    assert data.vocab_size == 1000 and np.array_equal(data.tokens, tokens)
    np.save(tmp_path / "t.npy", tokens.astype(np.int32))
    assert np.array_equal(open_tokens(tmp_path / "t.npy").tokens, tokens)
    (tmp_path / "raw.txt").write_bytes(b"hello world")
    assert open_tokens(tmp_path / "raw.txt").vocab_size == 256

    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_tokens(tmp_path / "missing.bin")
    (tmp_path / "bad.bin").write_bytes(b"NOTATOKENFILE___" + b"\0" * 8)
    with pytest.raises(ValueError, match="bad magic"):
        open_tokens(tmp_path / "bad.bin")
    (tmp_path / "odd.bin").write_bytes((tmp_path / "t.bin").read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        open_tokens(tmp_path / "odd.bin")
    np.save(tmp_path / "f.npy", np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError, match="integer token array"):
        open_tokens(tmp_path / "f.npy")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        open_tokens(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="too few"):
        split_tokens(open_tokens(tmp_path / "raw.txt"), 0.1, seq_len=64)


def test_out_of_vocab_tokens_are_rejected():
    loader = SequenceLoader(np.arange(100, dtype=np.int64), 8, 1, vocab_size=50, seed=0)
    with pytest.raises(ValueError, match="vocab_size"):
        for _ in range(20):
            loader.next()


@pytest.mark.parametrize("text,suffix,message", [
    ('[model]\ndim = 64\nbogus = 1\n', ".toml", r"\[model\]: unknown key 'bogus'; valid keys"),
    ('[model]\ndim = "wide"\n', ".toml", "dim must be int"),
    ('[nonsense]\ndim = 64\n', ".toml", "unknown table or top-level key 'nonsense'"),
    ('dim = 64\n', ".toml", "top-level key 'dim'.*; it belongs in \\[model\\]"),
    ('[model]\nseq_len = 64\n', ".toml", r"\[model\]: unknown key 'seq_len'; it belongs in \[data\]"),
    ('[parallel]\nteam_size = 0\n', ".toml", "team_size must be >= 1"),
    ('dim = [\n', ".toml", "cannot parse"),
    ('model:\n  dim: 64\n  lr_typo: 1\n', ".yaml", "unknown key 'lr_typo'"),
])
def test_config_file_errors(tmp_path, text, suffix, message):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(str(path))


def test_config_files_and_flags_compose(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  dim: 64\nparallel:\n  strategy: usp\n  ulysses: 2\noptim:\n  lr: 1\n")
    cfg = build_config(["--config", str(tmp_path / "c.yaml"), "--ulysses", "4", "--no-plot"])
    got = (cfg.model.dim, cfg.parallel.strategy, cfg.parallel.options.ulysses, cfg.optim.lr, cfg.output.plot)
    assert got == (64, "usp", 4, 1.0, False)
    assert build_config(["--config", "tiny"]).model.dim == load_config("tiny").model.dim == 64  # packaged config
    with pytest.raises(FileNotFoundError, match="packaged configs"):
        load_config("no-such-config")


@pytest.mark.parametrize("overrides,message", [
    ({"dp": 3}, "must equal the number of processes"),
    ({"seq_len": 102}, "multiple of"),  # wallfacer 2 teams of 2, zigzag: multiples of 4
    ({"strategy": "nope"}, "unknown strategy"),
    ({"dtype": "float16"}, "unknown dtype"),
    ({"lr": 0.0}, "lr > 0"),
    ({"strategy": "local"}, "needs sp = 1"),
    ({"n_heads": 6}, "divisible by n_heads"),
])
def test_bad_configs_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.of(**overrides).validate(world=4)


def test_cli_end_to_end(tmp_path):
    """`seqpar train` spawns its own 2-process gloo world: JSONL log, checkpoint, PNG."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "seqpar", "train", "--config", "tiny", "--nproc", "2", "--steps", "4",
           "--out-dir", str(out), "--checkpoint-every", "2", "--corpus-bytes", "60000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "tokens_per_s", "mfu", "peak_mem_mb", "comm_bytes", "lr"):
        assert all(r[key] > 0 for r in train), key
    assert train[0]["comm"]["grad_all_reduce"] > 0 and any(r["type"] == "val" for r in records)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = subprocess.run(cmd[:-2] + ["--seq-len", "30"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error: seq_len 30 must be a multiple" in bad.stderr


def test_mfu_divides_by_one_machine_peak_whatever_the_process_count(worlds, corpus, tmp_path):
    """1 and 4 processes on the same job: the same machine peak (measured once with all cores and
    cached per machine), and MFU = world-total model FLOPs / (peak * step seconds), so the MFU ratio
    of the two runs is their tokens/s ratio (before: a per-run probe, 0.168 vs 0.501 at similar
    tokens/s)."""
    from seqpar.metrics import peak_cache_path, training_flops_per_token
    runs = {}
    for n, strategy in ((1, "local"), (4, "ulysses")):
        cfg = config(corpus, tmp_path / f"run{n}", strategy=strategy, dtype="float32", steps=2, peak_tflops=0.0)
        train = [r for r in worlds.run(n, run_training, cfg)[0]["records"] if r["type"] == "train"]
        runs[n] = json.loads((tmp_path / f"run{n}" / "config.json").read_text()), train
    (info1, train1), (info4, train4) = runs[1], runs[4]
    assert info1["peak_tflops"] == info4["peak_tflops"] > 0 and info1["machines"] == info4["machines"] == 1
    assert "cached" in info1["peak_source"] and "cached in" in info4["peak_source"]
    assert peak_cache_path().is_file()
    cfg = TrainConfig.of(**config(corpus, tmp_path))
    flops = training_flops_per_token(cfg.model_config(), cfg.data.seq_len, causal=True)
    for r in train1 + train4:
        tokens = r["tokens_per_s"] * r["step_time_s"]
        assert r["mfu"] == pytest.approx(flops * tokens / (info1["peak_tflops"] * 1e12 * r["step_time_s"]), rel=1e-9)
    mfu_ratio = train4[-1]["mfu"] / train1[-1]["mfu"]
    assert mfu_ratio == pytest.approx(train4[-1]["tokens_per_s"] / train1[-1]["tokens_per_s"], rel=1e-6)


def test_packaged_default_config_is_the_default():
    assert load_config("default") == TrainConfig()


def test_cli_reports_errors_found_inside_workers(tmp_path):
    """A strategy rejecting its configuration in the workers is a one-line error, exit code 2."""
    cmd = [sys.executable, "-m", "seqpar", "train", "--config", "tiny", "--nproc", "2", "--strategy", "ulysses",
           "--dim", "40", "--n-heads", "5", "--n-kv-heads", "5", "--out-dir", str(tmp_path), "--corpus-bytes",
           "60000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "error: Ulysses degree 2 must divide the number of attention heads (5)" in proc.stderr


def test_a_batch_without_labels_is_a_clear_error(worlds):
    from checks.train import empty_batch_error
    assert all("no labelled tokens" in e for e in worlds.run(2, empty_batch_error))


def test_docs_list_every_config_key():
    """docs/training.md's config table is the one generated from the sections' fields (a new or
    renamed key, flag, default or help text must reach the docs)."""
    from pathlib import Path

    from seqpar.train.config import config_table
    docs = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    assert config_table() in docs, "regenerate the table: python3 -c 'from seqpar.train.config import " \
                                   "config_table; print(config_table())'"
