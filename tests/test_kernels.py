"""Kernel layer: block attention fwd/bwd vs a naive fp64 reference, block split + LSE merge."""
import pytest
import torch

from seqpar.kernels import CpuFlashKernel, LseAccumulator, MathKernel, get_kernel, merge_lse
from seqpar.testing.checks import reference_attention

KERNELS = [MathKernel(), CpuFlashKernel()]


def _inputs(n=12, heads=4, kv_heads=2, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, n, heads, d, generator=g, dtype=dtype)
    k = torch.randn(2, n, kv_heads, d, generator=g, dtype=dtype)
    v = torch.randn(2, n, kv_heads, d, generator=g, dtype=dtype)
    dout = torch.randn(2, n, heads, d, generator=g, dtype=dtype)
    return q, k, v, dout


def _reference_grads(q, k, v, dout, causal):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = reference_attention(*leaves, causal)
    out.backward(dout)
    return out.detach(), lse.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("causal", [False, True])
def test_block_kernel_matches_reference(kernel, causal):
    q, k, v, dout = _inputs()
    scale = q.shape[-1] ** -0.5
    out, lse = kernel.forward(q, k, v, causal, scale)
    ref_out, ref_lse, ref_grads = _reference_grads(q, k, v, dout, causal)
    assert (out - ref_out).abs().max() < 1e-12
    assert (lse - ref_lse).abs().max() < 1e-12
    grads = kernel.backward(dout, q, k, v, out, lse, causal, scale)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        assert (got - want).abs().max() < 1e-12


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_split_blocks_merge_exactly(kernel):
    """Two key blocks merged by LSE and their backward with the global out/lse equal the full block."""
    q, k, v, dout = _inputs(n=16)
    scale = 0.3
    acc = LseAccumulator(q)
    halves = [slice(0, 7), slice(7, 16)]
    for kv in halves:
        acc.add(*kernel.forward(q, k[:, kv], v[:, kv], False, scale))
    out, lse = acc.result(q.dtype)
    full_out, full_lse = kernel.forward(q, k, v, False, scale)
    assert (out - full_out).abs().max() < 1e-12 and (lse - full_lse).abs().max() < 1e-12
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for kv in halves:
        gq, gk, gv = kernel.backward(dout, q, k[:, kv], v[:, kv], out, lse, False, scale)
        dq += gq
        dk[:, kv] += gk
        dv[:, kv] += gv
    for got, want in zip((dq, dk, dv), kernel.backward(dout, q, k, v, full_out, full_lse, False, scale)):
        assert (got - want).abs().max() < 1e-12


def test_merge_handles_empty_rows():
    out = torch.randn(1, 3, 2, 4, dtype=torch.float64)
    lse = torch.tensor([[[0.5, float("-inf"), 1.0]] * 2], dtype=torch.float64)
    empty_out = torch.zeros_like(out)
    empty_lse = torch.full_like(lse, float("-inf"))
    merged, merged_lse = merge_lse(out, lse, empty_out, empty_lse)
    assert torch.isfinite(merged).all()
    assert torch.equal(merged_lse, lse)
    assert torch.allclose(merged[:, [0, 2]], out[:, [0, 2]])
    assert torch.equal(merged[:, 1], torch.zeros_like(merged[:, 1]))


def test_bf16_block_stays_within_bound():
    q, k, v, _ = _inputs(n=32, dtype=torch.float64)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    out, lse = CpuFlashKernel().forward(qb, kb, vb, True, q.shape[-1] ** -0.5)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref_out, ref_lse = reference_attention(qb, kb, vb, True)
    assert (out.double() - ref_out).abs().max() < 2e-2 * ref_out.abs().max()
    assert (lse.double() - ref_lse).abs().max() < 1e-4 * ref_lse.abs().max()


def test_get_kernel_selection_and_errors():
    assert get_kernel("auto", "cpu", torch.float32).name == "cpu_flash"
    assert get_kernel("math", "cpu", torch.float64).name == "math"
    with pytest.raises(ValueError, match="unknown attention kernel"):
        get_kernel("nope")
    with pytest.raises(ValueError, match="does not support"):
        get_kernel("sdpa_flash", "cpu", torch.float32)
    with pytest.raises(ValueError, match="causal block needs seq_q == seq_k"):
        CpuFlashKernel().forward(torch.randn(1, 4, 2, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8), True, 1.0)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        MathKernel().forward(torch.randn(1, 4, 3, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), False, 1.0)
