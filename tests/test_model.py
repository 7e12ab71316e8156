"""The sharded Transformer and DiTBlock equal a 1-process full-sequence run (fp64, real gloo worlds).

Tolerance: fp64, 1e-10 relative to the largest reference value (loss, logits, every
parameter gradient after the trainer's gradient averaging). Every rank must hold bitwise the
same averaged gradients, and the ranks' local (pre-all-reduce) loss sums and token counts
must differ and add up to the 1-process loss and count.
"""
import pytest
import torch

from checks.train import STRATEGY_CASES, dit_step, transformer_step
from seqpar.model import ModelConfig, apply_rope, rope_tables

TOL = 1e-10


def assert_close(got, ref, what):
    bound = TOL * max(1.0, ref.abs().max().item())
    err = (got - ref).abs().max().item()
    assert err <= bound, f"{what}: max abs error {err:.3e} > {bound:.1e}"


def assert_losses_partition(results, ref):
    """Each rank's pre-all-reduce loss covers its own shard: the ranks' token counts differ and
    add up to the 1-process count, and their loss sums add up to the global mean loss."""
    counts = [r["local_count"] for r in results]
    assert len(set(counts)) > 1, f"every rank counted the same tokens: {counts}"
    assert sum(counts) == ref["local_count"], (counts, ref["local_count"])
    total = sum(r["local_loss_sum"] for r in results)
    assert abs(total / sum(counts) - ref["loss"]) <= TOL * ref["loss"], (total / sum(counts), ref["loss"])


def assert_same_step(got, ref, rows=slice(None)):
    assert abs(got["loss"] - ref["loss"]) <= TOL * abs(ref["loss"]), (got["loss"], ref["loss"])
    assert_close(got["logits"], ref["logits"][rows], "logits")
    assert got["grads"].keys() == ref["grads"].keys()
    for name, g in got["grads"].items():
        assert_close(g, ref["grads"][name], f"grad of {name}")


@pytest.fixture(scope="module")
def reference_step(worlds):
    return worlds.run(1, transformer_step, "local", batch=2)[0]


@pytest.mark.parametrize("strategy,kwargs", STRATEGY_CASES, ids=[s for s, _ in STRATEGY_CASES])
def test_transformer_matches_one_process(worlds, reference_step, strategy, kwargs):
    results = worlds.run(4, transformer_step, strategy, kwargs, batch=2)
    assert_losses_partition(results, reference_step)
    assert_same_step(results[0], reference_step)
    for r in results[1:]:  # every rank holds the same averaged gradients, bitwise
        for name, g in results[0]["grads"].items():
            assert torch.equal(g, r["grads"][name]), f"ranks disagree on grad of {name}"


def test_transformer_dp_x_sp_matches_one_process(worlds, reference_step):
    """dp=2 x sp=2: each dp rank holds one sample; gradients are those of the 2-sample mean loss."""
    results = worlds.run(4, transformer_step, "ring", {"layout": "zigzag"}, batch=1, dp=2)
    assert [r["dp_rank"] for r in results] == [0, 0, 1, 1]
    assert_losses_partition(results, reference_step)
    assert_same_step(results[0], reference_step, rows=slice(0, 1))
    assert_close(results[2]["logits"], reference_step["logits"][1:2], "logits of dp rank 1")


def test_chunked_mlp_loss_and_checkpointing_are_exact(worlds, reference_step):
    options = {"mlp_chunks": 2, "loss_chunks": 3, "activation_checkpointing": True}
    results = worlds.run(4, transformer_step, "usp", {"ulysses": 2, "layout": "zigzag"}, model=options)
    assert_losses_partition(results, reference_step)
    assert_same_step(results[0], reference_step)


def test_offloaded_activations_are_exact(worlds, reference_step):
    """FPDT with K/V offload + chunked MLP/loss + every block's saved input in host memory."""
    options = {"mlp_chunks": 2, "loss_chunks": 2, "offload_activations": True}
    results = worlds.run(4, transformer_step, "fpdt", {"chunks": 2, "offload": True}, model=options)
    assert_losses_partition(results, reference_step)
    assert_same_step(results[0], reference_step)


@pytest.mark.parametrize("strategy,kwargs", [("ring", {"layout": "striped"}), ("ulysses", {}),
                                             ("wallfacer", {"team_size": 2})], ids=["ring", "ulysses", "wallfacer"])
def test_dit_block_matches_one_process(worlds, strategy, kwargs):
    ref = worlds.run(1, dit_step, "local")[0]
    got = worlds.run(4, dit_step, strategy, kwargs)[0]
    for key in ("out", "dx", "dc"):
        assert_close(got[key], ref[key], key)
    for name, g in got["grads"].items():
        assert_close(g, ref["grads"][name], f"grad of {name}")
    assert ref["grads"]["adaLN_modulation.1.weight"].abs().max() > 0  # the modulation path is exercised


def test_rope_depends_only_on_relative_position():
    """<rope(q, i), rope(k, j)> is a function of i - j: global positions must be used, not local ones."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(i, j):
        qi = apply_rope(q, rope_tables(torch.tensor([i]), 8, 10000.0, torch.float64))
        kj = apply_rope(k, rope_tables(torch.tensor([j]), 8, 10000.0, torch.float64))
        return (qi * kj).sum().item()

    assert abs(score(5, 2) - score(40, 37)) < 1e-12
    assert abs(score(5, 2) - score(5, 3)) > 1e-6


@pytest.mark.parametrize("kwargs,message", [
    ({"dim": 30, "n_heads": 4}, "divisible by n_heads"),
    ({"n_heads": 4, "n_kv_heads": 3}, "multiple of n_kv_heads"),
    ({"dim": 12, "n_heads": 4, "n_kv_heads": 4}, "even for RoPE"),
    ({"n_layers": 0}, "n_layers must be >= 1"),
    ({"mlp_chunks": 0}, "mlp_chunks must be >= 1"),
])
def test_model_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("world,chunks,offload,extra", [
    (4, 2, False, {}),                               # K/V head replication (2 kv heads on 4 ranks)
    (4, 4, True, {}),
    (2, 2, True, {"offload_activations": True}),     # block inputs in host memory too
    (2, 1, False, {}),
], ids=["4r-u2", "4r-u4-offload", "2r-u2-offload-ckpt", "2r-u1"])
def test_chunked_blocks_are_exact(worlds, reference_step, world, chunks, offload, extra):
    """FPDT's per-chunk block pipeline (projections, attention and MLP per chunk) = 1 process."""
    options = {"chunked_blocks": True, **extra}
    results = worlds.run(world, transformer_step, "fpdt", {"chunks": chunks, "offload": offload}, model=options)
    assert_losses_partition(results, reference_step)
    assert_same_step(results[0], reference_step)
