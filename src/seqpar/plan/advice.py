"""What makes a plan fit: when no valid candidate fits device memory, the single changes that
make at least one fit.

Each change is tried alone on the same plan input, re-planned in full: a higher ZeRO stage
(the lowest that fits), FPDT with host offload and more chunks, activation checkpointing, and
more ranks (the world doubled, up to 16x). A change is reported with the best candidate that
then fits and its memory per rank; changes that do not help are listed with their best memory.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .inputs import GiB, PlanInput
from .search import FPDT_CHUNKS, Candidate, candidate_configs, memory_fits, plan

__all__ = ["Suggestion", "fit_suggestions", "format_suggestions"]

MAX_DOUBLINGS = 4


@dataclass
class Suggestion:
    """One single change: its flags, what it does, and the best candidate under it."""

    flags: str
    what: str
    best: Candidate | None      # the best fitting candidate, or the smallest one when none fits
    fits: bool

    def to_dict(self) -> dict:
        return {"flags": self.flags, "what": self.what, "fits": self.fits,
                "best": self.best.label if self.best else None,
                "memory_bytes": self.best.memory["total"] if self.best else None,
                "step_time_s": self.best.step_time if self.best else None}


def _outcome(inp: PlanInput, strategies, chunks, smallest: bool = True, mesh: dict | None = None
             ) -> tuple[Candidate | None, bool]:
    """The best fitting candidate under a change (planned in full only when one fits by the
    memory model), else the smallest valid one (None when not `smallest`: skip the planning).
    `mesh`: the tp / pp degrees searched (plan's keywords)."""
    mesh = mesh or {}
    if not any(memory_fits(inp, cfg) for cfg in candidate_configs(inp, strategies, chunks, **mesh)) and not smallest:
        return None, False
    valid = [c for c in plan(inp, strategies, chunks, **mesh) if c.valid]
    fitting = [c for c in valid if c.fits]
    if fitting:
        return fitting[0], True
    return (min(valid, key=lambda c: c.memory["total"]) if valid else None), False


def fit_suggestions(inp: PlanInput, candidates: list[Candidate], strategies: list[str] | None = None,
                    fpdt_chunks: tuple[int, ...] = FPDT_CHUNKS, tp: tuple[int, ...] | None = None,
                    pp: tuple[int, ...] | None = None) -> list[Suggestion] | None:
    """None when a valid candidate fits (or none is valid); else one Suggestion per kind of change
    (searching the same `tp` / `pp` degrees as the plan)."""
    mesh = {"tp": tp, "pp": pp}
    if any(c.valid and c.fits for c in candidates) or not any(c.valid for c in candidates):
        return None
    out: list[Suggestion] = []
    tried = None
    for zero in range(inp.zero + 1, 4):
        tried = Suggestion(f"--zero {zero}", f"ZeRO stage {zero} over {inp.world} ranks", *_outcome(
            replace(inp, zero=zero), strategies, fpdt_chunks, mesh=mesh))
        if tried.fits:
            break
    if tried is not None:
        out.append(tried)
    if strategies is None or "fpdt" in strategies:
        out.append(_fpdt(inp, fpdt_chunks, mesh))
    if not inp.checkpointing:
        out.append(Suggestion("--activation-checkpointing", "recompute every block in backward",
                              *_outcome(replace(inp, checkpointing=True), strategies, fpdt_chunks, mesh=mesh)))
    out.append(_more_ranks(inp, strategies, fpdt_chunks, mesh))
    return [s for s in out if s is not None]


def _fpdt(inp: PlanInput, fpdt_chunks: tuple[int, ...], mesh: dict) -> Suggestion | None:
    """FPDT with offload: the fewest chunks (powers of 2 beyond those searched) that fit."""
    best, chunks = None, max(fpdt_chunks)
    while chunks * 2 <= inp.tokens_per_rank and chunks < 1024:
        chunks *= 2
        best, fits = _outcome(inp, ["fpdt"], (chunks,), chunks * 2 > inp.tokens_per_rank or chunks >= 1024, mesh)
        if fits:
            return Suggestion(f"--strategies fpdt --fpdt-chunks {chunks}", f"FPDT with host offload in {chunks} chunks",
                              best, True)
    return Suggestion("--strategies fpdt --fpdt-chunks N", "FPDT with host offload and more chunks", best, False) \
        if best is not None else None


def _more_ranks(inp: PlanInput, strategies, chunks, mesh: dict) -> Suggestion | None:
    cl, best = inp.cluster, None
    for k in range(1, MAX_DOUBLINGS + 1):
        world = cl.world * 2 ** k
        if inp.seq_len % world:
            break
        bigger = replace(inp, cluster=replace(cl, world=world))
        best, fits = _outcome(bigger, strategies, chunks, k == MAX_DOUBLINGS, mesh)
        if fits:
            return Suggestion(f"--world {world}", f"{world} ranks ({world // cl.ranks_per_node or 1} nodes of "
                              f"{min(cl.ranks_per_node, world)})", best, True)
    return Suggestion(f"--world {cl.world * 2 ** MAX_DOUBLINGS}", "more ranks (up to 16x)", best, False) \
        if best is not None else None


def format_suggestions(inp: PlanInput, suggestions: list[Suggestion]) -> str:
    limit = inp.cluster.memory_gib
    good = [s for s in suggestions if s.fits]
    lines = [f"No candidate fits {limit:g} GiB per rank. "
             + ("Single changes that make one fit (best candidate then, its memory per rank and step time):" if good
                else "No single change tried makes one fit; combine them:")]
    for s in good:
        lines.append(f"  {s.flags:<40} {s.what}: {s.best.label}, {s.best.memory['total'] / GiB:.4g} GiB, "
                     f"step {s.best.step_time:.4g} s")
    for s in suggestions:
        if not s.fits:
            smallest = f"smallest {s.best.label} at {s.best.memory['total'] / GiB:.4g} GiB" if s.best else "no valid"
            lines.append(f"  {s.flags:<40} {s.what}: does not fit ({smallest})")
    return "\n".join(lines)
