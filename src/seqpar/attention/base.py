"""Strategy interface: settings resolved once (no process group), candidates, and the block loops.

Life of a configuration: `StrategyOptions` (attention/options.py) holds what the user gave
(None = not given); `Strategy.resolve(options, size)` — a classmethod that needs no process
group — rejects what the strategy does not use, fills in its defaults, computes its degrees
and builds its `TokenLayout`, returning a frozen `Settings`. `seqpar.init`, the trainer's
config check, the planner's validity check and `seqpar verify` all call it, so they accept
and reject exactly the same configurations. A strategy instance is then built from the
Settings and the process groups (collectively) and gets the kernel with every call.

A strategy class declares everything a strategy has, in its own file: the options it uses,
its layouts, `_resolve`, `candidates` (what the planner enumerates for it) and `cost_model`
(where the planner finds its schedule and memory model, seqpar.plan.costs for the built-in
ones; a dotted "module:attribute" path so that attention/ does not import the planner).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..comm import Comm, CommStats
from ..documents import BPair, DocMask
from ..kernels import BlockKernel, LseAccumulator, accum_dtype
from ..layout import DOCUMENTS, LAYOUTS, Pair, TokenLayout
from ..mesh import DEFAULT_PLACEMENT, Mesh, check_placement
from .options import COMMON, Settings, StrategyOptions, positive_int

__all__ = ["Strategy", "forward_blocks", "backward_blocks", "grad_buffers", "divisors", "positive_int"]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class Strategy:
    """One sequence-parallel attention method.

    Class attributes declare what it takes: `uses` (StrategyOptions fields it reads besides
    `layout`; any other option given is rejected), `layouts` / `default_layout`,
    `accepted_options` (extras of strategies defined outside seqpar), `double_grad_averaging`
    (LSS), `block_pipeline` (it has `chunked_block`: FPDT), `cost_model` (planner).
    `_resolve` computes the degrees and the layout; `__init__` builds the process groups
    (collective).
    """

    name = "base"
    uses: tuple[str, ...] = ()
    layouts: tuple[str, ...] = LAYOUTS + (DOCUMENTS,)
    default_layout = "zigzag"
    layout_reason = ""  # why only `layouts` work, for the error message
    accepted_options: tuple[str, ...] = ()
    double_grad_averaging = False
    block_pipeline = False
    #: "module:attribute" of the planner's cost model (schedule + memory), or the object; None: not planned
    cost_model: Any = None

    # -- settings (no process group) ---------------------------------------------------------
    @classmethod
    def resolve(cls, options: StrategyOptions, size: int) -> Settings:
        """Validate `options` for a group of `size` ranks and fill in the defaults."""
        options.check_types()
        cls._reject_unused(options)
        kind = options.layout if options.layout is not None else cls.default_layout
        if options.layout is None and options.local_window is not None and "contiguous" in cls.layouts:
            kind = "contiguous"  # a window's work is balanced over contiguous shards: zigzag buys nothing
        if kind not in cls.layouts:
            wanted = f"={cls.layouts[0]!r}" if len(cls.layouts) == 1 else f" in {list(cls.layouts)}"
            raise ValueError(f"strategy {cls.name!r} needs layout{wanted} ({cls.layout_reason}), got {kind!r}")
        topology = {}
        if "placement" in cls.uses:  # the one place its default is filled in
            topology["placement"] = check_placement(cls.name, options.placement or DEFAULT_PLACEMENT)
        if "ranks_per_node" in cls.uses:
            topology["ranks_per_node"] = options.ranks_per_node
        common = {name: getattr(options, name) for name in COMMON}
        return replace(cls._resolve(options, size, kind), **topology, **common)

    @classmethod
    def _reject_unused(cls, options: StrategyOptions) -> None:
        for name, value in options.given().items():
            if name in options.extras:
                continue
            if name != "layout" and name not in cls.uses + COMMON:
                raise ValueError(f"strategy {cls.name!r} does not use {name}={value!r}")
        unknown = set(options.extras) - set(cls.accepted_options)
        if unknown:
            raise ValueError(f"strategy {cls.name!r} does not take option(s) {sorted(unknown)}; "
                             f"it accepts {list(cls.uses + cls.accepted_options) or 'none'} besides layout")

    @classmethod
    def _resolve(cls, options: StrategyOptions, size: int, kind: str) -> Settings:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def _settings(cls, options: StrategyOptions, size: int, layout: TokenLayout, **degrees: Any) -> Settings:
        return Settings(cls.name, size, layout, extras=tuple(sorted(options.extras.items())), **degrees)

    # -- what the planner enumerates -----------------------------------------------------------
    @classmethod
    def candidates(cls, size: int, causal: bool, chunks: tuple[int, ...] = (1,)) -> list[StrategyOptions]:
        """Options worth comparing on `size` ranks (the planner resolves and ranks them): by default
        each layout that balances causal work differently (contiguous, zigzag) this strategy takes.
        `chunks`: the chunk counts the planner considers (FPDT)."""
        return [StrategyOptions(layout=kind) for kind in cls._candidate_layouts(causal)]

    @classmethod
    def _candidate_layouts(cls, causal: bool) -> list[str]:
        wanted = ("contiguous", "zigzag") if causal else ("contiguous",)
        return [kind for kind in wanted if kind in cls.layouts]

    # -- instance (process groups) -----------------------------------------------------------
    def __init__(self, settings: Settings, mesh: Mesh, comm: Comm, stats: CommStats):
        self.settings, self.mesh, self.comm, self.stats = settings, mesh, comm, stats
        self.layout = settings.layout

    def attention(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, need_lse: bool,
                  kernel: BlockKernel, mask: DocMask | None = None,
                  sinks: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """q [b, s_local, h, d], k/v [b, s_local, hkv, d] -> out [b, s_local, h, d],
        lse [b, h, s_local] (fp32/fp64) or None when not needed. `mask`: packed documents and/or
        a sliding window (the blocks come from `mask.pairs` instead of the layout's causal rule);
        `sinks` [h]: attention-sink logits merged once into each row's final softmax (the
        strategy saves the merged out / lse for backward; their gradient is the context's).
        Strategies defined outside seqpar get `sinks` only when a call passes them."""
        raise NotImplementedError

    def layout_ranks(self) -> list[int]:
        """Layout rank of each group rank (identity unless a strategy places ranks on a topology)."""
        return list(range(self.settings.size))

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "layout": self.layout.kind}


Block = Pair | BPair  # (q_rows, kv_rows, causal), or with the batch rows first (document masks)
_ALL = slice(None)


def _unpack(pair: Block) -> BPair:
    return pair if len(pair) == 4 else (_ALL, *pair)


def forward_blocks(acc: LseAccumulator, q: Tensor, k: Tensor, v: Tensor, pairs: list[Block],
                   kernel: BlockKernel, scale: float) -> None:
    """Merge attention of q rows vs k/v rows for each ([batch rows,] q_rows, kv_rows, causal) pair."""
    for b, q_rows, kv_rows, causal in map(_unpack, pairs):
        out, lse = kernel.forward(q[b, q_rows], k[b, kv_rows], v[b, kv_rows], causal, scale)
        acc.add(out, lse, q_rows, b)


def backward_blocks(dq: Tensor, dk: Tensor, dv: Tensor, dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
                    out: Tensor, lse: Tensor, pairs: list[Block], kernel: BlockKernel, scale: float) -> None:
    """Accumulate the block gradients of `pairs` into dq/dk/dv (in place)."""
    for b, q_rows, kv_rows, causal in map(_unpack, pairs):
        gq, gk, gv = kernel.backward(dout[b, q_rows], q[b, q_rows], k[b, kv_rows], v[b, kv_rows],
                                     out[b, q_rows], lse[b, :, q_rows], causal, scale)
        dq[b, q_rows] += gq
        dk[b, kv_rows] += gk
        dv[b, kv_rows] += gv


def grad_buffers(like: Tensor, *leading: int) -> Tensor:
    """Zeroed accumulation buffer [*leading, *like.shape] in the accum dtype of `like`."""
    return torch.zeros(*leading, *like.shape, dtype=accum_dtype(like.dtype), device=like.device)
