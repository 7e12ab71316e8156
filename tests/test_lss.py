"""LSS Transformer: exact segment attention, and full-model gradients with double averaging on a
dp=2 x sp=2 gloo world equal to 1-process full-sequence training (fp64, 1e-10 relative to
the largest reference gradient)."""
import pytest

from checks.attention import expect_error
from checks.lss import lss_model_gradients, segment_embedding_errors
from seqpar.testing.checks import attention_exactness

TOL = 1e-10


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
def test_lss_attention_exact(worlds, world, layout, causal):
    results = worlds.run(world, attention_exactness, "lss", {"layout": layout}, seq=32, heads=4, kv_heads=2,
                         causal=causal)
    for r in results:
        for name in ("out", "lse", "dq", "dk", "dv"):
            assert r[name] <= TOL, f"{name}: {r[name]:.3e}"


def test_lss_moves_allgather_bytes_one_fused_collective_each_way(worlds):
    kw = dict(batch=2, seq=32, heads=4, kv_heads=1, causal=True)
    lss = worlds.run(4, attention_exactness, "lss", {}, **kw)
    allgather = worlds.run(4, attention_exactness, "allgather", {}, **kw)
    assert [r["bytes_sent"] for r in lss] == [r["bytes_sent"] for r in allgather]
    kv_bytes = 2 * 2 * 8 * 1 * 8 * 8  # stacked K,V of one rank: [2, b=2, 8 tokens, 1 head, 8] fp64
    assert lss[0]["bytes_sent"] == 2 * 3 * kv_bytes  # all-gather + reduce-scatter, (P-1) shards each


@pytest.mark.parametrize("layout,causal", [("contiguous", True), ("zigzag", True), ("contiguous", False)])
def test_double_averaging_equals_single_process_training(worlds, layout, causal):
    results = worlds.run(4, lss_model_gradients, 2, layout=layout, causal=causal)
    for r in results:
        bound = TOL * max(1.0, r["grad_ref"])
        assert r["pos_rows"] == 16  # each sp rank holds half of the 32 position rows
        assert r["double"].keys() >= {"pos.weight", "tok.weight", "head.weight", "wkv.weight"}
        for name, err in r["double"].items():
            assert err <= bound, f"double averaging, {name}: {err:.3e}"
        for name, err in r["flat"].items():
            assert err <= bound, f"flat averaging, {name}: {err:.3e}"
        # the position-embedding rule matters: averaging those rows over the segments is wrong
        assert r["pos_without_rule"] > 1e-2 * r["grad_ref"]
        assert r["comm"]["grad_all_reduce_sp"] > 0 and r["comm"]["grad_all_reduce_dp"] > 0


def test_segment_position_embedding(worlds):
    for rank, r in enumerate(worlds.run(4, segment_embedding_errors, 16, 4)):
        assert r["rows"] == 4 and r["lookup_ok"] and r["gather_ok"]
        assert f"rank {rank} holds position rows {4 * rank}..{4 * rank + 3} only" in r["foreign"]
        assert "[0, 16)" in r["out_of_range"] and "integer" in r["float"]
        assert "not divisible by 4" in r["bad_length"]


@pytest.mark.parametrize("kwargs, match", [
    ({"layout": "striped"}, "segments"),
    ({"chunks": 2}, "chunks"),
    ({"ulysses": 2}, "ulysses"),
    ({"ring": 2}, "ring"),
    ({"offload": True}, "offload"),
])
def test_lss_rejects_bad_configuration(worlds, kwargs, match):
    errors = worlds.run(4, expect_error, "lss", kwargs)
    assert all(e.startswith("ValueError") and match in e for e in errors), errors
