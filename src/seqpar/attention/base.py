"""Strategy interface and the block loops shared by all strategies."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..kernels import BlockKernel, LseAccumulator, accum_dtype
from ..layout import Pair, TokenLayout

if TYPE_CHECKING:
    from ..context import SeqParallel

__all__ = ["Strategy", "StrategyConfig", "forward_blocks", "backward_blocks", "grad_buffers"]


@dataclass
class StrategyConfig:
    """Arguments of `seqpar.init`, as given by the user."""

    ulysses: int = 1
    ring: int | None = None
    teams: int = 1
    layout: str = "contiguous"
    chunks: int = 1
    offload: bool = False
    options: dict[str, Any] = field(default_factory=dict)


class Strategy:
    """One sequence-parallel attention method bound to a SeqParallel context.

    Subclasses build their process groups in __init__ (collectively), expose the token
    `layout`, and implement `attention`.
    """

    name = "base"
    #: options (extra keyword arguments of seqpar.init) this strategy accepts
    accepted_options: tuple[str, ...] = ()

    def __init__(self, sp: "SeqParallel", cfg: StrategyConfig):
        self.sp, self.cfg = sp, cfg
        unknown = set(cfg.options) - set(self.accepted_options)
        if unknown:
            raise ValueError(f"strategy {self.name!r} does not take option(s) {sorted(unknown)}; "
                             f"it accepts {list(self.accepted_options) or 'none'}")

    @property
    def layout(self) -> TokenLayout:  # pragma: no cover - abstract
        raise NotImplementedError

    def attention(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                  need_lse: bool) -> tuple[Tensor, Tensor | None]:
        """q [b, s_local, h, d], k/v [b, s_local, hkv, d] -> out [b, s_local, h, d],
        lse [b, h, s_local] (fp32/fp64) or None when not needed."""
        raise NotImplementedError

    def layout_ranks(self) -> list[int]:
        """Layout rank of each group rank (identity unless a strategy places ranks on a topology)."""
        return list(range(self.sp.size))

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "layout": self.layout.kind}

    def _forbid(self, **given) -> None:
        """Reject seqpar.init arguments that mean nothing for this strategy."""
        defaults = StrategyConfig()
        for name, value in given.items():
            if value != getattr(defaults, name) and value is not None:
                raise ValueError(f"strategy {self.name!r} does not use {name}={value!r}")


def forward_blocks(acc: LseAccumulator, q: Tensor, k: Tensor, v: Tensor, pairs: list[Pair],
                   kernel: BlockKernel, scale: float) -> None:
    """Merge attention of q rows vs k/v rows for each (q_rows, kv_rows, causal) pair."""
    for q_rows, kv_rows, causal in pairs:
        out, lse = kernel.forward(q[:, q_rows], k[:, kv_rows], v[:, kv_rows], causal, scale)
        acc.add(out, lse, q_rows)


def backward_blocks(dq: Tensor, dk: Tensor, dv: Tensor, dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
                    out: Tensor, lse: Tensor, pairs: list[Pair], kernel: BlockKernel, scale: float) -> None:
    """Accumulate the block gradients of `pairs` into dq/dk/dv (in place)."""
    for q_rows, kv_rows, causal in pairs:
        gq, gk, gv = kernel.backward(dout[:, q_rows], q[:, q_rows], k[:, kv_rows], v[:, kv_rows],
                                     out[:, q_rows], lse[:, :, q_rows], causal, scale)
        dq[:, q_rows] += gq
        dk[:, kv_rows] += gk
        dv[:, kv_rows] += gv


def grad_buffers(like: Tensor, *leading: int) -> Tensor:
    """Zeroed accumulation buffer [*leading, *like.shape] in the accum dtype of `like`."""
    return torch.zeros(*leading, *like.shape, dtype=accum_dtype(like.dtype), device=like.device)
