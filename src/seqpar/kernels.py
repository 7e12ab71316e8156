"""Block attention kernels that return the log-sum-exp, and the LSE merge.

Every strategy computes attention as a sum of *blocks*: a slice of queries against
a slice of keys/values. A kernel computes one block forward, returning the block's
output and its log-sum-exp, and one block backward given the *global* output and
LSE (the flash-attention identity dS = P * (dP - rowsum(dO * O)) holds per block when
P is normalised by the global LSE), so partial gradients of all blocks add up exactly.

Tensor layout everywhere: q [batch, seq_q, heads, head_dim], k/v [batch, seq_k,
kv_heads, head_dim] (heads % kv_heads == 0: GQA/MQA), out like q, lse [batch, heads,
seq_q] in `accum_dtype(q.dtype)`. ``causal`` is top-left aligned and needs
seq_q == seq_k (strategies slice blocks so this always holds). Instead of a bool, a block's mask
may be a `Band`: per query row the visible key rows [lo, hi) (sliding windows and the edges of
document masks); banded blocks and any block under logit soft-capping (`softcap` c: scores
become c * tanh(scores / c) before masking, Gemma 2) are computed by the masked math path
(`masked_forward` / `masked_backward`), every other block by the kernel's own fast path.

Inputs may be any strided views (slices, transposes, stride-0 expands): `BlockKernel.forward`
/ `backward` validate them and copy only a tensor whose last stride a kernel cannot use,
then call the kernel's `block_forward` / `block_backward`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor

from .masked import Band, accum_dtype, expand_kv, fold_kv_grad, masked_backward, masked_forward

__all__ = [
    "BlockKernel", "MathKernel", "CpuFlashKernel", "SdpaFlashKernel", "SdpaEfficientKernel",
    "FlashAttnKernel", "get_kernel", "available_kernels", "accum_dtype", "LseAccumulator",
    "merge_lse", "default_scale", "check_kernel_name", "FlopStats", "CountingKernel", "Band", "SoftcapKernel",
    "masked_forward", "masked_backward", "with_sinks",
]


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _check_block(q: Tensor, k: Tensor, v: Tensor, causal) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected [batch, seq, heads, head_dim] tensors, got q{tuple(q.shape)} "
                         f"k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k{tuple(k.shape)} and v{tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"batch/head_dim mismatch: q{tuple(q.shape)} vs k{tuple(k.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]})")
    if causal is True and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal block needs seq_q == seq_k, got {q.shape[1]} and {k.shape[1]}")
    if isinstance(causal, Band) and causal.lo.numel() != q.shape[1]:
        raise ValueError(f"band mask of {causal.lo.numel()} rows for a block of {q.shape[1]} query rows")


def _unit_last_stride(x: Tensor) -> Tensor:
    """x itself when its last dim has stride 1 (any other strides are fine), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


class BlockKernel:
    """Interface: one attention block, forward and backward.

    Callers use `forward` / `backward`, which accept any strided views; subclasses implement
    `block_forward` / `block_backward`, which get validated tensors with a unit last stride
    when `unit_last_stride` is set (flash kernels read head_dim as contiguous memory).
    """

    name = "base"
    unit_last_stride = True

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:  # pragma: no cover
        raise NotImplementedError

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal, scale: float,
                softcap: float | None = None) -> tuple[Tensor, Tensor]:
        """-> out [b, sq, h, d] in q.dtype, lse [b, h, sq] in accum_dtype(q.dtype).
        causal: bool or a `Band`; softcap: c > 0 (scores c * tanh(scores / c)) or None."""
        _check_block(q, k, v, causal)
        if isinstance(causal, Band) or softcap:
            return masked_forward(q, k, v, causal, scale, softcap)
        return self.block_forward(*self._usable(q, k, v), causal, scale)

    def backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 causal, scale: float, softcap: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """-> dq, dk, dv shaped like q, k, v (dtype: accum_dtype). out/lse are the global ones."""
        _check_block(q, k, v, causal)
        if isinstance(causal, Band) or softcap:
            return masked_backward(dout, q, k, v, out, lse, causal, scale, softcap)
        dout, q, k, v, out = self._usable(dout, q, k, v, out)
        return self.block_backward(dout, q, k, v, out, lse, causal, scale)

    def _usable(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(_unit_last_stride(t) for t in tensors) if self.unit_last_stride else tensors

    def block_forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool,
                      scale: float) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def block_backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MathKernel(BlockKernel):
    """Plain PyTorch reference (any device, any dtype, any strides); computes in accum_dtype."""

    name = "math"
    unit_last_stride = False

    def supports(self, device, dtype):
        return True

    def block_forward(self, q, k, v, causal, scale):
        return masked_forward(q, k, v, causal, scale, None)

    def block_backward(self, dout, q, k, v, out, lse, causal, scale):
        return masked_backward(dout, q, k, v, out, lse, causal, scale, None)


def _bhsd(x: Tensor) -> Tensor:
    return x.transpose(1, 2)


class CpuFlashKernel(BlockKernel):
    """torch's flash attention for CPU (`_scaled_dot_product_flash_attention_for_cpu`)."""

    name = "cpu_flash"

    def supports(self, device, dtype):
        return device.type == "cpu" and dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)

    def block_forward(self, q, k, v, causal, scale):
        if q.shape[1] == 0 or k.shape[1] == 0:
            return _empty_block(q)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, scale=scale)
        return _bhsd(out), lse.to(accum_dtype(q.dtype))

    def block_backward(self, dout, q, k, v, out, lse, causal, scale):
        acc = accum_dtype(q.dtype)
        if q.shape[1] == 0 or k.shape[1] == 0:
            return q.new_zeros(q.shape, dtype=acc), k.new_zeros(k.shape, dtype=acc), v.new_zeros(v.shape, dtype=acc)
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _bhsd(dout.to(q.dtype)), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out.to(q.dtype)),
            lse.to(lse_dtype).contiguous(), 0.0, causal, scale=scale)
        return _bhsd(dq).to(acc), _bhsd(dk).to(acc), _bhsd(dv).to(acc)


def _empty_block(q: Tensor) -> tuple[Tensor, Tensor]:
    b, s, h, d = q.shape
    return q.new_zeros(b, s, h, d), torch.full((b, h, s), float("-inf"), dtype=accum_dtype(q.dtype),
                                                device=q.device)


class SdpaFlashKernel(BlockKernel):
    """CUDA flash attention shipped with torch (`_scaled_dot_product_flash_attention`).

    Never run on a GPU in this project (no GPU available); written against the same interface.
    """

    name = "sdpa_flash"

    def supports(self, device, dtype):
        return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)

    def block_forward(self, q, k, v, causal, scale):
        h = q.shape[2]
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            _bhsd(q), _bhsd(expand_kv(k, h)), _bhsd(expand_kv(v, h)), 0.0, causal, False, scale=scale)
        return _bhsd(res[0]), res[1].float()

    def block_backward(self, dout, q, k, v, out, lse, causal, scale):
        h = q.shape[2]
        ke, ve = expand_kv(k, h), expand_kv(v, h)
        sq, sk = q.shape[1], k.shape[1]
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            _bhsd(dout.to(q.dtype)), _bhsd(q), _bhsd(ke), _bhsd(ve), _bhsd(out.to(q.dtype)),
            lse.float().contiguous(), None, None, sq, sk, 0.0, causal, seed, seed, scale=scale)
        return (_bhsd(dq).float(), fold_kv_grad(_bhsd(dk).float(), k.shape[2]),
                fold_kv_grad(_bhsd(dv).float(), k.shape[2]))


class SdpaEfficientKernel(BlockKernel):
    """CUDA memory-efficient attention shipped with torch (fp32/fp16/bf16).

    Never run on a GPU in this project (no GPU available); written against the same interface.
    """

    name = "sdpa_efficient"

    def supports(self, device, dtype):
        return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16, torch.float32)

    def block_forward(self, q, k, v, causal, scale):
        h, sq = q.shape[2], q.shape[1]
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            _bhsd(q), _bhsd(expand_kv(k, h)), _bhsd(expand_kv(v, h)), None, True, 0.0, causal, scale=scale)
        return _bhsd(out), lse[..., :sq].float()

    def block_backward(self, dout, q, k, v, out, lse, causal, scale):
        h = q.shape[2]
        ke, ve = expand_kv(k, h), expand_kv(v, h)
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            _bhsd(dout.to(q.dtype)), _bhsd(q), _bhsd(ke), _bhsd(ve), None, _bhsd(out.to(q.dtype)),
            lse.float().contiguous(), seed, seed, 0.0, [True, True, True, False], causal, scale=scale)
        return (_bhsd(dq).float(), fold_kv_grad(_bhsd(dk).float(), k.shape[2]),
                fold_kv_grad(_bhsd(dv).float(), k.shape[2]))


class FlashAttnKernel(BlockKernel):
    """The `flash-attn` package (Dao-AILab, 2.6+), when installed; native GQA.

    Never run on a GPU in this project (no GPU available); written against the same interface.
    """

    name = "flash_attn"

    def supports(self, device, dtype):
        if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
            return False
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return False
        return True

    def block_forward(self, q, k, v, causal, scale):
        from flash_attn.flash_attn_interface import _flash_attn_forward
        res = _flash_attn_forward(q, k, v, 0.0, scale, causal=causal, window_size_left=-1,
                                  window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False)
        return res[0], res[1].float()

    def block_backward(self, dout, q, k, v, out, lse, causal, scale):
        from flash_attn.flash_attn_interface import _flash_attn_backward
        dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
        _flash_attn_backward(dout=dout.to(q.dtype), q=q, k=k, v=v, out=out.to(q.dtype),
                             softmax_lse=lse.float().contiguous(), dq=dq, dk=dk, dv=dv, dropout_p=0.0,
                             softmax_scale=scale, causal=causal, window_size_left=-1, window_size_right=-1,
                             softcap=0.0, alibi_slopes=None, deterministic=False)
        return dq.float(), dk.float(), dv.float()


_KERNELS: dict[str, Callable[[], BlockKernel]] = {
    k.name: k for k in (MathKernel, CpuFlashKernel, SdpaFlashKernel, SdpaEfficientKernel, FlashAttnKernel)
}
_AUTO_ORDER = ("flash_attn", "sdpa_flash", "cpu_flash", "sdpa_efficient", "math")


def available_kernels() -> list[str]:
    return sorted(_KERNELS)


def check_kernel_name(name: str | BlockKernel) -> None:
    """Raise a clear ValueError for a kernel name that `get_kernel` cannot resolve."""
    if not isinstance(name, BlockKernel) and name != "auto" and name not in _KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; choose from {['auto'] + available_kernels()}")


def get_kernel(name: str | BlockKernel = "auto", device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> BlockKernel:
    """Pick a kernel by name, or the fastest one supporting (device, dtype) for "auto"."""
    if isinstance(name, BlockKernel):
        return name
    device = torch.device(device)
    if name == "auto":
        for cand in _AUTO_ORDER:
            kernel = _KERNELS[cand]()
            if kernel.supports(device, dtype):
                return kernel
    check_kernel_name(name)
    kernel = _KERNELS[name]()
    if not kernel.supports(device, dtype):
        raise ValueError(f"kernel {name!r} does not support device={device.type} dtype={dtype}")
    return kernel


def merge_lse(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial attentions over disjoint key sets (rows with lse=-inf are empty).

    out_* [b, s, h, d], lse_* [b, h, s] -> (out, lse) in accum dtype of the inputs.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_a = torch.exp(lse_a - safe).transpose(1, 2).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).transpose(1, 2).unsqueeze(-1)
    return w_a * out_a + w_b * out_b, lse


def _sink_lse(sinks: Tensor, like_lse: Tensor) -> Tensor:
    """sinks [h] -> lse of the sink "block" [b, h, s] (its logit; it carries no value)."""
    return sinks.detach().to(like_lse.dtype).to(like_lse.device).view(1, -1, 1).expand_as(like_lse)


def with_sinks(out: Tensor, lse: Tensor, sinks: Tensor | None) -> tuple[Tensor, Tensor]:
    """Merge the attention sinks (one logit per head, sinks [h], no value) into a final result:
    out [b, s, h, d], lse [b, h, s] -> out in out.dtype, lse including the sinks (gpt-oss)."""
    if sinks is None:
        return out, lse
    acc = lse.dtype
    merged, lse = merge_lse(out.to(acc), lse, torch.zeros((), dtype=acc, device=out.device), _sink_lse(sinks, lse))
    return merged.to(out.dtype), lse


class LseAccumulator:
    """Online-softmax accumulator of block results for a fixed set of query rows.

    Holds out [b, s, h, d] and lse [b, h, s] in accum dtype; `add` merges a block that
    covers rows `rows` (a slice of the local queries). sinks [h]: attention-sink logits merged
    once from the start (an extra block of lse = sink and zero output).
    """

    def __init__(self, q: Tensor, sinks: Tensor | None = None):
        b, s, h, d = q.shape
        acc = accum_dtype(q.dtype)
        self.out = torch.zeros(b, s, h, d, dtype=acc, device=q.device)
        self.lse = torch.full((b, h, s), float("-inf"), dtype=acc, device=q.device)
        if sinks is not None:
            self.lse.copy_(_sink_lse(sinks, self.lse))

    def add(self, out: Tensor, lse: Tensor, rows: slice = slice(None), batch: slice = slice(None)) -> None:
        o, l_ = merge_lse(self.out[batch, rows], self.lse[batch, :, rows], out.to(self.out.dtype),
                          lse.to(self.lse.dtype))
        self.out[batch, rows] = o
        self.lse[batch, :, rows] = l_

    def result(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.out.to(dtype), self.lse


@dataclass
class FlopStats:
    """Attention work computed by one rank's kernels since the last reset.

    pairs: (query, key) scores computed, summed over batch and heads (a causal square of
    L rows counts L(L+1)/2); flops: 4 * head_dim per pair forward (QK^T and PV), 8 per
    pair backward (dQ, dK, dV and dP; the softmax recompute is not counted).
    """

    forward_pairs: int = 0
    backward_pairs: int = 0
    forward_flops: int = 0
    backward_flops: int = 0
    blocks: int = 0

    def record(self, q: Tensor, k: Tensor, causal, backward: bool) -> None:
        """A banded block counts its whole rectangle (what the masked path computes)."""
        b, sq, h, d = q.shape
        pairs = b * h * (sq * (sq + 1) // 2 if causal is True else sq * k.shape[1])
        if backward:
            self.backward_pairs += pairs
            self.backward_flops += 8 * d * pairs
        else:
            self.forward_pairs += pairs
            self.forward_flops += 4 * d * pairs
        self.blocks += 1

    def snapshot(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)


class CountingKernel(BlockKernel):
    """Any kernel, with every block it computes counted in a FlopStats."""

    def __init__(self, inner: BlockKernel, stats: FlopStats):
        self.inner, self.stats = inner, stats
        self.name = inner.name

    def supports(self, device, dtype):
        return self.inner.supports(device, dtype)

    def forward(self, q, k, v, causal, scale, softcap=None):
        self.stats.record(q, k, causal, backward=False)
        return self.inner.forward(q, k, v, causal, scale, softcap)

    def backward(self, dout, q, k, v, out, lse, causal, scale, softcap=None):
        self.stats.record(q, k, causal, backward=True)
        return self.inner.backward(dout, q, k, v, out, lse, causal, scale, softcap)

    def __repr__(self) -> str:
        return repr(self.inner)


class SoftcapKernel(BlockKernel):
    """Any kernel with logit soft-capping c on every block (scores c * tanh(scores / c), Gemma 2):
    the strategies call it like any kernel; every block goes the masked path."""

    def __init__(self, inner: BlockKernel, softcap: float):
        self.inner, self.softcap = inner, float(softcap)
        self.name = inner.name

    def supports(self, device, dtype):
        return self.inner.supports(device, dtype)

    def forward(self, q, k, v, causal, scale, softcap=None):
        return self.inner.forward(q, k, v, causal, scale, self.softcap)

    def backward(self, dout, q, k, v, out, lse, causal, scale, softcap=None):
        return self.inner.backward(dout, q, k, v, out, lse, causal, scale, self.softcap)

    def __repr__(self) -> str:
        return f"SoftcapKernel({self.inner!r}, {self.softcap})"
