"""Chunked MLP and chunked LM loss: exact vs unchunked, recompute in backward, bounded logits."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from seqpar.chunked import chunked_lm_loss, chunked_mlp, count_tokens


class LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor produced by an op while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


class CountingMLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.up, self.down, self.calls = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim), 0

    def forward(self, x):
        self.calls += 1
        return self.down(F.gelu(self.up(x)))


def _grads(module, *tensors):
    return [p.grad.clone() for p in module.parameters()] + [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("num_chunks", [1, 3, 4])
def test_chunked_mlp_exact_and_recomputes(num_chunks):
    torch.manual_seed(0)
    mlp = CountingMLP(8).double()
    x = torch.randn(2, 12, 8, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 12, 8, dtype=torch.float64)
    mlp(x).backward(dy)
    ref = _grads(mlp, x)
    ref_out = mlp(x).detach()
    mlp.zero_grad(), x.grad.zero_()
    mlp.calls = 0
    out = chunked_mlp(mlp, x, num_chunks)
    assert mlp.calls == num_chunks
    out.backward(dy)
    assert mlp.calls == (2 * num_chunks if num_chunks > 1 else 1)  # each chunk recomputed once
    assert (out - ref_out).abs().max() < 1e-12
    for got, want in zip(_grads(mlp, x), ref):
        assert (got - want).abs().max() < 1e-12


def test_chunked_mlp_bounds_intermediates():
    mlp = CountingMLP(8)
    x = torch.randn(1, 64, 8, requires_grad=True)
    with LargestTensor() as mode:
        chunked_mlp(mlp, x, 8).sum().backward()
    assert mode.largest < 64 * 4 * 8  # the full [1, 64, 32] hidden layer never exists
    assert mode.largest >= 8 * 4 * 8


def _loss_case(dtype, ignore_some):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 16, 8, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(40, 8, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, 40, (2, 16), generator=g)
    if ignore_some:
        labels[0, :5] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("num_chunks", [1, 4, 7])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_chunked_lm_loss_exact_fp64(num_chunks, reduction):
    hidden, weight, labels = _loss_case(torch.float64, ignore_some=True)
    ref = F.cross_entropy((hidden @ weight.t()).flatten(0, 1), labels.flatten(), reduction=reduction)
    ref.backward()
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    loss = chunked_lm_loss(hidden, weight, labels, num_chunks, reduction=reduction)
    loss.backward()
    assert loss.dtype == torch.float64
    assert abs(loss.item() - ref.item()) < 1e-10 * max(1.0, abs(ref.item()))
    assert (hidden.grad - ref_grads[0]).abs().max() < 1e-12
    assert (weight.grad - ref_grads[1]).abs().max() < 1e-12
    assert count_tokens(labels).item() == 27


def test_chunked_lm_loss_bf16_bound():
    hidden, weight, labels = _loss_case(torch.bfloat16, ignore_some=False)
    ref = F.cross_entropy((hidden @ weight.t()).float().flatten(0, 1), labels.flatten(), reduction="sum")
    loss = chunked_lm_loss(hidden, weight, labels, 4)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 2e-2 * abs(ref.item())  # only the summation order differs


def test_chunked_lm_loss_never_materialises_full_logits():
    hidden, weight, labels = _loss_case(torch.float32, ignore_some=False)
    full_logits = labels.numel() * weight.shape[0]
    with LargestTensor() as mode:
        chunked_lm_loss(hidden, weight, labels, 8).backward()
    assert mode.largest <= max(full_logits // 8, weight.numel())  # one chunk's logits, or dW
    with LargestTensor() as mode:  # the check itself can fail: unchunked does build them
        chunked_lm_loss(hidden, weight, labels, 1).backward()
    assert mode.largest >= full_logits


@pytest.mark.parametrize("kwargs, match", [
    ({"num_chunks": 0}, "num_chunks"),
    ({"reduction": "none"}, "reduction"),
    ({"labels": torch.full((2, 16), 40)}, "labels must lie"),
    ({"labels": torch.zeros(2, 15, dtype=torch.long)}, "shape of hidden"),
    ({"weight": torch.randn(40, 7)}, "do not match"),
    ({"labels": torch.zeros(2, 16)}, "class indices"),
])
def test_chunked_lm_loss_rejects_bad_input(kwargs, match):
    hidden, weight, labels = _loss_case(torch.float32, ignore_some=False)
    args = {"hidden": hidden, "weight": weight, "labels": labels, "num_chunks": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        chunked_lm_loss(**args)


def test_chunked_mlp_rejects_bad_chunks():
    with pytest.raises(ValueError, match="num_chunks"):
        chunked_mlp(nn.Identity(), torch.zeros(1, 4, 2), 0)
