"""FPDT: exact vs single-device fp64 attention on real gloo worlds, host-offload path, errors.

Tolerances: fp64 1e-10 absolute; fp32 1e-5 and bf16 2e-2 relative to the reference's
largest value (bf16 inputs and outputs, fp32 softmax accumulation).
"""
import pytest

from checks.attention import expect_error
from checks.fpdt import attention_memory, offload_behaviour
from seqpar.testing.checks import attention_exactness

TOL = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2e-2}
GRADS = ("out", "lse", "dq", "dk", "dv")


def assert_exact(r, dtype):
    for name in GRADS:
        bound = TOL[dtype] * (1.0 if dtype == "float64" else max(1.0, r[name + "_ref"]))
        assert r[name] <= bound, f"{name}: {r[name]:.3e} > {bound:.1e}"
    assert r["dtype_ok"] == 1.0


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("chunks", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("offload", [False, True])
def test_fpdt_exact_fp64(worlds, world, chunks, causal, offload):
    # kv_heads=2: native GQA on 2 ranks, K/V head replication on 4 ranks
    results = worlds.run(world, attention_exactness, "fpdt", {"chunks": chunks, "offload": offload},
                         seq=32, heads=4, kv_heads=2, causal=causal)
    for r in results:
        assert_exact(r, "float64")


@pytest.mark.parametrize("dtype,causal", [("float32", True), ("bfloat16", True), ("bfloat16", False)])
def test_fpdt_exact_low_precision(worlds, dtype, causal):
    results = worlds.run(4, attention_exactness, "fpdt", {"chunks": 2, "offload": True}, seq=64, heads=8,
                         kv_heads=1, dtype=dtype, causal=causal)
    for r in results:
        assert_exact(r, dtype)


@pytest.mark.parametrize("chunks", [1, 4])
def test_fpdt_moves_exactly_ulysses_bytes(worlds, chunks):
    kw = dict(seq=32, heads=4, kv_heads=1, causal=True)
    fpdt = worlds.run(4, attention_exactness, "fpdt", {"chunks": chunks, "offload": True}, **kw)
    ulysses = worlds.run(4, attention_exactness, "ulysses", {}, **kw)
    assert [r["bytes_sent"] for r in fpdt] == [r["bytes_sent"] for r in ulysses]


@pytest.mark.parametrize("causal", [False, True])
def test_offload_keeps_every_chunk_on_the_host(worlds, causal):
    chunks = 4
    got = worlds.run(2, offload_behaviour, chunks, True, causal)
    for r in got:
        fwd, final, c = r["after_forward"], r["final"], r["chunk_bytes"]  # c: one q chunk (fp32)
        lse = c // 8  # [h/P, C] fp32 vs [C, h/P, head_dim=8]
        pairs = chunks * (chunks + 1) // 2 if causal else chunks * chunks
        assert fwd["device_bytes"] == 0 and fwd["device_peak"] == 0
        assert fwd["host_bytes"] == chunks * (4 * c + lse)  # q, k, v, o and lse of every chunk
        assert fwd["to_device"] == chunks * c + pairs * 2 * c  # each q once, k/v once per visible pair
        assert final["host_bytes"] == 0  # released after backward
        assert final["to_device"] > fwd["to_device"] and final["to_host"] > fwd["to_host"]


def test_without_offload_chunks_stay_on_device_and_no_grad_keeps_nothing(worlds):
    for r in worlds.run(2, offload_behaviour, 4, False, True):  # every rank
        c = r["chunk_bytes"]
        assert r["after_forward"]["host_peak"] == 0
        assert r["after_forward"]["device_bytes"] == 4 * (4 * c + c // 8)  # q, k, v, o and lse of 4 chunks
        assert r["final"]["device_bytes"] == 0
    for r in worlds.run(2, offload_behaviour, 4, True, True, grad=False):
        assert r["after_forward"]["host_bytes"] == 0  # nothing kept for a backward that never comes
        assert r["after_forward"]["host_peak"] > 0 and r["final"]["host_bytes"] == 0


def test_offload_frees_device_memory_between_forward_and_backward(worlds):
    """Measured independently of the store's own counters (StorageMeter on torch's ops)."""
    kw = dict(seq=256, heads=4, head_dim=8)
    offloaded = worlds.run(2, attention_memory, "fpdt", {"chunks": 4, "offload": True}, **kw)
    on_device = worlds.run(2, attention_memory, "fpdt", {"chunks": 4, "offload": False}, **kw)
    for a, b in zip(offloaded, on_device):
        q_bytes = a["input_bytes"] // 3
        assert b["retained"] >= 4 * q_bytes  # q, k, v and o of every chunk stay on the device
        assert a["retained"] <= q_bytes  # at most in-flight all-to-all buffers (gloo frees them late)
        assert a["host_peak"] >= 4 * q_bytes and a["peak"] < b["peak"]


@pytest.mark.parametrize("kwargs, run, match", [
    ({"layout": "zigzag", "chunks": 2}, {}, "layout='contiguous'"),
    ({"ulysses": 2}, {}, "whole group"),
    ({"ring": 2}, {}, "whole group"),
    ({"team_size": 2}, {}, "does not use team_size=2"),
    ({"offload": "yes"}, {}, "offload"),
    ({"chunks": 0}, {}, "chunks must be >= 1"),
    ({"chunks": 4}, {"seq": 24}, "not divisible by 16"),
    ({"chunks": 2}, {"seq": 32, "heads": 6}, "must divide the number of attention heads"),
    ({"chunks": 2}, {"seq": 32, "heads": 6, "kv_heads": 3}, "must divide"),
])
def test_fpdt_rejects_bad_configuration(worlds, kwargs, run, match):
    errors = worlds.run(4, expect_error, "fpdt", kwargs, **run)
    assert all(match in e and e.startswith("ValueError") for e in errors), errors


def test_offloaded_activations_keep_no_block_inputs_on_the_device(worlds, tmp_path):
    """A whole training step (2 ranks, FPDT + chunked MLP/loss): with --offload-activations the
    forward leaves at least the block inputs (layers x tokens x dim x 4 bytes) less on the device
    than plain checkpointing, and the step is otherwise the same."""
    from checks.fpdt import training_step_memory
    cfg = dict(seq_len=512, batch=1, steps=2, warmup=1, eval_every=0, eval_batches=1, checkpoint_every=0,
               progress=False, plot=False, pack_documents=False, nproc=2, strategy="fpdt", chunks=2, offload=True,
               mlp_chunks=2, loss_chunks=2, dim=64, n_heads=4, n_kv_heads=2, n_layers=3, corpus_bytes=20_000)
    kept = {}
    for name, extra in (("ckpt", {"activation_checkpointing": True}), ("offload", {"offload_activations": True})):
        runs = worlds.run(2, training_step_memory, {**cfg, **extra, "out_dir": str(tmp_path / name)})
        kept[name] = min(r["retained"] for r in runs)  # a rank sometimes keeps one more [256, 64] a while
    block_inputs = 3 * 256 * 64 * 4
    assert kept["ckpt"] - kept["offload"] >= block_inputs, kept


def test_chunked_blocks_never_hold_a_whole_sequence_of_projections(worlds, tmp_path):
    """A whole training step (2 ranks): FPDT's per-chunk block pipeline peaks below the best unfused
    configuration (offloaded checkpoints + chunked MLP/loss) by at least one block's q, k, v and
    attention output over the local sequence, which the unfused recompute holds at once."""
    from checks.fpdt import training_step_memory
    dim, heads, kv_heads, local_tokens = 64, 4, 2, 256
    cfg = dict(seq_len=2 * local_tokens, batch=1, steps=2, warmup=1, eval_every=0, eval_batches=1,
               checkpoint_every=0, progress=False, plot=False, pack_documents=False, nproc=2, strategy="fpdt",
               chunks=4, offload=True, loss_chunks=4, dim=dim, n_heads=heads, n_kv_heads=kv_heads, n_layers=3,
               corpus_bytes=20_000)
    peak, host = {}, {}
    for name, extra in (("unfused", {"offload_activations": True, "mlp_chunks": 4}),
                        ("chunked_blocks", {"chunked_blocks": True}),
                        ("recompute", {"chunked_blocks": True, "offload_activations": True})):
        runs = worlds.run(2, training_step_memory, {**cfg, **extra, "out_dir": str(tmp_path / name)})
        peak[name], host[name] = max(r["activations"] for r in runs), max(r["host_peak"] for r in runs)
    head_dim = dim // heads
    whole_sequence = local_tokens * 4 * ((heads + 2 * kv_heads) * head_dim + dim)  # q, k, v + attention output
    assert peak["unfused"] - peak["chunked_blocks"] >= whole_sequence, peak
    assert peak["unfused"] - peak["recompute"] >= whole_sequence, peak
    # with --offload-activations only block inputs wait on the host, not 3 blocks' chunk stores
    block_input = local_tokens * dim * 4
    assert host["recompute"] <= host["chunked_blocks"] - 2 * block_input, host
