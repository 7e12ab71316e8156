"""One candidate of the planner's search: a strategy's resolved settings and the mesh around it."""
from __future__ import annotations

from dataclasses import dataclass

from ..attention import Settings, get_strategy
from ..context import resolve

__all__ = ["Config"]


@dataclass(frozen=True)
class Config:
    """One candidate: a strategy's resolved settings (what `seqpar.init` builds on the sp ranks),
    FPDT's per-chunk block pipeline (--chunked-blocks), and the mesh around the sp group
    (seqpar.parallel.ParallelDims, tp innermost; seqpar.plan.hybrid): tp, pp stages run with
    `pp_schedule` over `microbatches`, dp replicas. sp = world / (dp x tp x pp) = settings.size."""

    settings: Settings
    chunked_blocks: bool = False
    tp: int = 1
    pp: int = 1
    dp: int = 1
    pp_schedule: str = "gpipe"
    microbatches: int = 1

    @classmethod
    def of(cls, strategy: str, world: int, chunked_blocks: bool = False, **options) -> "Config":
        """The candidate `seqpar.init(strategy, **options)` builds on `world` ranks (its errors too)."""
        return cls(resolve(strategy, world, **options), chunked_blocks)

    sp = property(lambda self: self.settings.size)

    @property
    def hybrid(self) -> bool:
        """Whether anything but sequence parallelism shares the world (tp, pp or dp > 1)."""
        return self.tp * self.pp * self.dp > 1

    @property
    def mesh_label(self) -> str:
        """'dp2 tp4 pp2 1f1b m8' (the degrees above 1; '' for sequence parallelism alone)."""
        parts = [f"dp{self.dp}"] if self.dp > 1 else []
        parts += [f"tp{self.tp}"] if self.tp > 1 else []
        parts += [f"pp{self.pp} {self.pp_schedule} m{self.microbatches}"] if self.pp > 1 else []
        return " ".join(parts)

    def mesh_kwargs(self) -> dict:
        """The trainer's [parallel] fields of this candidate (TrainConfig flags)."""
        return {"dp": self.dp, "sp": self.sp, "tp": self.tp, "pp": self.pp, "pp_schedule": self.pp_schedule,
                "microbatches": self.microbatches}

    @property
    def strategy(self) -> str:
        return self.settings.strategy

    @property
    def layout(self) -> str:
        return self.settings.layout.kind

    # the resolved degrees, as the schedules and memory models read them
    ulysses = property(lambda self: self.settings.ulysses)
    ring = property(lambda self: self.settings.ring)
    team_size = property(lambda self: self.settings.team_size)
    chunks = property(lambda self: self.settings.chunks)
    offload = property(lambda self: self.settings.offload)
    placement = property(lambda self: self.settings.placement)

    def init_kwargs(self, ranks_per_node: int | None = None) -> dict:
        """Arguments of `seqpar.init` / `seqpar.resolve` for this candidate (with the topology's
        ranks per node for a strategy that reports it)."""
        kw = self.settings.init_kwargs()
        if ranks_per_node is not None and "ranks_per_node" in get_strategy(self.strategy).uses:
            kw["ranks_per_node"] = ranks_per_node
        return kw

    @property
    def label(self) -> str:
        s, parts = self.settings, [self.strategy]
        if s.strategy == "usp":
            parts.append(f"u{s.ulysses}xr{s.ring}")
        if s.strategy == "wallfacer":
            parts.append(f"C={s.team_size} {s.placement}")
        if s.chunks > 1 or s.offload:
            parts.append(f"chunks={s.chunks}" + (" offload" if s.offload else "")
                         + (" blocks" if self.chunked_blocks else ""))
        parts.append(self.layout)
        if self.mesh_label:
            parts.append(f"[{self.mesh_label}]")
        return " ".join(parts)
