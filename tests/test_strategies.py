"""Core strategies (ring, ulysses, usp, allgather) on real gloo worlds of 2, 4 and 8 processes.

Every case compares the unsharded out, lse, dq, dk, dv with naive fp64 attention on the
full sequence. Tolerances: fp64 1e-10 absolute; fp32 1e-5 and bf16 2e-2 relative to the
largest reference value (bf16: ~2.5 x its machine epsilon).
"""
import pytest

from checks.attention import expect_error, shard_roundtrip
from seqpar.testing.checks import attention_exactness

FIELDS = ("out", "lse", "dq", "dk", "dv")
TOL = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2e-2}


def assert_exact(results, dtype="float64"):
    for rank, r in enumerate(results):
        assert r["dtype_ok"] == 1.0, f"rank {rank}: output/grad dtype differs from the input dtype"
        for f in FIELDS:
            bound = TOL[dtype] * (1.0 if dtype == "float64" else max(1.0, r[f + "_ref"]))
            assert r[f] < bound, f"rank {rank}: {f} error {r[f]:.3e} > {bound:.1e}"


CASES = [  # (world, strategy, init kwargs)
    (2, "ring", {}), (4, "ring", {"layout": "zigzag"}), (4, "ring", {"layout": "striped"}),
    (8, "ring", {"layout": "zigzag"}), (8, "ring", {"layout": "contiguous"}),
    (2, "ulysses", {}), (4, "ulysses", {}), (8, "ulysses", {}),
    (4, "usp", {"ulysses": 2, "layout": "zigzag"}), (8, "usp", {"ulysses": 2, "layout": "zigzag"}),
    (8, "usp", {"ulysses": 4, "layout": "striped"}), (8, "usp", {"ring": 2}),
    (2, "allgather", {}), (4, "allgather", {"layout": "zigzag"}), (8, "allgather", {"layout": "striped"}),
]


@pytest.mark.parametrize("world,strategy,kwargs", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_exact_fp64(worlds, world, strategy, kwargs, causal):
    heads = 8
    res = worlds.run(world, attention_exactness, strategy, kwargs, causal=causal, heads=heads, kv_heads=heads,
                     seq=16 * world)
    assert_exact(res)


@pytest.mark.parametrize("strategy,kwargs", [("ring", {"layout": "zigzag"}), ("ulysses", {}),
                                             ("usp", {"ulysses": 2, "layout": "striped"}), ("allgather", {})])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_exact_gqa_mqa(worlds, strategy, kwargs, kv_heads):
    """kv_heads < heads (and < Ulysses degree: K/V heads get replicated, grads folded back)."""
    res = worlds.run(4, attention_exactness, strategy, kwargs, causal=True, heads=8, kv_heads=kv_heads, seq=64)
    assert_exact(res)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("strategy,kwargs", [("ring", {"layout": "zigzag"}), ("usp", {"ulysses": 2}),
                                             ("allgather", {"layout": "zigzag"})])
def test_low_precision_bounds(worlds, strategy, kwargs, dtype):
    res = worlds.run(4, attention_exactness, strategy, kwargs, causal=True, heads=4, kv_heads=2, seq=128,
                     dtype=dtype)
    assert_exact(res, dtype)


@pytest.mark.parametrize("strategy,kwargs", [("ring", {"layout": "zigzag"}), ("ring", {"layout": "striped"}),
                                             ("usp", {"ulysses": 2, "layout": "zigzag"}), ("ulysses", {})])
def test_shard_unshard_positions(worlds, strategy, kwargs):
    res = worlds.run(4, shard_roundtrip, strategy, kwargs, seq=48)
    assert all(r["roundtrip"] and r["positions_match"] for r in res)
    assert sorted(p for r in res for p in r["positions"]) == list(range(48))


def test_usp_zigzag_positions_follow_the_paper(worlds):
    """ring rank r takes chunks r and 2rd-1-r; its Ulysses ranks keep consecutive halves."""
    res = worlds.run(4, shard_roundtrip, "usp", {"ulysses": 2, "layout": "zigzag"}, seq=16)
    assert [r["positions"] for r in res] == [[0, 1, 2, 3], [12, 13, 14, 15], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_comm_bytes_are_exact(worlds):
    """Ring sends (P-1) K/V blocks forward, then (P-1) K/V blocks and P dK/dV blocks backward."""
    b, n, hkv, d, p = 2, 64, 2, 8, 4
    block = 2 * b * (n // p) * hkv * d * 8  # stacked k and v, fp64
    res = worlds.run(p, attention_exactness, "ring", {}, batch=b, seq=n, heads=4, kv_heads=hkv, head_dim=d)
    assert [r["bytes_sent"] for r in res] == [(3 * p - 2) * block] * p
    # Ulysses: fused q/k/v all-to-all + out (+ lse, asked for by the check) forward, the inverse backward.
    h = 4
    res = worlds.run(p, attention_exactness, "ulysses", {}, batch=b, seq=n, heads=h, kv_heads=h, head_dim=d)
    shard, lse = b * (n // p) * h * d * 8, b * h * (n // p) * 8
    assert [r["bytes_sent"] for r in res] == [(8 * shard + lse) * (p - 1) // p] * p


BAD = [  # (world, strategy, init kwargs, attention kwargs, message fragment)
    (4, "ring", {"layout": "zigzag"}, {"seq": 36}, "not divisible by 8"),
    (4, "ulysses", {}, {"seq": 16, "heads": 2, "kv_heads": 2}, "must divide the number of attention heads"),
    (4, "ulysses", {}, {"seq": 16, "heads": 12, "kv_heads": 3}, "incompatible"),
    (4, "usp", {"ulysses": 3}, {}, "ulysses x ring"),
    (4, "usp", {"ulysses": 2, "ring": 3}, {}, "ulysses x ring"),
    (4, "ring", {"ring": 2}, {}, "does not match the group size"),
    (4, "local", {}, {}, "needs a sequence-parallel group of 1 rank"),
    (4, "ring", {"layout": "spiral"}, {}, "unknown layout"),
    (4, "sparse", {}, {}, "unknown strategy"),
    (4, "ring", {"team_size": 2}, {}, "does not use team_size"),
    (4, "usp", {"ulysses": 2, "bogus": 1}, {}, "does not take option"),
    (4, "ring", {}, {"seq": 16, "per_rank_seq": {2: 8}}, "mismatched inputs"),
    (4, "ring", {}, {"seq": 16, "heads": 4, "kv_heads": 3}, "multiple of kv_heads"),
]


@pytest.mark.parametrize("world,strategy,kwargs,attn,message", BAD, ids=[b[-1] for b in BAD])
def test_bad_input_raises_clear_error_on_every_rank(worlds, world, strategy, kwargs, attn, message):
    errors = worlds.run(world, expect_error, strategy, kwargs, **attn)
    assert len(set(errors)) == 1 and message in errors[0], errors  # the same error on every rank
