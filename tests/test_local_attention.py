"""Local attention (issue #19): sliding windows, attention sinks and logit soft-capping in every
strategy on real gloo worlds, exact against a naive fp64 reference; the work and the traffic a
window hides are skipped (pairs and bytes asserted)."""
import pytest
import torch

import seqpar
from checks.attention import expect_error
from checks.local_attn import (
    FIELDS,
    local_args_mismatch,
    local_exactness_cases,
    reference_local_attention,
    windowed_work,
)
from checks.train import transformer_step
from seqpar.documents import _intervals, tile_intervals, visible_pairs
from seqpar.kernels import Band, MathKernel
from seqpar.model import ModelConfig
from seqpar.plan import windowed_ring_bytes
from seqpar.train import build_config

SEQ = 32  # 8 tokens per rank on 4 ranks
DOCS = [0, 5, 18, 25, SEQ]
CASES = [  # every case on every strategy: one context each, fp64
    dict(seq=SEQ, causal=True, window=(0, 0)),                            # a window of 1
    dict(seq=SEQ, causal=True, window=(4, -1)),                           # odd, smaller than a rank's block
    dict(seq=SEQ, causal=True, window=(20, 0), sinks=True),               # spanning several ranks
    dict(seq=SEQ, causal=False, window=(3, 6)),                           # non-causal, asymmetric
    dict(seq=SEQ, causal=False, window=(-1, 2), kv_heads=1),              # unbounded left, MQA
    dict(seq=SEQ, causal=True, window=(6, 0), softcap=2.0, sinks=True),   # everything composed
    dict(seq=SEQ, causal=True, window=(4, 0), cu=DOCS),                   # documents
    dict(seq=SEQ, causal=False, window=(2, 9), cu=DOCS, sinks=True, softcap=1.5),
    dict(seq=SEQ, causal=True, sinks=True),                               # sinks alone
    dict(seq=SEQ, causal=False, softcap=1.5),                             # soft-capping alone
]
STRATEGIES = [  # (world, strategy, init kwargs); tile 4: several tiles per rank's block
    (1, "local", {"tile": 4}),
    (4, "ring", {"tile": 4, "layout": "contiguous"}), (4, "ring", {"tile": 4, "layout": "zigzag"}),
    (4, "ring", {"tile": 3, "layout": "striped"}),
    (4, "ulysses", {"tile": 4}), (4, "usp", {"ulysses": 2, "tile": 4}),
    (4, "allgather", {"tile": 4}), (4, "lss", {"tile": 5, "layout": "contiguous"}),
    (4, "wallfacer", {"tile": 4}), (4, "wallfacer", {"team_size": 1, "tile": 4}),
    (4, "fpdt", {"chunks": 2, "tile": 4}),
]


def _assert_exact(results, cases):
    for rank, per_case in enumerate(results):
        for case, r in zip(cases, per_case):
            for f in FIELDS:
                if f in r:
                    assert r[f] < 1e-10, f"rank {rank}, {case}: {f} error {r[f]:.3e}"


@pytest.mark.parametrize("world,strategy,kwargs", STRATEGIES, ids=lambda c: str(c))
def test_every_strategy_is_exact_with_windows_sinks_softcap(worlds, world, strategy, kwargs):
    _assert_exact(worlds.run(world, local_exactness_cases, strategy, kwargs, CASES), CASES)


def test_documents_layout_is_exact_with_windows(worlds):
    cases = [c for c in CASES if c.get("cu")]
    _assert_exact(worlds.run(4, local_exactness_cases, "ring", {"layout": "documents", "tile": 4}, cases), cases)


def test_sink_gradient_matches_autograd_of_the_reference():
    """The reference itself: its dsinks is autograd's; -sum p_sink (dO . O) per head is the formula."""
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 6, 2, 3, generator=g, dtype=torch.float64) for _ in range(4))
    sinks = torch.tensor([0.3, -1.0], dtype=torch.float64, requires_grad=True)
    out, lse = reference_local_attention(q, k, v, True, (2, 0), sinks)
    out.backward(do)
    p_sink = torch.exp(sinks.detach().view(1, 2, 1) - lse.detach())
    formula = -(p_sink * (do * out.detach()).sum(-1).transpose(1, 2)).sum((0, 2))
    assert (sinks.grad - formula).abs().max() < 1e-12


@pytest.mark.parametrize("world,strategy,kwargs", [(1, "local", {}), (4, "ulysses", {}), (4, "allgather", {}),
                                                   (4, "fpdt", {"chunks": 2}), (4, "ring", {})])
def test_windowed_tiles_outside_the_window_are_not_computed(worlds, world, strategy, kwargs):
    """A causal window of w over S tokens with tiles of T: about (w + 2T) S pairs per head, not S^2 / 2,
    also inside one rank's long local call (Ulysses, FPDT, all-gather)."""
    seq, w, tile, heads = 1024, 64, 32, 4
    res = worlds.run(world, windowed_work, strategy, {**kwargs, "tile": tile}, seq=seq, window=(w - 1, 0),
                     heads=heads)
    per_head = sum(r["pairs"] for r in res) / heads
    assert visible_pairs((0, seq), True, window=(w - 1, 0)) <= per_head <= (w + 2 * tile) * seq
    assert per_head < seq * seq / 2 / 5


def _ring_block(seq, ring, kv_heads=1, head_dim=2, batch=1):
    return 2 * batch * (seq // ring) * kv_heads * head_dim * 8  # stacked K and V, fp64


@pytest.mark.parametrize("layout,window,causal", [("contiguous", (63, 0), True), ("zigzag", (63, 0), True),
                                                  ("contiguous", (20, 20), False), ("contiguous", (600, 0), True)])
def test_ring_skips_rotations_without_visible_keys(worlds, layout, window, causal):
    """Bytes per rank equal the planner's formula: one exchange per needed ring distance."""
    seq, ring = 1024, 4
    res = worlds.run(ring, windowed_work, "ring", {"layout": layout}, seq=seq, window=window, causal=causal)
    block = _ring_block(seq, ring)
    want = windowed_ring_bytes(layout, ring, seq, window, causal, block, block)
    assert [r["bytes"] for r in res] == [want["fwd"] + want["bwd"]] * ring
    expected_steps = {("contiguous", (63, 0)): 1, ("zigzag", (63, 0)): 2, ("contiguous", (20, 20)): 2,
                      ("contiguous", (600, 0)): 3}[(layout, window)]
    assert want["steps"] == expected_steps
    full = (3 * ring - 2) * block
    assert want["fwd"] + want["bwd"] == (full if expected_steps == ring - 1 else 3 * expected_steps * block)


def test_usp_ring_and_wallfacer_sub_rings_skip_rotations(worlds):
    seq, window = 1024, (31, 0)
    usp = worlds.run(4, windowed_work, "usp", {"ulysses": 2, "ring": 2, "layout": "contiguous"}, seq=seq,
                     window=window)
    block = _ring_block(seq, 2, kv_heads=1)  # kv head replicated to the Ulysses degree, then split: 1 head
    want = windowed_ring_bytes("contiguous", 2, seq, window, True, block, block)
    assert [r["p2p"] for r in usp] == [want["fwd"] + want["bwd"]] * 4
    plain = worlds.run(4, windowed_work, "wallfacer", {"team_size": 1, "layout": "contiguous"}, seq=seq,
                       window=(-1, 0))
    windowed = worlds.run(4, windowed_work, "wallfacer", {"team_size": 1, "layout": "contiguous"}, seq=seq,
                          window=window)
    block = _ring_block(seq, 4)
    assert [r["p2p"] for r in plain] == [(3 * 4 - 2) * block] * 4
    assert [r["p2p"] for r in windowed] == [3 * block] * 4


def test_a_window_makes_contiguous_the_default_layout():
    for strategy, size in (("ring", 4), ("allgather", 4), ("lss", 4), ("wallfacer", 4), ("usp", 4)):
        assert seqpar.resolve(strategy, size, local_window=1024).layout.kind == "contiguous", strategy
        assert seqpar.resolve(strategy, size, local_window=64, layout="zigzag").layout.kind == "zigzag"
    assert seqpar.resolve("ring", 4).layout.kind == "zigzag"
    assert seqpar.resolve("fpdt", 4, local_window=8, tile=64).tile == 64


def test_tiles_cover_exactly_the_visible_entries():
    pos = torch.cat([torch.arange(0, 24), torch.arange(40, 64)])  # a zigzag rank's rows
    for window, causal, tile in (((5, 0), True, 4), ((3, 7), False, 5), ((0, 0), True, 8), ((30, -1), False, 16)):
        lo, hi = _intervals(pos, torch.arange(64), (0, 64), causal, window)
        covered = torch.zeros(48, 64, dtype=torch.int64)
        for r0, r1, c0, c1, mask in tile_intervals(lo, hi, pos, tile):
            if isinstance(mask, Band):
                sub = mask.visible(c1 - c0, torch.device("cpu"))
            else:
                sub = torch.ones(r1 - r0, c1 - c0, dtype=torch.bool)
                sub = sub.tril() if mask else sub
            assert sub.any(), "a fully masked tile was kept"
            assert r1 - r0 <= tile and (c1 - c0 <= tile or mask is False)
            covered[r0:r1, c0:c1] += sub.long()
        j = torch.arange(64)[None, :]
        want = (j >= lo[:, None]) & (j < hi[:, None])
        assert torch.equal(covered, want.long()), (window, causal)


def test_band_and_softcap_kernel_match_the_reference():
    g = torch.Generator().manual_seed(1)
    q, do = (torch.randn(1, 6, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, 9, 1, 4, generator=g, dtype=torch.float64) for _ in range(2))
    band = Band(torch.tensor([0, 0, 1, 3, 4, 9]), torch.tensor([2, 3, 5, 7, 9, 9]))  # last row sees nothing
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    s = torch.einsum("bqhd,bkhd->bhqk", leaves[0], leaves[1].expand(1, 9, 2, 4)) * 0.5
    s = (1.5 * torch.tanh(s / 1.5)).masked_fill(~band.visible(9, torch.device("cpu")), float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1))
    ref = torch.einsum("bhqk,bkhd->bqhd", p, leaves[2].expand(1, 9, 2, 4))
    ref.backward(do)
    out, lse = MathKernel().forward(q, k, v, band, 0.5, softcap=1.5)
    assert (out - ref).abs().max() < 1e-12
    grads = MathKernel().backward(do, q, k, v, out, lse, band, 0.5, softcap=1.5)
    for got, leaf in zip(grads, leaves):
        assert (got - leaf.grad).abs().max() < 1e-12


BAD = [  # (attention kwargs, message fragment)
    ({"window": (3,)}, "window must be (left, right)"),
    ({"window": (-2, 0)}, "window must be (left, right)"),
    ({"softcap": 0.0}, "softcap must be a positive finite number"),
    ({"sinks": "heads"}, "sinks must be a floating-point tensor [heads]"),
]


@pytest.mark.parametrize("attn,message", BAD, ids=[b[1] for b in BAD])
def test_bad_local_attention_arguments_raise_clear_errors(worlds, attn, message):
    errors = worlds.run(2, expect_error, "ring", {}, seq=16, heads=4, causal=True, attention_kwargs=attn)
    assert len(set(errors)) == 1 and message in errors[0], errors


def test_ranks_passing_different_windows_raise_the_same_error(worlds):
    """Window, soft-cap and sinks are part of the cross-rank input check: no rank computes (or hangs)
    with another mask than its peers."""
    errors = worlds.run(2, local_args_mismatch)
    assert len(set(errors)) == 1 and "mismatched inputs" in errors[0] and "window = (4, 0), (5, 0)" in errors[0], \
        errors


# -- training: the built-in model with windows (--window, --local-global) --------------------------
WINDOWED = {"window": 5, "local_global": 1}  # 2 layers: a 5-token window, then a global one


@pytest.fixture(scope="module")
def windowed_reference(worlds):
    return worlds.run(1, transformer_step, "local", model=WINDOWED)[0]


@pytest.mark.parametrize("strategy,kwargs,extra", [
    ("ring", {"layout": "contiguous", "tile": 4}, {}), ("usp", {"ulysses": 2}, {}),
    ("fpdt", {"chunks": 2, "tile": 8}, {}),
    # FPDT's per-chunk block pipeline skips the chunks the window leaves out (was refused)
    ("fpdt", {"chunks": 4, "tile": 2}, {"chunked_blocks": True}),
])
def test_windowed_transformer_matches_one_process(worlds, windowed_reference, strategy, kwargs, extra):
    got = worlds.run(4, transformer_step, strategy, kwargs, model={**WINDOWED, **extra})[0]
    ref = windowed_reference
    assert abs(got["loss"] - ref["loss"]) <= 1e-10 * abs(ref["loss"])
    assert (got["logits"] - ref["logits"]).abs().max() < 1e-10
    for name, g in got["grads"].items():
        assert (g - ref["grads"][name]).abs().max() < 1e-10, name


def test_windowed_model_layers_and_flops():
    cfg = ModelConfig(n_layers=6, window=1024, local_global=5)  # Gemma 3: 5 local, 1 global
    assert [cfg.layer_window(i) for i in range(6)] == [1024] * 5 + [0]
    full = ModelConfig(n_layers=6).attention_flops_per_token(16384)
    local = ModelConfig(n_layers=6, window=1024).attention_flops_per_token(16384)
    assert local == pytest.approx(full * (1024 - 1024 * 1023 / 32768) / 8192)
    assert ModelConfig(n_layers=6, window=20000).attention_flops_per_token(16384) == full


@pytest.mark.parametrize("kwargs,message", [({"local_global": 2}, "give the window too"),
                                            ({"window": -1}, "must be >= 0")])
def test_windowed_model_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_train_window_flags_reach_the_model_and_the_layout():
    cfg = build_config(["--window", "64", "--strategy", "ring"])
    assert cfg.model_config().window == 64 and cfg.strategy_settings(4).layout.kind == "contiguous"
    mixed = build_config(["--window", "64", "--local-global", "3", "--strategy", "ring"])
    assert mixed.model_config().local_global == 3 and mixed.strategy_settings(4).layout.kind == "zigzag"
    assert build_config(["--window", "64", "--strategy", "ring", "--layout", "zigzag"]).strategy_settings(4) \
        .layout.kind == "zigzag"
