"""Token layouts: which global sequence positions each rank holds, and in what order.

A layout is a two-level split of a sequence of N tokens over `outer * inner` ranks,
rank = outer_rank * inner + inner_rank:

1. the *outer* split balances causal work across the ranks that exchange K/V blocks
   (ring ranks, WallFacer teams) with one of
   - ``contiguous``: outer rank o holds [o*N/outer, (o+1)*N/outer);
   - ``zigzag``: 2*outer chunks, outer rank o holds chunks o and 2*outer-1-o;
   - ``striped``: token i goes to outer rank i % outer;
   - ``documents``: packed documents (`cu` boundaries), each document cut into 2*outer
     chunks placed zigzag (TransformerEngine's THD layout), with the tokens that do not
     divide evenly dealt round-robin so every outer rank holds N/outer tokens
     (`document_zigzag`); the layout of one batch, built by `with_documents(cu)`;
2. the *inner* split cuts the outer rank's token list into `chunks` consecutive chunks,
   each cut into `inner` equal pieces; the inner rank keeps its piece of every chunk
   (inner = Ulysses degree / team size; chunks > 1 is FPDT's chunk interleaving).

An all-to-all or all-gather inside the inner group therefore reassembles exactly the
outer rank's token list, which is what the block-pair rules in `block_pairs` assume.
Tokens, positions (RoPE) and labels all use the same `local_indices`.

Valid lengths are the multiples of `granularity()`: the outer split needs N % outer == 0
(zigzag: N % 2*outer), the inner split N/outer % (inner * chunks) == 0, so
granularity = lcm(outer or 2*outer, outer * inner * chunks). Zigzag's half blocks need
nothing more, the inner group reassembling the whole outer list (e.g. USP 2x2 zigzag: 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Sequence

import torch
from torch import Tensor

from .documents import DocMask

__all__ = ["LAYOUTS", "DOCUMENTS", "TokenLayout", "block_pairs", "document_zigzag"]

LAYOUTS = ("contiguous", "zigzag", "striped")
DOCUMENTS = "documents"  # the document-balanced layout (needs cu_seqlens with every batch)


@dataclass(frozen=True)
class TokenLayout:
    kind: str = "contiguous"
    outer: int = 1
    inner: int = 1
    chunks: int = 1
    cu: tuple[int, ...] | None = None  # document boundaries of the batch (documents layout only)

    def __post_init__(self):
        if self.kind not in LAYOUTS + (DOCUMENTS,):
            raise ValueError(f"unknown layout {self.kind!r}; choose from {LAYOUTS + (DOCUMENTS,)}")
        for name in ("outer", "inner", "chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"layout {name} must be >= 1, got {getattr(self, name)}")

    @property
    def size(self) -> int:
        return self.outer * self.inner

    def with_documents(self, cu: Sequence[int]) -> "TokenLayout":
        """This layout for a batch with document boundaries cu (only the documents layout changes)."""
        return replace(self, cu=tuple(cu)) if self.kind == DOCUMENTS else self

    def granularity(self) -> int:
        """Valid sequence lengths are exactly the positive multiples of this (module docstring)."""
        outer_split = 2 * self.outer if self.kind == "zigzag" else self.outer  # documents: outer
        return math.lcm(outer_split, self.outer * self.inner * self.chunks)

    def error(self, seq_len: int) -> str | None:
        """Why `seq_len` tokens do not fit this layout (naming the nearest valid lengths), or None."""
        g = self.granularity()
        if seq_len > 0 and seq_len % g == 0:
            return None
        below, above = seq_len // g * g, (max(seq_len, 0) // g + 1) * g
        nearest = f"nearest valid lengths: {below} and {above}" if below > 0 else f"shortest valid length: {above}"
        chunks = f" with {self.chunks} chunks" if self.chunks > 1 else ""
        return (f"sequence length {seq_len} is not divisible by {g} as the {self.kind} layout over "
                f"{self.outer} x {self.inner} ranks{chunks} requires; {nearest}")

    def check(self, seq_len: int) -> None:
        error = self.error(seq_len)
        if error:
            raise ValueError(error)

    def outer_indices(self, seq_len: int, outer_rank: int) -> Tensor:
        """Global positions held by one outer rank, in local order (increasing positions)."""
        self.check(seq_len)
        n = self.outer
        if self.kind == "contiguous":
            per = seq_len // n
            return torch.arange(outer_rank * per, (outer_rank + 1) * per)
        if self.kind == "zigzag":
            c = seq_len // (2 * n)
            first = torch.arange(outer_rank * c, (outer_rank + 1) * c)
            second = torch.arange((2 * n - 1 - outer_rank) * c, (2 * n - outer_rank) * c)
            return torch.cat([first, second])
        if self.kind == DOCUMENTS:
            if self.cu is None or self.cu[-1] != seq_len:
                raise ValueError("the 'documents' layout needs the batch's cu_seqlens (ending at the sequence "
                                 f"length {seq_len}): pass cu_seqlens= to shard, unshard, positions and attention")
            return document_zigzag(self.cu, n)[outer_rank]
        return torch.arange(outer_rank, seq_len, n)

    def local_indices(self, seq_len: int, rank: int) -> Tensor:
        """Global positions held by `rank` (0 <= rank < outer*inner), in local order."""
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} outside layout of {self.size} ranks")
        outer_rank, inner_rank = divmod(rank, self.inner)
        idx = self.outer_indices(seq_len, outer_rank)
        return idx.view(self.chunks, self.inner, -1)[:, inner_rank].reshape(-1)

    def all_indices(self, seq_len: int) -> Tensor:
        """Concatenation of every rank's local indices in rank order (a permutation of 0..N-1)."""
        return torch.cat([self.local_indices(seq_len, r) for r in range(self.size)])

    def shard(self, x: Tensor, rank: int, dim: int = 1) -> Tensor:
        idx = self.local_indices(x.shape[dim], rank).to(x.device)
        if self.kind == "contiguous" and self.chunks == 1:
            return x.narrow(dim, int(idx[0]), idx.numel())
        return x.index_select(dim, idx)

    def block_pairs(self, causal: bool, q_rank: int, kv_rank: int, n_local: int,
                    mask: DocMask | None = None) -> list:
        """Blocks for outer ranks q_rank, kv_rank holding n_local tokens each: this layout's causal
        rule (see `block_pairs`), or with a document mask its sub-blocks (`DocMask.pairs`)."""
        if mask is None:
            return block_pairs(self.kind, causal, q_rank, kv_rank, n_local)
        layout, n = mask.layout or self, n_local * self.outer
        return mask.pairs(layout.outer_indices(n, q_rank), layout.outer_indices(n, kv_rank), key=(q_rank, kv_rank))

    def unpermute(self, gathered: Tensor, dim: int = 1) -> Tensor:
        """Inverse of sharding: `gathered` is every rank's shard concatenated along dim in rank
        order; returns the tensor in global sequence order."""
        perm = self.all_indices(gathered.shape[dim]).to(gathered.device)
        out = torch.empty_like(gathered)
        return out.index_copy_(dim, perm, gathered)


Pair = tuple[slice, slice, bool]
_ALL = slice(None)


def block_pairs(kind: str, causal: bool, q_rank: int, kv_rank: int, n_local: int) -> list[Pair]:
    """Blocks to compute for queries of outer rank q_rank against K/V of outer rank kv_rank.

    Both hold `n_local` tokens in their layout's local order. Returns a list of
    (q_rows, kv_rows, causal) with seq_q == seq_k whenever causal (top-left diagonal
    mask); an empty list means the whole block is masked out. This is the per-step rule
    of load-balanced ring attention (TransformerEngine-style half blocks for zigzag).
    """
    if not causal:
        return [(_ALL, _ALL, False)]
    if q_rank == kv_rank:
        return [(_ALL, _ALL, True)]
    if kind == "contiguous":
        return [(_ALL, _ALL, False)] if kv_rank < q_rank else []
    if kind == "zigzag":
        half = n_local // 2
        if kv_rank < q_rank:  # KV's first chunk precedes both query chunks, its second follows both
            return [(_ALL, slice(0, half), False)]
        return [(slice(half, None), _ALL, False)]  # only the late query chunk sees this KV, all of it
    if kind == "striped":
        if kv_rank < q_rank:  # key kv_rank + P*b <= query q_rank + P*a  <=>  b <= a
            return [(_ALL, _ALL, True)]
        return [(slice(1, None), slice(0, n_local - 1), True)] if n_local > 1 else []  # b < a
    if kind == DOCUMENTS:
        raise ValueError("the 'documents' layout needs cu_seqlens in every attention call")
    raise ValueError(f"unknown layout {kind!r}")


@lru_cache(maxsize=16)
def document_zigzag(cu: tuple[int, ...], outer: int) -> tuple[Tensor, ...]:
    """Global positions of each outer rank (sorted) when every document [cu[i], cu[i+1]) is cut
    into 2*outer chunks and outer rank r takes chunks r and 2*outer-1-r; the len % (2*outer)
    leftover tokens of each document go round-robin over the ranks (continuing across
    documents), so ranks hold equal token counts when outer divides the sequence length."""
    parts: list[list[Tensor]] = [[] for _ in range(outer)]
    turn = 0
    for a, b in zip(cu, cu[1:]):
        q, rem = divmod(b - a, 2 * outer)
        extra = [0] * outer
        for i in range(rem):
            extra[(turn + i) % outer] += 1
        turn = (turn + rem) % outer
        sizes = [0] * (2 * outer)
        for r in range(outer):
            sizes[r] = q + (extra[r] + 1) // 2
            sizes[2 * outer - 1 - r] = q + extra[r] // 2
        starts = [a + s for s in torch.tensor([0] + sizes[:-1]).cumsum(0).tolist()]
        for r in range(outer):
            for slot in (r, 2 * outer - 1 - r):
                parts[r].append(torch.arange(starts[slot], starts[slot] + sizes[slot]))
    return tuple(torch.cat(p) for p in parts)
