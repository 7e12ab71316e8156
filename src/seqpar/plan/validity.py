"""Which candidates are valid: exactly what `seqpar.init` and the strategies accept.

`check(inp, cfg)` takes what the strategy itself resolved (`Config.settings`: its options, degrees and
layout, without a process group), then the two checks that need the problem's shape and
that the strategies make on their first attention call: the Ulysses head split
(`attention.ulysses.kv_replication`) and the layout's sequence granularity. The planner
reports the ValueError's text next to an invalid candidate.
"""
from __future__ import annotations

from ..attention import Settings
from ..attention.ulysses import kv_replication
from .inputs import Config, PlanInput

__all__ = ["check"]


def check(inp: PlanInput, cfg: Config) -> Settings:
    """The candidate's resolved settings, or the ValueError seqpar.init / attention would raise
    (the candidate was resolved by its strategy already: `Config`)."""
    settings = cfg.settings
    if settings.size != inp.world:
        raise ValueError(f"candidate {cfg.label} was resolved for {settings.size} ranks, the plan has {inp.world}")
    settings.layout.check(inp.seq_len)  # in the order SeqParallel.attention checks them
    if settings.ulysses > 1:
        kv_replication(inp.model.heads, inp.model.kv_heads, settings.ulysses)
    return settings
