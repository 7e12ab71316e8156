"""FPDT's chunk loop (arXiv 2408.16978), shared by `FpdtAttention` (fpdt.py) and the whole-block
pipeline `FpdtBlock` (fpdt_block.py).

Layout `TokenLayout("contiguous", outer=1, inner=P, chunks=u)`: the sequence of N tokens is cut
into u chunks of C = N/u tokens and each chunk into P pieces of c = C/P tokens; rank r holds
piece r of every chunk, so its local tensors [b, N/P, h, d] are u pieces of c tokens. One
all-to-all per chunk (scatter heads, gather the sequence) turns piece j into the whole global
chunk j for h/P heads. Causality is chunk-lower-triangular: chunk i attends chunks < i fully
and itself with the causal diagonal mask.

`forward_chunks` runs the forward loop (online softmax of each query chunk over the K/V chunks
it sees); `backward_chunks` the backward (outer loop over K/V chunk j, inner over the query
chunks that see it, yielding each chunk's dq/dk/dv as soon as they are final). Every chunk
(q, k/v, o, lse, dO, dq) lives in a `ChunkStore` (seqpar.offload): on the device, or in host
memory with offload, fetched back one chunk at a time with the next one prefetched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from ..comm import Comm
from ..documents import DocMask
from ..kernels import BlockKernel, LseAccumulator, accum_dtype
from ..offload import ChunkStore, streamed
from .base import backward_blocks, forward_blocks
from .ulysses import scatter_heads

__all__ = ["ChunkPlan", "ChunkCall", "heads_to_seq", "seq_to_heads", "scatter_pieces", "attend_chunk",
           "forward_chunks", "backward_chunks"]


# -- chunk plan and all-to-alls ---------------------------------------------------------------
@dataclass(frozen=True)
class ChunkPlan:
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


def heads_to_seq(x: Tensor, comm: Comm) -> Tensor:
    """[b, C, h/P, d] (one chunk, some heads) -> [b, C/P, h, d] (this rank's piece, all heads)."""
    return comm.all_to_all(x.contiguous(), scatter_dim=1, gather_dim=2)


def seq_to_heads(x: Tensor, comm: Comm) -> Tensor:
    """[b, C/P, h, d] -> [b, C, h/P, d]: inverse of heads_to_seq."""
    return comm.all_to_all(x.contiguous(), scatter_dim=2, gather_dim=1)


@dataclass(frozen=True)
class ChunkCall:
    """Per-call arguments of FpdtAttention (the store itself is mutable state of the call)."""

    comm: Comm
    plan: ChunkPlan
    scale: float
    kernel: BlockKernel
    store: ChunkStore
    kv_rep: int        # K/V head replication for Ulysses (kv_heads < P)
    need_lse: bool
    keep: bool         # keep the chunks for backward
    mask: DocMask | None = None
    sinks: Tensor | None = None  # [h/P] attention-sink logits of this rank's heads

    def kv_chunks(self, i: int) -> list[int]:
        """K/V chunks query chunk i attends; under a window only those with visible keys."""
        seen = self.plan.kv_for(i)
        if self.mask is None or self.mask.window is None:
            return list(seen)
        return [j for j in seen if self.plan.blocks(i, j, self.mask)]

    def q_chunks(self, j: int) -> list[int]:
        """Query chunks that attend K/V chunk j; under a window only those that see some of it."""
        seen = self.plan.q_for(j)
        if self.mask is None or self.mask.window is None:
            return list(seen)
        return [i for i in seen if self.plan.blocks(i, j, self.mask)]


# -- forward ---------------------------------------------------------------------------------
def scatter_pieces(qj: Tensor, kj: Tensor, vj: Tensor, j: int, call: ChunkCall) -> None:
    """All-to-all this rank's pieces of chunk j (q [b, c, h, d], k/v [b, c, hkv, d], fused) and
    store the global chunk: q_j [b, C, h/P, d], kv_j [2, b, C, hkv', d]."""
    qh, kh, vh = scatter_heads(qj, kj, vj, call.comm)
    call.store.put(("q", j), qh.contiguous())
    call.store.put(("kv", j), torch.stack([kh, vh]))


def attend_chunk(i: int, call: ChunkCall, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Online softmax of q chunk i over its visible K/V chunks -> o_i [b, C, h/P, d], lse_i [b, h/P, C]."""
    plan, store = call.plan, call.store
    qi = store.get(("q", i))
    acc = LseAccumulator(qi, call.sinks)
    kv_chunks = call.kv_chunks(i)
    for j, (kv,) in zip(kv_chunks, streamed(store, [(("kv", j),) for j in kv_chunks])):
        forward_blocks(acc, qi, kv[0], kv[1], plan.blocks(i, j, call.mask), call.kernel, call.scale)
    return acc.result(dtype)


def forward_chunks(call: ChunkCall, qkv_of: Callable[[int], tuple[Tensor, Tensor, Tensor]],
                   emit: Callable[[int, Tensor, Tensor], None], keep: bool) -> None:
    """FPDT's forward chunk loop, shared by the attention and the whole-block pipeline.

    For each query chunk i in order: the K/V chunks it sees are projected and scattered just in
    time (causal: chunk i itself; full attention: all of them before chunk 0) from
    qkv_of(j) -> this rank's pieces q [b, c, h, d], k/v [b, c, hkv, d] of chunk j; chunk i is
    attended (autocast off: the kernels compute in the pieces' dtype) and emit(i, o_i, lse_i)
    gets o_i [b, C, h/P, d] and lse_i [b, h/P, C]. keep: leave q/kv/o/lse of every chunk in the
    store for backward_chunks; else each q chunk is dropped once attended."""
    plan, store = call.plan, call.store
    scattered, dtype = 0, None
    for i in range(plan.chunks):
        while scattered <= plan.kv_for(i)[-1]:
            q, k, v = qkv_of(scattered)
            scatter_pieces(q, k, v, scattered, call)
            dtype = q.dtype
            del q, k, v
            scattered += 1
        with torch.autocast(store.device.type, enabled=False):
            oi, lse_i = attend_chunk(i, call, dtype)
        emit(i, oi, lse_i)
        if keep:
            store.put(("o", i), oi)
            store.put(("lse", i), lse_i)
        else:
            store.discard(("q", i))


# -- backward --------------------------------------------------------------------------------
def kv_grads_to_local(dkv: Tensor, dtype: torch.dtype, call: ChunkCall) -> Tensor:
    """dkv [2, b, C, hkv', d] of one global chunk -> this rank's piece [2, b, c, hkv, d] (one all-to-all)."""
    local = call.comm.all_to_all(dkv.to(dtype), scatter_dim=2, gather_dim=3)  # [2, b, c, hkv*rep, d]
    if call.kv_rep > 1:
        two, b, c, heads, d = local.shape
        local = local.view(two, b, c, heads // call.kv_rep, call.kv_rep, d).sum(4)
    return local


def complete_after(j: int, plan: ChunkPlan) -> list[int]:
    """Chunks whose dq, dk and dv are final once K/V chunk j is done: causal, chunk j itself
    (later K/V chunks are masked for it); full attention, every chunk after the last one."""
    return [i for i in range(plan.chunks) if max(i, plan.kv_for(i)[-1]) == j]


def backward_chunks(call: ChunkCall, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
    """Yield (i, dq_i, dk_i, dv_i), this rank's pieces [b, c, h(kv), d] of chunk i's gradients, as
    soon as they are final. The forward's q/kv/o/lse chunks and the head-scattered dO chunks
    ("do", i) must be in the store; each chunk's entries are dropped once it is yielded."""
    plan, store = call.plan, call.store
    kv_groups = [(("kv", j),) for j in range(plan.chunks)]
    for j, (kv,) in zip(range(plan.chunks), streamed(store, kv_groups)):
        dkv = torch.zeros(kv.shape, dtype=accum_dtype(kv.dtype), device=kv.device)
        q_chunks = call.q_chunks(j)
        groups = [(("q", i), ("o", i), ("lse", i), ("do", i), ("dq", i)) for i in q_chunks]
        for i, (qi, oi, lse_i, do_i, dq_i) in zip(q_chunks, streamed(store, groups)):
            if dq_i is None:
                dq_i = torch.zeros(qi.shape, dtype=accum_dtype(qi.dtype), device=qi.device)
            backward_blocks(dq_i, dkv[0], dkv[1], do_i, qi, kv[0], kv[1], oi, lse_i, plan.blocks(i, j, call.mask),
                            call.kernel, call.scale)
            store.put(("dq", i), dq_i)
        del kv
        store.discard(("kv", j))
        dkv_j, done = kv_grads_to_local(dkv, dtype, call), complete_after(j, plan)
        del dkv
        if j not in done:  # full attention: held until its dq is final, after the last K/V chunk
            store.put(("dkv", j), dkv_j)
        for i in done:
            dq_i = heads_to_seq(store.get(("dq", i)).to(dtype), call.comm)
            dkv_i = dkv_j if i == j else store.get(("dkv", i))
            for name in ("q", "o", "lse", "do", "dq", "dkv"):
                store.discard((name, i))
            yield i, dq_i, dkv_i[0], dkv_i[1]
