"""Reliability faults at the attention entry point, on real gloo worlds.

Strided inputs (every strategy exact for any view), uneven shards (every rank raises the
same error at once), one cached input check per signature, layout granularity, dtypes,
and a non-default softmax scale. Tolerance: fp64 1e-10 absolute, as everywhere.
"""

import pytest
import torch

from checks.attention import exactness_over_lengths, expect_error, input_check_counts
from seqpar.kernels import CpuFlashKernel, LseAccumulator, MathKernel
from seqpar.layout import TokenLayout
from seqpar.testing.checks import attention_exactness

FIELDS = ("out", "lse", "dq", "dk", "dv")
TOL = 1e-10

EVERY_STRATEGY = [  # (world, strategy, init kwargs): each strategy, each layout at least once
    (1, "local", {}),
    (2, "ring", {}), (4, "ring", {"layout": "zigzag"}), (4, "ring", {"layout": "striped"}),
    (4, "ulysses", {}), (4, "usp", {"ulysses": 2, "layout": "zigzag"}), (4, "allgather", {"layout": "striped"}),
    (4, "wallfacer", {"team_size": 2, "layout": "zigzag"}), (4, "lss", {"layout": "zigzag"}),
    (2, "fpdt", {"chunks": 2, "offload": True}),
]
IDS = [f"{s}-{w}" + "".join(f"-{k}={v}" for k, v in kw.items()) for w, s, kw in EVERY_STRATEGY]


def assert_exact(results):
    for rank, r in enumerate(results):
        assert r["dtype_ok"] == 1.0, f"rank {rank}: output/grad dtype differs from the input dtype"
        for f in FIELDS:
            assert r[f] < TOL, f"rank {rank}: {f} error {r[f]:.3e}"


# -- 1. non-contiguous inputs -----------------------------------------------------------------
KERNEL_VIEWS = {  # same values, other strides
    "last_stride": lambda t: torch.stack([t, t], -1).flatten(-2)[..., ::2],
    "head_dim_major": lambda t: t.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2),  # dense, stride(-1) != 1
    "transposed": lambda t: t.transpose(1, 2).contiguous().transpose(1, 2),
    "expanded_seq": lambda t: t[:, :1].expand(t.shape),
}


@pytest.mark.parametrize("view", KERNEL_VIEWS)
@pytest.mark.parametrize("kernel", [MathKernel(), CpuFlashKernel()], ids=lambda k: k.name)
def test_kernels_and_merge_take_any_strides(kernel, view):
    """Block forward/backward and the LSE merge on strided views equal the contiguous results."""
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(2, 8, 4, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, 8, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    f = KERNEL_VIEWS[view]

    def run(q, k, v, dout):
        acc = LseAccumulator(q)
        for rows in (slice(0, 3), slice(3, 8)):  # two key blocks merged by LSE
            acc.add(*kernel.forward(q, k[:, rows], v[:, rows], False, 0.3))
        out, lse = acc.result(q.dtype)
        return (out, lse, *kernel.backward(dout, q, k, v, f(out.contiguous()), lse, False, 0.3))

    want = run(*(f(t).contiguous() for t in (q, k, v, dout)))
    got = run(*(f(t) for t in (q, k, v, dout)))
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("view", ["last_stride", "transposed", "expanded_kv"])
@pytest.mark.parametrize("world,strategy,kwargs", EVERY_STRATEGY, ids=IDS)
def test_strided_inputs_are_exact(worlds, world, strategy, kwargs, view):
    """q/k/v and dout through views with stride(-1) != 1, [b, h, s, d] transposes, or K/V
    broadcast by .expand (stride 0): the same values give the same attention."""
    kv_heads = 4 if view == "expanded_kv" else 2
    res = worlds.run(world, attention_exactness, strategy, kwargs, causal=True, heads=4, kv_heads=kv_heads,
                     seq=32, view=view)
    assert_exact(res)


# -- 14. the scale argument --------------------------------------------------------------------
@pytest.mark.parametrize("world,strategy,kwargs", EVERY_STRATEGY, ids=IDS)
def test_non_default_scale_is_used(worlds, world, strategy, kwargs):
    res = worlds.run(world, attention_exactness, strategy, kwargs, causal=True, heads=4, kv_heads=2, seq=32,
                     scale=0.9)
    assert_exact(res)


# -- 2. one collective decides, every rank raises ---------------------------------------------
def test_uneven_shards_raise_the_same_error_on_every_rank_at_once(worlds):
    """510 tokens on usp 2x2: ranks 0-1 hold 128, ranks 2-3 hold 127. Before: ranks 2-3 raised
    alone and ranks 0-1 waited in the cross-rank check until the group timed out."""
    errors = worlds.run(4, expect_error, "usp", {"ulysses": 2, "layout": "zigzag"}, seq=510,
                        per_rank_seq={0: 128, 1: 128}, group_timeout=20)
    assert len(set(errors)) == 1, errors
    assert errors[0].startswith("ValueError") and "mismatched" in errors[0], errors[0]
    assert "128, 128, 127, 127" in errors[0] and "510 tokens" in errors[0], errors[0]
    assert "508 and 512" in errors[0], errors[0]  # nearest lengths the layout can split
    # (ranks 0-1 waiting for the group timeout would have raised a RuntimeError instead)


@pytest.mark.parametrize("attn,message", [
    ({"seq": 36}, "sequence length 36 is not divisible by 8"),  # ring zigzag: local check on every rank
    ({"seq": 32, "per_rank_seq": {3: 6}}, "seq_local = 8, 8, 8, 6"),
    ({"seq": 32, "heads": 4, "kv_heads": 3}, "multiple of kv_heads"),
])
def test_every_rank_raises_the_same_message(worlds, attn, message):
    errors = worlds.run(4, expect_error, "ring", {"layout": "zigzag"}, group_timeout=20, **attn)
    assert len(set(errors)) == 1 and message in errors[0], errors


# -- 3. the cross-rank check runs once per signature -----------------------------------------
def test_input_check_runs_once_per_signature(worlds):
    counts = worlds.run(2, input_check_counts, "ring", {}, [32, 32, 48, 48, 32, 32])
    assert counts == [[1, 1, 2, 2, 2, 2]] * 2


# -- 4. layout granularity ---------------------------------------------------------------------
GRANULARITY = [  # (world, strategy, kwargs, layout that strategy uses)
    (4, "usp", {"ulysses": 2, "layout": "zigzag"}, TokenLayout("zigzag", 2, 2)),
    (4, "usp", {"ulysses": 2, "layout": "striped"}, TokenLayout("striped", 2, 2)),
    (4, "wallfacer", {"team_size": 2, "layout": "zigzag"}, TokenLayout("zigzag", 2, 2)),
    (8, "wallfacer", {"team_size": 2, "layout": "zigzag"}, TokenLayout("zigzag", 4, 2)),  # 8, not 16
    (4, "ring", {"layout": "zigzag"}, TokenLayout("zigzag", 4)),
    (4, "allgather", {"layout": "zigzag"}, TokenLayout("zigzag", 4)),
    (4, "ulysses", {}, TokenLayout("contiguous", 1, 4)),
    (2, "fpdt", {"chunks": 2}, TokenLayout("contiguous", 1, 2, 2)),
]


@pytest.mark.parametrize("world,strategy,kwargs,layout", GRANULARITY,
                         ids=[f"{s}-{w}-{lay.kind}-{lay.outer}x{lay.inner}x{lay.chunks}"
                              for w, s, _, lay in GRANULARITY])
def test_every_length_the_layout_accepts_is_exact(worlds, world, strategy, kwargs, layout):
    g = layout.granularity()
    lengths = [n for n in range(1, 4 * g + 1) if n % g == 0]
    errors = worlds.run(world, exactness_over_lengths, strategy, kwargs, lengths)
    for r in errors:
        assert all(e < TOL for e in r.values()), r


def test_usp_zigzag_needs_a_multiple_of_4_not_8(worlds):
    """The issue's case: 508 tokens on usp 2x2 zigzag (127 per rank) is exact."""
    assert TokenLayout("zigzag", 2, 2).granularity() == 4
    errors = worlds.run(4, exactness_over_lengths, "usp", {"ulysses": 2, "layout": "zigzag"}, [508], heads=2,
                        kv_heads=2, head_dim=2)
    assert all(r[508] < TOL for r in errors), errors


# -- 5. dtypes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["int64", "bool"])
def test_integer_inputs_raise(worlds, dtype):
    errors = worlds.run(2, expect_error, "ring", {}, seq=16, dtype=dtype)
    assert all(e.startswith("ValueError") and "floating-point" in e and dtype in e for e in errors), errors


def test_dtype_mismatch_names_the_dtypes(worlds):
    errors = worlds.run(2, expect_error, "ring", {}, seq=16, dtype="bfloat16", per_rank_dtype={0: "float32"})
    assert len(set(errors)) == 1 and "dtype = float32, bfloat16" in errors[0], errors
