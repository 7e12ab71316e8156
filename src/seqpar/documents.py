"""Packed documents: `cu_seqlens` boundaries and the document block rule.

A packed sequence of N tokens holds documents [cu[i], cu[i+1]); a token attends only to
tokens of its own document (and only earlier ones when causal). Every strategy computes
attention as blocks: queries at sorted global positions `q_pos` against keys at sorted
positions `kv_pos`. Under that mask each query row sees one interval [lo, hi) of the key
rows, and lo, hi never decrease down the rows, so `DocMask.pairs` can cut the block into
sub-blocks every kernel computes exactly:

- a run of rows with the same interval: one fully visible rectangle;
- a run whose interval grows by one key per row: a rectangle left of the diagonal plus a
  top-left causal square (seq_q == seq_k, the kernels' causal convention);
- anything else row by row.

Key rows no query of the block may see are never computed, so a packed batch of short
documents costs what its documents cost. The same rule serves every strategy: the ring
and all-gather strategies pass their layout's positions, Ulysses the whole sequence,
FPDT its chunks.

A sliding window (flash-attn's `window=(left, right)`: key j visible from query i iff
(left < 0 or j >= i - left) and (right < 0 or j <= i + right)) narrows each row's interval
further; the intervals stay non-decreasing. Windowed masks are cut into tiles of `tile` query
rows instead (`tile_intervals`): per tile the key columns every row sees form one unmasked
rectangle (the kernel's fast path), the partially visible edges `Band` blocks of at most
`tile` columns each, and columns no row of the tile sees are skipped, so a causal window of w
over S tokens computes about (w + 2 tile) S pairs per head instead of S^2 / 2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import torch
from torch import Tensor

from .kernels import Band

__all__ = ["Documents", "DocMask", "BPair", "cu_seqlens_error", "document_positions", "visible_pairs",
           "check_window", "tile_intervals", "DEFAULT_TILE"]

BPair = tuple[slice, slice, slice, "bool | Band"]  # (batch rows, q rows, kv rows, causal or Band)
Window = tuple[int, int]
DEFAULT_TILE = 128  # query rows (and at most key columns) per tile of a windowed mask


def check_window(window) -> Window | None:
    """A window (left, right) with -1 for unbounded -> the tuple, None when both are unbounded,
    or a ValueError naming what to change."""
    if window is None:
        return None
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) or w < -1 for w in window)):
        raise ValueError(f"window must be (left, right) with integers >= 0, or -1 for unbounded; got {window!r}")
    left, right = (int(w) for w in window)
    return None if left < 0 and right < 0 else (left, right)

CU_ERRORS = (  # error code -> message; 0 = valid
    "",
    "must be a 1-D integer tensor (or a list of them, one per batch row)",
    "as a list must hold one tensor per batch row",
    "must start at 0",
    "must end at the (global) sequence length",
    "must be strictly increasing",
    "differ between ranks of the sequence-parallel group (they must be the same global boundaries everywhere)",
)


def _rows(cu_seqlens, batch: int) -> tuple[tuple[int, ...], ...] | int:
    """cu_seqlens (tensor or list of tensors) -> one tuple of boundaries per batch row, or an error code."""
    items = list(cu_seqlens) if isinstance(cu_seqlens, (list, tuple)) else None
    if items is not None and len(items) != batch:
        return 2
    for t in items if items is not None else [cu_seqlens]:
        if not isinstance(t, Tensor) or t.dim() != 1 or t.is_floating_point() or t.is_complex() \
                or t.dtype == torch.bool or t.numel() < 2:
            return 1
    if items is None:
        return (tuple(int(x) for x in cu_seqlens.tolist()),) * batch
    return tuple(tuple(int(x) for x in t.tolist()) for t in items)


def cu_seqlens_error(cu_seqlens, seq_len: int, batch: int) -> tuple[int, tuple[tuple[int, ...], ...] | None]:
    """(error code into CU_ERRORS, boundaries per batch row or None) for global length seq_len."""
    rows = _rows(cu_seqlens, batch)
    if isinstance(rows, int):
        return rows, None
    for cu in rows:
        if cu[0] != 0:
            return 3, None
        if cu[-1] != seq_len:
            return 4, None
        if any(b <= a for a, b in zip(cu, cu[1:])):
            return 5, None
    return 0, rows


def check_cu_seqlens(cu_seqlens, seq_len: int, batch: int) -> tuple[tuple[int, ...], ...]:
    """Boundaries per batch row, or ValueError (local check, no collective)."""
    code, rows = cu_seqlens_error(cu_seqlens, seq_len, batch)
    if code:
        raise ValueError(cu_message(code, seq_len))
    return rows


def cu_message(code: int, seq_len: int) -> str:
    return f"cu_seqlens {CU_ERRORS[code]}: expected [0, l1, l1+l2, ..., {seq_len}] over the full sequence"


def document_positions(positions: Tensor, cu: Sequence[int]) -> Tensor:
    """Global positions [n] -> positions inside their own document [n] (restart at 0 at each boundary)."""
    bounds = torch.tensor(cu, dtype=torch.long, device=positions.device)
    doc = torch.searchsorted(bounds, positions, right=True) - 1
    return positions - bounds[doc]


def visible_pairs(cu: Sequence[int], causal: bool, q_pos: Tensor | None = None, kv_pos: Tensor | None = None,
                  window: Window | None = None) -> int:
    """Number of visible (query, key) pairs of queries q_pos vs keys kv_pos (default: all tokens)."""
    q_pos = torch.arange(cu[-1]) if q_pos is None else q_pos
    kv_pos = torch.arange(cu[-1]) if kv_pos is None else kv_pos
    lo, hi = _intervals(q_pos, kv_pos, cu, causal, window)
    return int((hi - lo).sum())


def _intervals(q_pos: Tensor, kv_pos: Tensor, cu: Sequence[int], causal: bool,
               window: Window | None = None) -> tuple[Tensor, Tensor]:
    """Visible key rows [lo[i], hi[i]) of each query row i (positions sorted increasing)."""
    bounds = torch.tensor(cu, dtype=torch.long)
    q_pos, kv_pos = q_pos.long().cpu(), kv_pos.long().cpu()
    doc = torch.searchsorted(bounds, q_pos, right=True) - 1
    lo = torch.searchsorted(kv_pos, bounds[doc])
    hi = torch.searchsorted(kv_pos, q_pos, right=True) if causal else torch.searchsorted(kv_pos, bounds[doc + 1])
    if window is not None:
        left, right = window
        if left >= 0:
            lo = torch.maximum(lo, torch.searchsorted(kv_pos, q_pos - left))
        if right >= 0:
            hi = torch.minimum(hi, torch.searchsorted(kv_pos, q_pos + right, right=True))
        hi = torch.maximum(hi, lo)
    return lo, hi


def _row_runs(q_pos: Tensor, tile: int) -> list[tuple[int, int]]:
    """Query tiles: runs of rows whose positions advance by the smallest step (a rank's chunks),
    cut every `tile` rows."""
    n = q_pos.numel()
    if n == 0:
        return []
    step = q_pos[1:] - q_pos[:-1]
    cuts = [0] + ((step != step.min()).nonzero().flatten() + 1).tolist() + [n] if n > 1 else [0, n]
    return [(r, min(r + tile, b)) for a, b in zip(cuts, cuts[1:]) for r in range(a, b, tile)]


def _tile_mask(lo: Tensor, hi: Tensor, c0: int, c1: int):
    """The mask of rows (lo, hi) against key columns [c0, c1): None (nothing visible), False (all
    visible), True (exactly a top-left causal square) or a Band."""
    if not bool(((lo < c1) & (hi > c0) & (hi > lo)).any()):
        return None
    if bool(((lo <= c0) & (hi >= c1)).all()):
        return False
    rows = lo.numel()
    if rows == c1 - c0 and bool((lo <= c0).all()) and torch.equal(hi, torch.arange(c0 + 1, c1 + 1)):
        return True
    return Band((lo - c0).clamp(0, c1 - c0), (hi - c0).clamp(0, c1 - c0))


def tile_intervals(lo: Tensor, hi: Tensor, q_pos: Tensor, tile: int) -> list[tuple[int, int, int, int, Any]]:
    """Rows with visible key intervals [lo, hi) (non-decreasing) -> tiles (r0, r1, c0, c1, mask):
    per query tile one unmasked rectangle of the keys all its rows see, and the partially visible
    columns either side in tiles of at most `tile` columns (mask True or Band); columns no row of
    the tile sees are skipped."""
    out: list[tuple[int, int, int, int, Any]] = []
    for r0, r1 in _row_runs(q_pos, tile):
        tlo, thi = lo[r0:r1], hi[r0:r1]
        a, b = int(tlo.min()), int(thi.max())
        inner = (int(tlo[-1]), int(thi[0]))
        if torch.equal(thi - thi[0], torch.arange(r1 - r0)) and inner[1] - 1 > inner[0]:
            inner = (inner[0], inner[1] - 1)  # the right edge is the causal diagonal: a square (fast path)
        parts = [(a, inner[0]), inner, (inner[1], b)] if inner[0] < inner[1] else [(a, b)]
        for i, (c0, c1) in enumerate(parts):
            if len(parts) == 3 and i == 1:
                out.append((r0, r1, c0, c1, False))
                continue
            for d0 in range(c0, c1, tile):
                d1 = min(d0 + tile, c1)
                mask = _tile_mask(tlo, thi, d0, d1)
                if mask is not None:
                    out.append((r0, r1, d0, d1, mask))
    return out


def _runs(t: list[int]) -> list[tuple[int, int, int]]:
    """Run-length encoding of t: (start, end, value)."""
    out, start = [], 0
    for i in range(1, len(t) + 1):
        if i == len(t) or t[i] != t[start]:
            out.append((start, i, t[start]))
            start = i
    return out


def split_intervals(lo: Tensor, hi: Tensor) -> list[tuple[int, int, int, int, bool]]:
    """Rows with visible key intervals [lo, hi) (both non-decreasing) -> sub-blocks
    (r0, r1, c0, c1, causal) covering exactly the visible entries; causal ones are squares."""
    n = lo.numel()
    if n == 0:
        return []
    dlo, dhi = lo[1:] - lo[:-1], hi[1:] - hi[:-1]
    same = (dlo == 0) & (dhi == 0)
    step = (dlo == 0) & (dhi == 1) & (hi[:-1] > lo[:-1])
    kind = torch.where(same, 0, torch.where(step, 1, 2)).tolist()  # transition i -> i + 1
    lo_l, hi_l = lo.tolist(), hi.tolist()
    out: list[tuple[int, int, int, int, bool]] = []

    def rect(r0: int, r1: int, c0: int, c1: int) -> None:
        if c1 > c0:
            out.append((r0, r1, c0, c1, False))

    i = 0  # first row not yet covered
    for a, b, k in _runs(kind):
        if k == 2:
            for r in range(max(i, a), b):
                rect(r, r + 1, lo_l[r], hi_l[r])
            i = max(i, b)
            continue
        a = max(a, i)
        if a >= b:
            continue
        if k == 0:  # rows a..b share one interval
            rect(a, b + 1, lo_l[a], hi_l[a])
        else:  # rows a..b: interval grows by one key per row
            c0, size = hi_l[a] - 1, b + 1 - a
            rect(a, b + 1, lo_l[a], c0)
            out.append((a, b + 1, c0, c0 + size, size > 1))
        i = b + 1
    for r in range(i, n):
        rect(r, r + 1, lo_l[r], hi_l[r])
    return out


@dataclass(frozen=True)
class Documents:
    """Document boundaries of a packed batch: `groups` holds (first row, end row, cu) for runs of
    batch rows with the same boundaries over a global sequence of `seq_len` tokens."""

    seq_len: int
    groups: tuple[tuple[int, int, tuple[int, ...]], ...]

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[int, ...]]) -> "Documents":
        if len(set(rows)) == 1:
            return cls(rows[0][-1], ((0, len(rows), rows[0]),))
        groups, start = [], 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[start]:
                groups.append((start, i, rows[start]))
                start = i
        return cls(rows[0][-1], tuple(groups))

    def batch_slice(self, first: int, end: int) -> slice:
        return slice(None) if len(self.groups) == 1 else slice(first, end)


@dataclass(frozen=True)
class DocMask:
    """The mask of one attention call — packed documents and/or a sliding window (one document
    spanning the whole sequence when there are none): `pairs(q_pos, kv_pos, key)` -> sub-blocks
    (batch rows, q rows, kv rows, causal or Band), cached under `key` (e.g. the outer ranks)."""

    docs: Documents
    causal: bool
    layout: Any = None  # the batch's documents layout (a TokenLayout: positions of the outer ranks)
    window: Window | None = None  # (left, right), -1 unbounded (`check_window`)
    tile: int = DEFAULT_TILE      # query rows per tile of a windowed mask
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def whole(cls, seq_len: int, causal: bool, window: Window, tile: int = DEFAULT_TILE) -> "DocMask":
        """A window over one document of `seq_len` tokens (no packed documents)."""
        return cls(Documents(seq_len, ((0, 1, (0, seq_len)),)), causal, None, window, tile)

    def pairs(self, q_pos: Tensor, kv_pos: Tensor, key: Hashable = None) -> list[BPair]:
        """q_pos [nq], kv_pos [nk]: sorted global positions of the block's query and key rows."""
        if key is not None and key in self._cache:
            return self._cache[key]
        out: list[BPair] = []
        for first, end, cu in self.docs.groups:
            rows = self.docs.batch_slice(first, end)
            lo, hi = _intervals(q_pos, kv_pos, cu, self.causal, self.window)
            tiles = split_intervals(lo, hi) if self.window is None else tile_intervals(lo, hi, q_pos, self.tile)
            out += [(rows, slice(r0, r1), slice(c0, c1), causal) for r0, r1, c0, c1, causal in tiles]
        if key is not None:
            self._cache[key] = out
        return out
