"""Which candidates are valid: exactly what `seqpar.init` and the strategies accept.

`check(inp, cfg)` asks the strategy itself (`seqpar.resolve`: its options, degrees and
layout, without a process group), then the two checks that need the problem's shape and
that the strategies make on their first attention call: the Ulysses head split
(`attention.ulysses.kv_replication`) and the layout's sequence granularity. The planner
reports the ValueError's text next to an invalid candidate.
"""
from __future__ import annotations

from ..attention import Settings
from ..attention.ulysses import kv_replication
from ..context import resolve
from .inputs import Config, PlanInput

__all__ = ["check"]


def check(inp: PlanInput, cfg: Config) -> Settings:
    """The candidate's resolved settings, or the ValueError seqpar.init / attention would raise."""
    settings = resolve(cfg.strategy, inp.world, **cfg.init_kwargs())
    settings.layout.check(inp.seq_len)  # in the order SeqParallel.attention checks them
    if settings.ulysses > 1:
        kv_replication(inp.model.heads, inp.model.kv_heads, settings.ulysses)
    return settings
