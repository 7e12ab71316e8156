"""FPDT (arXiv 2408.16978): chunked Ulysses attention with host offload.

Layout `TokenLayout("contiguous", outer=1, inner=P, chunks=u)`: the sequence of N tokens
is cut into u chunks of C = N/u tokens and each chunk into P pieces of c = C/P tokens;
rank r holds piece r of every chunk, so its local tensors [b, N/P, h, d] are u pieces of
c tokens. One all-to-all per chunk (scatter heads, gather the sequence) turns piece j
into the whole global chunk j for h/P heads. Causality is chunk-lower-triangular: chunk
i attends chunks < i fully and itself with the causal diagonal mask.

Forward (one autograd Function): for every query chunk i, online softmax of q_i over
the K/V chunks it sees, then the inverse all-to-all of o_i (and of lse_i when asked).
Backward: dO chunks are all-to-all'ed first; outer loop over K/V chunk j (dK_j, dV_j
accumulate on the device and return to their owners with one all-to-all), inner loop
over query chunks i (>= j when causal) with the global o_i / lse_i; dq_i accumulators
(fp32, fp64 for fp64) live in the chunk store and return after the last K/V chunk.

Every chunk (q, k/v, o, lse, dO, dq) lives in a `ChunkStore` (seqpar.offload): on the device without
offload, in host memory with offload, fetched back one chunk at a time with the next
one prefetched (double buffer), so the device working set is a few chunks whatever the
sequence length. Communication volume equals Ulysses' exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from ..comm import Comm
from ..documents import DocMask
from ..kernels import BlockKernel, LseAccumulator, accum_dtype
from ..layout import TokenLayout
from ..offload import ChunkStore, OffloadStats, streamed
from . import register
from .base import Strategy, backward_blocks, forward_blocks, positive_int
from .ulysses import kv_replication, scatter_heads

__all__ = ["FpdtAttention", "FpdtStrategy"]


# -- chunk plan and all-to-alls ---------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    chunks: int
    piece: int  # local tokens per chunk (c = N / (P u))
    causal: bool

    def kv_for(self, i: int) -> range:
        """K/V chunks query chunk i attends."""
        return range(i + 1) if self.causal else range(self.chunks)

    def q_for(self, j: int) -> range:
        """Query chunks that attend K/V chunk j."""
        return range(j, self.chunks) if self.causal else range(self.chunks)

    def diagonal(self, i: int, j: int) -> bool:
        return self.causal and i == j

    def blocks(self, i: int, j: int, mask: DocMask | None) -> list:
        """Sub-blocks of query chunk i vs K/V chunk j (global chunks of piece * P tokens)."""
        if mask is None:
            return [(slice(None), slice(None), self.diagonal(i, j))]
        size = mask.docs.seq_len // self.chunks  # C = N / u tokens per global chunk
        pos = lambda c: torch.arange(c * size, (c + 1) * size)  # noqa: E731
        return mask.pairs(pos(i), pos(j), key=("fpdt", i, j))

    def rows(self, j: int) -> slice:
        """The local sequence positions of this rank's piece of chunk j."""
        return slice(j * self.piece, (j + 1) * self.piece)

    def local(self, x: Tensor, j: int, dim: int = 1) -> Tensor:
        """This rank's piece of chunk j of a local tensor (sequence along `dim`)."""
        rows = self.rows(j)
        return x.narrow(dim, rows.start, rows.stop - rows.start)


def _heads_to_seq(x: Tensor, comm: Comm) -> Tensor:
    """[b, C, h/P, d] (one chunk, some heads) -> [b, C/P, h, d] (this rank's piece, all heads)."""
    return comm.all_to_all(x.contiguous(), scatter_dim=1, gather_dim=2)


def _seq_to_heads(x: Tensor, comm: Comm) -> Tensor:
    """[b, C/P, h, d] -> [b, C, h/P, d]: inverse of _heads_to_seq."""
    return comm.all_to_all(x.contiguous(), scatter_dim=2, gather_dim=1)


@dataclass(frozen=True)
class _Call:
    """Per-call arguments of FpdtAttention (the store itself is mutable state of the call)."""

    comm: Comm
    plan: _Plan
    scale: float
    kernel: BlockKernel
    store: ChunkStore
    kv_rep: int        # K/V head replication for Ulysses (kv_heads < P)
    need_lse: bool
    keep: bool         # keep the chunks for backward
    mask: DocMask | None = None


# -- forward ---------------------------------------------------------------------------------
def _scatter_pieces(qj: Tensor, kj: Tensor, vj: Tensor, j: int, call: _Call) -> None:
    """All-to-all this rank's pieces of chunk j (q [b, c, h, d], k/v [b, c, hkv, d], fused) and
    store the global chunk: q_j [b, C, h/P, d], kv_j [2, b, C, hkv', d]."""
    qh, kh, vh = scatter_heads(qj, kj, vj, call.comm)
    call.store.put(("q", j), qh.contiguous())
    call.store.put(("kv", j), torch.stack([kh, vh]))


def _scatter_chunk(q: Tensor, k: Tensor, v: Tensor, j: int, call: _Call) -> None:
    plan = call.plan
    _scatter_pieces(plan.local(q, j), plan.local(k, j), plan.local(v, j), j, call)


def _attend_chunk(i: int, call: _Call, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Online softmax of q chunk i over its visible K/V chunks -> o_i [b, C, h/P, d], lse_i [b, h/P, C]."""
    plan, store = call.plan, call.store
    qi = store.get(("q", i))
    acc = LseAccumulator(qi)
    kv_chunks = plan.kv_for(i)
    for j, (kv,) in zip(kv_chunks, streamed(store, [(("kv", j),) for j in kv_chunks])):
        forward_blocks(acc, qi, kv[0], kv[1], plan.blocks(i, j, call.mask), call.kernel, call.scale)
    return acc.result(dtype)


def _forward(q: Tensor, k: Tensor, v: Tensor, call: _Call) -> tuple[Tensor, Tensor]:
    plan, store, comm = call.plan, call.store, call.comm
    out = torch.empty_like(q)
    b, s, h, _ = q.shape
    lse = q.new_empty((b, h, s) if call.need_lse else (0,), dtype=accum_dtype(q.dtype))
    scattered = 0
    for i in range(plan.chunks):
        while scattered <= plan.kv_for(i)[-1]:  # causal: just in time; otherwise all before chunk 0
            _scatter_chunk(q, k, v, scattered, call)
            scattered += 1
        oi, lse_i = _attend_chunk(i, call, q.dtype)
        plan.local(out, i).copy_(_heads_to_seq(oi, comm))
        if call.need_lse:
            plan.local(lse, i, dim=2).copy_(comm.all_to_all(lse_i, scatter_dim=2, gather_dim=1))
        if call.keep:
            store.put(("o", i), oi)
            store.put(("lse", i), lse_i)
    return out, lse


# -- backward --------------------------------------------------------------------------------
def _kv_grads_to_local(dkv: Tensor, dtype: torch.dtype, call: _Call) -> Tensor:
    """dkv [2, b, C, hkv', d] of one global chunk -> this rank's piece [2, b, c, hkv, d] (one all-to-all)."""
    local = call.comm.all_to_all(dkv.to(dtype), scatter_dim=2, gather_dim=3)  # [2, b, c, hkv*rep, d]
    if call.kv_rep > 1:
        two, b, c, heads, d = local.shape
        local = local.view(two, b, c, heads // call.kv_rep, call.kv_rep, d).sum(4)
    return local


def _complete_after(j: int, plan: _Plan) -> list[int]:
    """Chunks whose dq, dk and dv are final once K/V chunk j is done: causal, chunk j itself
    (later K/V chunks are masked for it); full attention, every chunk after the last one."""
    return [i for i in range(plan.chunks) if max(i, plan.kv_for(i)[-1]) == j]


def _backward_chunks(call: _Call, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
    """Yield (i, dq_i, dk_i, dv_i), this rank's pieces [b, c, h(kv), d] of chunk i's gradients, as
    soon as they are final. The forward's q/kv/o/lse chunks and the head-scattered dO chunks
    ("do", i) must be in the store; each chunk's entries are dropped once it is yielded."""
    plan, store = call.plan, call.store
    kv_groups = [(("kv", j),) for j in range(plan.chunks)]
    for j, (kv,) in zip(range(plan.chunks), streamed(store, kv_groups)):
        dkv = torch.zeros(kv.shape, dtype=accum_dtype(kv.dtype), device=kv.device)
        q_chunks = plan.q_for(j)
        groups = [(("q", i), ("o", i), ("lse", i), ("do", i), ("dq", i)) for i in q_chunks]
        for i, (qi, oi, lse_i, do_i, dq_i) in zip(q_chunks, streamed(store, groups)):
            if dq_i is None:
                dq_i = torch.zeros(qi.shape, dtype=accum_dtype(qi.dtype), device=qi.device)
            backward_blocks(dq_i, dkv[0], dkv[1], do_i, qi, kv[0], kv[1], oi, lse_i, plan.blocks(i, j, call.mask),
                            call.kernel, call.scale)
            store.put(("dq", i), dq_i)
        del kv
        store.discard(("kv", j))
        dkv_j, done = _kv_grads_to_local(dkv, dtype, call), _complete_after(j, plan)
        del dkv
        if j not in done:  # full attention: held until its dq is final, after the last K/V chunk
            store.put(("dkv", j), dkv_j)
        for i in done:
            dq_i = _heads_to_seq(store.get(("dq", i)).to(dtype), call.comm)
            dkv_i = dkv_j if i == j else store.get(("dkv", i))
            for name in ("q", "o", "lse", "do", "dq", "dkv"):
                store.discard((name, i))
            yield i, dq_i, dkv_i[0], dkv_i[1]


def _backward(dout: Tensor, q_meta: Tensor, kv_meta: Tensor, call: _Call) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv for the forward's inputs; q_meta / kv_meta are meta tensors shaped like q and k."""
    plan = call.plan
    for i in range(plan.chunks):
        call.store.put(("do", i), _seq_to_heads(plan.local(dout, i).to(q_meta.dtype), call.comm))
    dq = torch.empty_like(q_meta, device=dout.device)
    dk, dv = torch.empty_like(kv_meta, device=dout.device), torch.empty_like(kv_meta, device=dout.device)
    for i, dq_i, dk_i, dv_i in _backward_chunks(call, q_meta.dtype):
        plan.local(dq, i).copy_(dq_i)
        plan.local(dk, i).copy_(dk_i)
        plan.local(dv, i).copy_(dv_i)
    return dq, dk, dv


class FpdtAttention(torch.autograd.Function):
    """q [b, N/P, h, d], k/v [b, N/P, hkv, d] in the FPDT layout -> out like q, lse [b, h, N/P]
    (an empty tensor unless need_lse)."""

    @staticmethod
    def forward(ctx, q, k, v, call: _Call):
        out, lse = _forward(q, k, v, call)
        if call.keep:  # everything backward needs is in the store; q/k/v themselves are not kept
            ctx.call, ctx.metas = call, (q.to("meta"), k.to("meta"))
        else:
            call.store.clear()
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        call = ctx.call
        grads = _backward(dout, *ctx.metas, call)
        call.store.clear()
        return (*grads, None)


@register("fpdt")
class FpdtStrategy(Strategy):
    """FPDT over the whole group: Ulysses degree = group size, `chunks` chunks, optional offload.

    `last_offload_stats` holds the OffloadStats of the latest attention call.
    """

    uses = ("ulysses", "ring", "chunks", "offload")
    layouts = ("contiguous",)
    default_layout = "contiguous"
    layout_reason = "rank r holds piece r of every chunk; causal balance comes from the chunking"

    @classmethod
    def _resolve(cls, cfg, size, kind):
        if cfg.ring not in (None, 1) or cfg.ulysses not in (None, 1, size):
            raise ValueError(f"strategy 'fpdt' runs Ulysses over the whole group (degree {size}); "
                             f"got ulysses={cfg.ulysses}, ring={cfg.ring}")
        offload = False if cfg.offload is None else cfg.offload
        if not isinstance(offload, bool):
            raise ValueError(f"offload must be True or False, got {offload!r}")
        chunks = positive_int(cls.name, "chunks", cfg.chunks) if cfg.chunks is not None else 1
        layout = TokenLayout(kind, outer=1, inner=size, chunks=chunks)
        return cls._settings(cfg, size, layout, ulysses=size, chunks=chunks, offload=offload)

    def __init__(self, settings, mesh, comm, stats):
        super().__init__(settings, mesh, comm, stats)
        self.last_offload_stats: OffloadStats | None = None

    def describe(self):
        s = self.settings
        return {**super().describe(), "ulysses": s.size, "chunks": s.chunks, "offload": s.offload}

    def chunked_block(self, x, fns, causal, scale, kernel, mask=None, recompute=False):
        """A whole block by FPDT's per-chunk pipeline (attention/fpdt_block.py): x [b, N/P, H] ->
        the block's output like x; `fns` (BlockFunctions) holds its two position-wise halves;
        recompute: keep only x for backward and run the attention loop again there."""
        from .fpdt_block import FpdtBlock
        s = self.settings
        kv_rep = kv_replication(fns.heads, fns.kv_heads, s.size)
        store = ChunkStore(x.device, s.offload)
        self.last_offload_stats = store.stats
        keep = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in fns.params))
        plan = _Plan(s.chunks, x.shape[1] // s.chunks, causal)
        call = _Call(self.comm, plan, scale, kernel, store, kv_rep, False, keep, mask)
        return FpdtBlock.apply(x, call, fns, recompute, *fns.params)

    def attention(self, q, k, v, causal, scale, need_lse, kernel, mask=None):
        s = self.settings
        kv_rep = kv_replication(q.shape[2], k.shape[2], s.size)
        store = ChunkStore(q.device, s.offload)
        self.last_offload_stats = store.stats
        keep = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        plan = _Plan(s.chunks, q.shape[1] // s.chunks, causal)
        call = _Call(self.comm, plan, scale, kernel, store, kv_rep, need_lse, keep, mask)
        out, lse = FpdtAttention.apply(q, k, v, call)
        return out, (lse if need_lse else None)
