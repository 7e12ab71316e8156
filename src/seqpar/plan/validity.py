"""Which candidates are valid: exactly what `seqpar.init`, the strategies and the trainer's mesh accept.

`check(inp, cfg)` takes what the strategy itself resolved (`Config.settings`: its options, degrees and
layout, without a process group) on its sp ranks, then the mesh around them as the runtime checks it
(seqpar.plan.hybrid: tensor_parallel.check_tensor_parallel, pipeline.check_pipeline), then the two
checks that need the problem's shape and that the strategies make on their first attention call,
on what the sp group sees (heads / tp): the Ulysses head split (`attention.ulysses.kv_replication`)
and the layout's sequence granularity. The planner reports the ValueError's text next to an
invalid candidate.
"""
from __future__ import annotations

from ..attention import Settings
from ..attention.ulysses import kv_replication
from . import hybrid
from .candidate import Config
from .inputs import PlanInput

__all__ = ["check"]


def check(inp: PlanInput, cfg: Config) -> Settings:
    """The candidate's resolved settings, or the ValueError seqpar.init / attention / the trainer
    would raise (the candidate was resolved by its strategy already: `Config`)."""
    settings = cfg.settings
    hybrid.check(inp, cfg)
    group = hybrid.sp_input(inp, cfg)
    settings.layout.check(group.seq_len)  # in the order SeqParallel.attention checks them
    if settings.ulysses > 1:
        kv_replication(group.model.heads, group.model.kv_heads, settings.ulysses)
    return settings
