"""Plain-PyTorch attention of one block under any mask: the reference every kernel is checked
against, and the path of blocks no fast kernel computes — `Band` blocks (per query row the
visible key rows [lo, hi): sliding windows, the edges of document masks) and logit
soft-capping (scores c * tanh(scores / c), Gemma 2). Tensors as in seqpar.kernels."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Band", "accum_dtype", "expand_kv", "fold_kv_grad", "masked_forward", "masked_backward"]


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for outputs/LSE accumulation: fp64 stays fp64, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True, eq=False)
class Band:
    """The mask of a partially visible block: query row i sees key rows [lo[i], hi[i]) of the block.

    lo, hi: int64 [seq_q] (CPU), relative to the block's key rows, 0 <= lo, hi <= seq_k; an
    empty interval (hi <= lo) is a row that sees nothing in this block."""

    lo: Tensor
    hi: Tensor

    def visible(self, seq_k: int, device: torch.device) -> Tensor:
        """bool [seq_q, seq_k]: True where the key is visible."""
        j = torch.arange(seq_k, device=device)
        return (j >= self.lo.to(device)[:, None]) & (j < self.hi.to(device)[:, None])

    def pairs(self) -> int:
        """Visible (query, key) entries of the block."""
        return int((self.hi - self.lo).clamp(min=0).sum())


def expand_kv(x: Tensor, heads: int) -> Tensor:
    """[b, s, hkv, d] -> [b, s, heads, d] by repeating each kv head for its query group."""
    rep = heads // x.shape[2]
    return x if rep == 1 else x.repeat_interleave(rep, dim=2)


def fold_kv_grad(dx: Tensor, kv_heads: int) -> Tensor:
    """Inverse of expand_kv for gradients: sum each query group back onto its kv head."""
    b, s, h, d = dx.shape
    return dx if h == kv_heads else dx.reshape(b, s, kv_heads, h // kv_heads, d).sum(3)


def _visible(causal, sq: int, sk: int, device: torch.device) -> Tensor | None:
    """bool [sq, sk] of the visible entries of a block mask (None: all visible)."""
    if isinstance(causal, Band):
        return causal.visible(sk, device)
    if causal:
        return torch.ones(sq, sk, dtype=torch.bool, device=device).tril()
    return None


def _probs(q: Tensor, k: Tensor, causal, scale: float, softcap: float | None,
           lse: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """p [b, h, sq, sk] normalised by lse (the block's own when None), lse, and tanh(scores / c)
    under soft-capping (its derivative is needed in backward)."""
    acc = accum_dtype(q.dtype)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), expand_kv(k, q.shape[2]).to(acc)) * scale
    t = None
    if softcap:
        t = torch.tanh(s / softcap)
        s = softcap * t
    visible = _visible(causal, q.shape[1], k.shape[1], q.device)
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    p = torch.where(finite.unsqueeze(-1), p, torch.zeros_like(p))
    return p, lse, t


def masked_forward(q: Tensor, k: Tensor, v: Tensor, causal, scale: float,
                   softcap: float | None) -> tuple[Tensor, Tensor]:
    """One block by plain PyTorch: causal a bool or `Band`, optional soft-capping -> out, lse."""
    p, lse, _ = _probs(q, k, causal, scale, softcap)
    out = torch.einsum("bhqk,bkhd->bqhd", p, expand_kv(v, q.shape[2]).to(p.dtype))
    return out.to(q.dtype), lse


def masked_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal,
                    scale: float, softcap: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block given the global out / lse: dS = P (dP - rowsum(dO O)), times
    1 - tanh^2 under soft-capping, times the scale."""
    acc = accum_dtype(q.dtype)
    p, _, t = _probs(q, k, causal, scale, softcap, lse=lse.to(acc))
    do = dout.to(acc)
    ve = expand_kv(v, q.shape[2]).to(acc)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
    dp = torch.einsum("bqhd,bkhd->bhqk", do, ve)
    delta = (do * out.to(acc)).sum(-1).transpose(1, 2).unsqueeze(-1)  # [b, h, q, 1]
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1 - t * t)
    ds = ds * scale
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, expand_kv(k, q.shape[2]).to(acc))
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.to(acc))
    return dq, fold_kv_grad(dk, k.shape[2]), fold_kv_grad(dv, k.shape[2])
