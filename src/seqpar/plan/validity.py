"""Which candidates are valid: the same errors `seqpar.init` and the strategies raise.

Each `check_*(inp, cfg)` raises ValueError with the reason a candidate cannot run (head
counts that a Ulysses degree does not divide, sequence lengths the layout cannot split,
mismatched degrees); the planner reports the reason next to the invalid candidate.
"""
from __future__ import annotations

from ..layout import TokenLayout
from .inputs import Config, PlanInput
from .schedules import kv_replication, wallfacer_grid

__all__ = ["check_ring", "check_ulysses", "check_usp", "check_lss", "check_wallfacer", "check_fpdt"]


def check_ring(inp: PlanInput, cfg: Config) -> None:
    TokenLayout(cfg.layout, outer=inp.world).check(inp.seq_len)


def check_ulysses(inp: PlanInput, cfg: Config) -> None:
    kv_replication(inp.model.heads, inp.model.kv_heads, inp.world)
    TokenLayout(cfg.layout, outer=1, inner=inp.world).check(inp.seq_len)


def check_usp(inp: PlanInput, cfg: Config) -> None:
    if cfg.ulysses * cfg.ring != inp.world:
        raise ValueError(f"usp needs ulysses x ring = world: {cfg.ulysses} x {cfg.ring} != {inp.world}")
    kv_replication(inp.model.heads, inp.model.kv_heads, cfg.ulysses)
    TokenLayout(cfg.layout, outer=cfg.ring, inner=cfg.ulysses).check(inp.seq_len)


def check_lss(inp: PlanInput, cfg: Config) -> None:
    if cfg.layout not in ("contiguous", "zigzag"):
        raise ValueError(f"lss splits the sequence into segments: layout must be contiguous or zigzag, "
                         f"got {cfg.layout!r}")
    check_ring(inp, cfg)


def check_wallfacer(inp: PlanInput, cfg: Config) -> None:
    grid = wallfacer_grid(inp, cfg)
    TokenLayout(cfg.layout, outer=grid.teams, inner=grid.team_size).check(inp.seq_len)


def check_fpdt(inp: PlanInput, cfg: Config) -> None:
    if cfg.layout != "contiguous":
        raise ValueError(f"fpdt needs layout='contiguous', got {cfg.layout!r}")
    kv_replication(inp.model.heads, inp.model.kv_heads, inp.world)
    TokenLayout("contiguous", outer=1, inner=inp.world, chunks=cfg.chunks).check(inp.seq_len)
