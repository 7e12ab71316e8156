"""Input checks of `SeqParallel.attention`: one collective decides for every rank.

Each rank encodes its call as a small integer signature (q/k/v shapes and dtypes, the mask,
and a code + hash of its document boundaries); one all-gather shares them and every rank
computes the same verdict from the same data, so a rank with bad local input and the
ranks with good input raise the same ValueError at once. Validated signatures are cached:
the collective runs once per new signature (a new `cu_seqlens` is a new signature).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .documents import CU_ERRORS, cu_message, cu_seqlens_error
from .layout import TokenLayout

__all__ = ["InputChecker"]

_DTYPES = tuple(sorted({t for t in vars(torch).values() if isinstance(t, torch.dtype)}, key=str))  # code: index
_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_MAX_SIGNATURES = 256  # validated signatures kept per context (cleared when full, identically on every rank)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape_code(t: Tensor) -> tuple[int, ...]:
    """(ndim, size 0..3), missing sizes -1: a fixed-width code of a tensor's shape."""
    sizes = list(t.shape[:4])
    return (t.dim(), *sizes, *[-1] * (4 - len(sizes)))


def local_code(window: tuple[int, int] | None, softcap: float | None, sinks: bool) -> tuple[int, int, int, int]:
    """The local-attention arguments of a call as 4 integers: window left / right (-1 unbounded),
    the soft-cap's float64 bits (0: none) and whether sinks are given."""
    left, right = window if window is not None else (-1, -1)
    cap = struct.unpack("<q", struct.pack("<d", float(softcap)))[0] if softcap is not None else 0
    return left, right, cap, int(sinks)


def _softcap_of(bits: int) -> float | None:
    return struct.unpack("<d", struct.pack("<q", bits))[0] if bits else None


@dataclass(frozen=True)
class _Signature:
    """What every rank's attention call must agree on, as 25 integers (`code`)."""

    code: tuple[int, ...]  # q, k, v shape codes (5 each), q/k/v dtype codes, causal, cu_seqlens code + hash,
    #                        window left / right, softcap bits, sinks

    @classmethod
    def of(cls, q: Tensor, k: Tensor, v: Tensor, causal: bool, docs: tuple[int, int] = (0, -1),
           local: tuple[int, int, int, int] = (-1, -1, 0, 0)) -> "_Signature":
        dtypes = tuple(_DTYPES.index(t.dtype) for t in (q, k, v))
        return cls((*_shape_code(q), *_shape_code(k), *_shape_code(v), *dtypes, int(causal), *docs, *local))

    def shape(self, i: int) -> tuple[int, ...]:
        """Shape of tensor i (0: q, 1: k, 2: v), its first 4 sizes when it has more dims."""
        ndim, *sizes = self.code[5 * i:5 * i + 5]
        return tuple(sizes[:min(ndim, 4)])

    def dtypes(self) -> list[str]:
        return [_dtype_name(_DTYPES[c]) for c in self.code[15:18]]

    def fields(self) -> dict[str, Any]:
        """Named values for error messages (sizes -1 where a tensor has fewer dims)."""
        q, k = self.code[1:5], self.code[6:10]
        left, right, cap, sinks = self.code[21:25]
        return {"batch": q[0], "seq_local": q[1], "heads": q[2], "head_dim": q[3], "kv_heads": k[2],
                "dtype": "/".join(dict.fromkeys(self.dtypes())), "causal": bool(self.code[18]),
                "window": (left, right), "softcap": _softcap_of(cap), "sinks": bool(sinks)}

    def error(self, layout: TokenLayout, size: int) -> str | None:
        """Why this call is invalid on `size` ranks holding `layout` shards, or None."""
        q, k, v = (self.shape(i) for i in range(3))
        dims = [self.code[5 * i] for i in range(3)]
        if dims != [4, 4, 4]:
            return ("attention expects q/k/v as [batch, seq_local, heads, head_dim]; got "
                    + ", ".join(f"{n} of {d} dims {s}" for n, d, s in zip("qkv", dims, (q, k, v))))
        if k != v or q[:2] != k[:2] or q[3] != k[3]:
            return (f"incompatible shapes q{q} k{k} v{v}: k and v must match, and share batch, seq_local and "
                    "head_dim with q")
        if k[2] < 1 or q[2] % k[2]:
            return f"heads ({q[2]}) must be a multiple of kv_heads ({k[2]})"
        names = self.dtypes()
        if len(set(names)) > 1:
            return f"q/k/v dtypes differ: {', '.join(names)}"
        if _DTYPES[self.code[15]] not in _FLOATS:
            return (f"attention needs floating-point q/k/v ({', '.join(map(_dtype_name, _FLOATS))}); "
                    f"got {names[0]}")
        return layout.error(q[1] * size) or (cu_message(self.code[19], q[1] * size) if self.code[19] else None)


def _verdict(rows: list[_Signature], layout: TokenLayout) -> str | None:
    """The error every rank raises for the signatures of all ranks (rank order), or None."""
    if all(r == rows[0] for r in rows):
        return rows[0].error(layout, len(rows))
    same = lambda r: r.code[:19] == rows[0].code[:19] and r.code[21:] == rows[0].code[21:]  # noqa: E731
    if all(same(r) for r in rows):  # only the document boundaries differ
        code = max(r.code[19] for r in rows) or len(CU_ERRORS) - 1
        return rows[0].error(layout, len(rows)) or cu_message(code, rows[0].shape(0)[1] * len(rows))
    fields = [r.fields() for r in rows]
    diff = {n: [f[n] for f in fields] for n in fields[0] if len({f[n] for f in fields}) > 1}
    if not diff:  # differing in something else (k/v shapes, dims)
        diff = {"q/k/v shapes": [tuple(r.shape(i) for i in range(3)) for r in rows]}
    text = "; ".join(f"{n} = {', '.join(map(str, vals))}" for n, vals in diff.items())
    if "seq_local" in diff:
        total = sum(diff["seq_local"])
        text += f" ({total} tokens in all" + (f"; {layout.error(total)})" if layout.error(total) else ")")
    return f"ranks 0..{len(rows) - 1} of the sequence-parallel group called attention with mismatched inputs: {text}"


class InputChecker:
    """Validates attention inputs across a group of `size` ranks (cross_rank: with a collective)."""

    def __init__(self, group: dist.ProcessGroup, size: int, cross_rank: bool = True):
        self.group, self.size, self.cross_rank = group, size, cross_rank
        self.collectives = 0  # cross-rank input-check collectives run so far
        self._validated: set[_Signature] = set()

    def validate(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, layout: TokenLayout,
                 cu_seqlens=None, local: tuple[int, int, int, int] = (-1, -1, 0, 0)
                 ) -> tuple[tuple[int, ...], ...] | None:
        """Raise the same ValueError on every rank unless all ranks pass valid, matching inputs;
        returns the document boundaries per batch row (None without cu_seqlens).

        A signature validated once is trusted afterwards, so a rank that later diverges to
        another signature the group validated before is not caught; without cross_rank only
        this rank's inputs are checked."""
        docs, rows = (0, -1), None
        if cu_seqlens is not None and q.dim() == 4:
            code, rows = cu_seqlens_error(cu_seqlens, q.shape[1] * self.size, q.shape[0])
            docs = (code, -1 if rows is None else hash(rows) & (2 ** 62 - 1))
        sig = _Signature.of(q, k, v, causal, docs, local)
        if sig in self._validated:
            return rows
        cross_rank = self.cross_rank and self.size > 1
        error = _verdict(self._gather(sig, q.device) if cross_rank else [sig] * self.size, layout)
        if error:
            raise ValueError(error)
        if cross_rank or self.size == 1:
            if len(self._validated) >= _MAX_SIGNATURES:
                self._validated.clear()
            self._validated.add(sig)
        return rows

    def _gather(self, sig: _Signature, device: torch.device) -> list[_Signature]:
        """Every rank's signature, in rank order (one all-gather; on `device` for NCCL)."""
        device = device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        mine = torch.tensor(sig.code, dtype=torch.int64, device=device)
        rows = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(rows, mine, group=self.group)
        self.collectives += 1
        return [_Signature(tuple(r.tolist())) for r in rows]
