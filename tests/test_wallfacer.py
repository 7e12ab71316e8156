"""WallFacer: exactness on real gloo worlds, placements, bad configs, communication volume."""
import pytest

from checks.attention import expect_error
from checks.wallfacer import comm_volume, placement_info, same_as_ring
from seqpar.attention.wallfacer import WallFacerGrid
from seqpar.testing.checks import attention_exactness

FP64_TOL = 1e-10
GRADS = ("out", "lse", "dq", "dk", "dv")


def assert_exact(res, tol=FP64_TOL):
    errors = {name: res[name] for name in GRADS}
    assert max(errors.values()) < tol, errors
    assert res["dtype_ok"] == 1.0


@pytest.mark.parametrize("ranks,teams,layout,causal,kv_heads", [
    (4, 2, "zigzag", True, 2),
    (4, 2, "contiguous", False, 4),
    (8, 2, "zigzag", True, 2),
    (8, 2, "contiguous", True, 1),
    (8, 2, "striped", True, 4),
    (8, 1, "zigzag", True, 2),
])  # 16-rank worlds (C = 4, sub-rings of 4) run in benchmarks/large_worlds.py: the suite keeps <= 8 processes
def test_exact_fp64(worlds, ranks, teams, layout, causal, kv_heads):
    res = worlds.run(ranks, attention_exactness, "wallfacer", {"team_size": teams, "layout": layout},
                     seq=64, heads=4, kv_heads=kv_heads, causal=causal)
    for r in res:
        assert_exact(r)


def test_teams_1_is_ring_attention(worlds):
    for r in worlds.run(8, same_as_ring, "zigzag", causal=True):
        assert r["equal"]
        assert r["wallfacer_bytes"] == r["ring_bytes"]


def test_bf16_within_documented_bound(worlds):
    """bf16 inputs, fp32 accumulation: max error <= 2e-2 relative to the reference's max magnitude."""
    res = worlds.run(8, attention_exactness, "wallfacer", {"team_size": 2, "layout": "zigzag"}, seq=64,
                     kv_heads=2, dtype="bfloat16", causal=True)
    for r in res:
        for name in GRADS:
            assert r[name] <= 2e-2 * r[name + "_ref"], (name, r[name], r[name + "_ref"])


@pytest.mark.parametrize("placement,rpn,coll_intra,rings_intra", [
    ("collectives_intra", 2, True, False),
    ("rings_intra", 2, False, True),
    ("rings_intra", 4, True, True),
    ("collectives_intra", None, True, True),  # detected: one host
])
def test_placements_exact_and_described(worlds, placement, rpn, coll_intra, rings_intra):
    opts = {"team_size": 2, "layout": "zigzag", "placement": placement}
    if rpn is not None:
        opts["ranks_per_node"] = rpn
    infos = worlds.run(8, placement_info, opts)
    grid = WallFacerGrid(8, 2, placement)
    assert [i["layout_rank"] for i in infos] == grid.logical()
    for info in infos:
        assert info["roundtrip"] and info["positions_match"]
        d = info["describe"]
        assert (d["team_size"], d["team_count"], d["subring"], d["placement"]) == (2, 4, 2, placement)
        assert (d["collectives_intra_node"], d["rings_intra_node"]) == (coll_intra, rings_intra)
        assert d["ranks_per_node"] == (rpn or 8)
    for r in worlds.run(8, attention_exactness, "wallfacer", opts, seq=32, kv_heads=2, causal=True):
        assert_exact(r)


def test_rings_intra_puts_subrings_on_consecutive_ranks():
    grid = WallFacerGrid(16, 2, "rings_intra")  # G = 4
    assert grid.subring_members(5, 1) == [12, 13, 14, 15]  # team group 1, member 1
    assert grid.team_members(5) == [9, 13]
    cgrid = WallFacerGrid(16, 2)
    assert cgrid.subring_members(5, 1) == [9, 11, 13, 15] and cgrid.team_members(5) == [10, 11]


def test_skewed_placement_covers_every_team_once():
    """Across its sub-ring steps, the C members of each team see every team's K/V exactly once."""
    for ranks, c in ((8, 2), (16, 4), (16, 2), (8, 1)):
        grid = WallFacerGrid(ranks, c)
        for t in range(grid.team_count):
            seen = sorted(grid.kv_team(t, a, s) for a in range(c) for s in range(grid.ring_len))
            assert seen == list(range(grid.team_count))
            for a in range(c):
                assert grid.placement_source(*grid.placement_target(t, a)) == (t, a)


@pytest.mark.parametrize("kwargs,message", [
    ({"team_size": 3}, "team_size=3 does not divide 8 ranks"),
    ({"team_size": 4}, "C^2=16 to divide 8 ranks"),
    ({"team_size": 0}, "must be >= 1"),
    ({"team_size": 2, "placement": "nodes"}, "unknown placement 'nodes'"),
    ({"team_size": 2, "ranks_per_node": 0}, "ranks_per_node must be >= 1"),
    ({"team_size": 2, "ulysses": 2}, "does not use ulysses=2"),
    ({"teams": 3}, "does not take option(s) ['teams']"),  # the 0.x alias is gone
    ({"team_size": 2, "ring_size": 2}, "does not take option(s) ['ring_size']"),
])
def test_bad_configs_raise(worlds, kwargs, message):
    for err in worlds.run(8, expect_error, "wallfacer", kwargs):
        assert err.startswith("ValueError") and message in err, err


def test_bad_sequence_length_raises(worlds):
    # zigzag over 4 teams x 2 members needs lcm(2 * 4, 4 * 2) = 8 tokens (24 is exact): equal
    # shards always pass, so two ranks hold one token more (18 tokens in all)
    errors = worlds.run(8, expect_error, "wallfacer", {"team_size": 2, "layout": "zigzag"}, seq=16,
                        per_rank_seq={0: 3, 1: 3})
    for err in errors:
        assert "18 tokens in all" in err and "not divisible by 8" in err, err


B, N, HEADS, KV_HEADS, D, W = 1, 64, 4, 2, 8, 4  # fp32 words


@pytest.mark.parametrize("ranks,teams", [(8, 2)])  # (16, 4): benchmarks/large_worlds.py
def test_comm_bytes_match_formulas(worlds, ranks, teams):
    """Collectives: exactly the paper's 4BNH(C-1)/P (q, k, v, o; GQA-sized k/v) plus the
    partial-LSE gather; P2P: 2BNH/C (placement + G-1 rotations; self-sends skipped),
    i.e. about 1/C of ring attention's 2BNH(P-1)/P."""
    problem = dict(batch=B, seq=N, heads=HEADS, kv_heads=KV_HEADS, head_dim=D, dtype="float32", causal=True)
    wf = worlds.run(ranks, comm_volume, "wallfacer", {"team_size": teams, "layout": "zigzag"}, **problem)
    ring = worlds.run(ranks, comm_volume, "ring", {"layout": "zigzag"}, **problem)
    grid = WallFacerGrid(ranks, teams)
    n, c, g = N // ranks, teams, grid.ring_len
    kv_block = 2 * B * c * n * KV_HEADS * D * W  # one team's K and V
    gather = (c - 1) * B * n * (HEADS + 2 * KV_HEADS) * D * W + (c - 1) * B * HEADS * c * n * 4
    scatter = (c - 1) * B * n * HEADS * D * W
    ratios = []
    for rank, (mine, theirs) in enumerate(zip(wf, ring)):
        fwd = mine["forward"]
        t, a = grid.coords(rank)
        placed = grid.placement_target(t, a) != (t, a)
        assert fwd["all_gather"] == gather and fwd["reduce_scatter"] == scatter
        assert fwd.get("p2p", 0) == (g - 1 + placed) * kv_block
        assert mine["forward_calls"].get("p2p", 0) == g - 1 + placed  # latency: P/C^2 steps, not P
        assert theirs["forward_calls"]["p2p"] == ranks - 1
        ring_p2p = theirs["forward"]["p2p"]
        assert ring_p2p == (ranks - 1) * 2 * B * n * KV_HEADS * D * W
        ratios.append(fwd.get("p2p", 0) / ring_p2p)
        bwd = mine["backward"]
        assert bwd["all_gather"] == 2 * (c - 1) * B * n * HEADS * D * W  # dO and O
        assert bwd["reduce_scatter"] == (c - 1) * B * n * (HEADS + 2 * KV_HEADS) * D * W  # dQ, dK, dV
    assert max(ratios) == pytest.approx(ranks / (c * (ranks - 1)))  # = 2BNH/C over 2BNH(P-1)/P
    assert 1 / c <= max(ratios) <= 1.15 / c
