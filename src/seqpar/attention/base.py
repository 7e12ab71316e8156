"""Strategy interface: settings resolved once (no process group), and the block loops.

Life of a configuration: `StrategyConfig` holds what the user gave (None = not given);
`Strategy.resolve(cfg, size)` — a classmethod that needs no process group — rejects what
the strategy does not use, fills in its defaults, computes its degrees and builds its
`TokenLayout`, returning a frozen `Settings`. `seqpar.init`, the trainer's config check,
the planner's validity check and `seqpar verify` all call it, so they accept and reject
exactly the same configurations. A strategy instance is then built from the Settings
and the process groups (collectively) and gets the kernel with every call.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch
from torch import Tensor

from ..comm import Comm, CommStats
from ..documents import BPair, DocMask
from ..kernels import BlockKernel, LseAccumulator, accum_dtype
from ..layout import DOCUMENTS, LAYOUTS, Pair, TokenLayout
from ..mesh import Mesh

__all__ = ["Strategy", "StrategyConfig", "Settings", "forward_blocks", "backward_blocks", "grad_buffers",
           "positive_int"]

# value of each degree option that means "not used": a strategy that does not use an
# option accepts it at this value (so generic callers may pass ulysses=1, chunks=1, ...)
_NEUTRAL = {"ulysses": 1, "ring": 1, "team_size": 1, "chunks": 1, "offload": False}
_ALIASES = {"teams": "team_size"}  # deprecated spelling -> option (one release)


@dataclass(frozen=True)
class StrategyConfig:
    """Arguments of `seqpar.init` as the user gave them; None = not given (strategy default)."""

    ulysses: int | None = None
    ring: int | None = None
    team_size: int | None = None
    layout: str | None = None
    chunks: int | None = None
    offload: bool | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # strategy-specific extras
    spelled: Mapping[str, str] = field(default_factory=dict)  # option -> name the user wrote

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "StrategyConfig":
        """Split keyword arguments into the common options and strategy-specific extras;
        `teams` is accepted for `team_size` with a DeprecationWarning."""
        common = {f.name for f in fields(cls)} - {"options", "spelled"}
        given, options, spelled = {}, {}, {}
        for name, value in kwargs.items():
            target = _ALIASES.get(name, name)
            if target != name:
                warnings.warn(f"seqpar: '{name}' is deprecated, use '{target}' (WallFacer team size C)",
                              DeprecationWarning, stacklevel=3)
                if kwargs.get(target) is not None and value is not None and kwargs[target] != value:
                    raise ValueError(f"{name}={value!r} and {target}={kwargs[target]!r} disagree")
                spelled[target] = name
            if target in common:
                if value is not None:
                    given[target] = value
            else:
                options[name] = value
        return cls(**given, options=options, spelled=spelled)

    def given(self) -> dict[str, Any]:
        """The common options given with a value other than 'not used'."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("options", "spelled") or value is None:
                continue
            if f.name in _NEUTRAL and value == _NEUTRAL[f.name] and type(value) is type(_NEUTRAL[f.name]):
                continue
            out[f.name] = value
        return out


@dataclass(frozen=True)
class Settings:
    """A strategy's resolved settings for a group of `size` ranks (degrees, layout, options)."""

    strategy: str
    size: int
    layout: TokenLayout
    ulysses: int = 1      # head-scatter (all-to-all) degree
    ring: int = 1         # ring degree (K/V rotation)
    team_size: int = 1    # WallFacer C
    chunks: int = 1       # FPDT sequence chunks
    offload: bool = False
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    def init_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `seqpar.init` that reproduce these settings."""
        kw: dict[str, Any] = {"layout": self.layout.kind}
        for name in ("ulysses", "ring", "team_size", "chunks", "offload"):
            if getattr(self, name) != _NEUTRAL[name]:
                kw[name] = getattr(self, name)
        return {**kw, **dict(self.options)}


def positive_int(strategy: str, name: str, value: Any) -> int:
    """`value` as a degree (int >= 1) or a clear ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"strategy {strategy!r}: {name} must be >= 1 (an integer), got {value!r}")
    return value


class Strategy:
    """One sequence-parallel attention method.

    Class attributes declare what it takes: `uses` (StrategyConfig options it reads; any
    other option given is rejected), `layouts` / `default_layout`, `accepted_options`
    (strategy-specific extras), `double_grad_averaging` (LSS). `_resolve` computes the
    degrees and the layout; `__init__` builds the process groups (collective).
    """

    name = "base"
    uses: tuple[str, ...] = ()
    layouts: tuple[str, ...] = LAYOUTS + (DOCUMENTS,)
    default_layout = "zigzag"
    layout_reason = ""  # why only `layouts` work, for the error message
    accepted_options: tuple[str, ...] = ()
    double_grad_averaging = False

    # -- settings (no process group) ---------------------------------------------------------
    @classmethod
    def resolve(cls, cfg: StrategyConfig, size: int) -> Settings:
        """Validate `cfg` for a group of `size` ranks and fill in the defaults."""
        cls._reject_unused(cfg)
        kind = cfg.layout if cfg.layout is not None else cls.default_layout
        if kind not in LAYOUTS + (DOCUMENTS,):
            raise ValueError(f"unknown layout {kind!r}; choose from {LAYOUTS + (DOCUMENTS,)}")
        if kind not in cls.layouts:
            wanted = f"={cls.layouts[0]!r}" if len(cls.layouts) == 1 else f" in {list(cls.layouts)}"
            raise ValueError(f"strategy {cls.name!r} needs layout{wanted} ({cls.layout_reason}), got {kind!r}")
        return cls._resolve(cfg, size, kind)

    @classmethod
    def _reject_unused(cls, cfg: StrategyConfig) -> None:
        for name, value in cfg.given().items():
            if name != "layout" and name not in cls.uses:
                raise ValueError(f"strategy {cls.name!r} does not use {cfg.spelled.get(name, name)}={value!r}")
        unknown = set(cfg.options) - set(cls.accepted_options)
        if unknown:
            raise ValueError(f"strategy {cls.name!r} does not take option(s) {sorted(unknown)}; "
                             f"it accepts {list(cls.accepted_options) or 'none'}")

    @classmethod
    def _resolve(cls, cfg: StrategyConfig, size: int, kind: str) -> Settings:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def _settings(cls, cfg: StrategyConfig, size: int, layout: TokenLayout, **degrees: Any) -> Settings:
        return Settings(cls.name, size, layout, options=tuple(sorted(cfg.options.items())), **degrees)

    # -- instance (process groups) -----------------------------------------------------------
    def __init__(self, settings: Settings, mesh: Mesh, comm: Comm, stats: CommStats):
        self.settings, self.mesh, self.comm, self.stats = settings, mesh, comm, stats
        self.layout = settings.layout

    def attention(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, need_lse: bool,
                  kernel: BlockKernel, mask: DocMask | None = None) -> tuple[Tensor, Tensor | None]:
        """q [b, s_local, h, d], k/v [b, s_local, hkv, d] -> out [b, s_local, h, d],
        lse [b, h, s_local] (fp32/fp64) or None when not needed. `mask`: packed documents
        (the blocks come from `mask.pairs` instead of the layout's causal rule)."""
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
