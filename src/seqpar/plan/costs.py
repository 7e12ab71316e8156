"""The planner's cost model of each strategy: its schedule (plan/schedules.py) and its
attention memory (plan/memory.py).

A strategy names its cost model in its own file (`Strategy.cost_model = "seqpar.plan.costs:RING"`,
attention/), so the strategy registry is the one list the planner enumerates; `cost_model(name)`
resolves that reference. A strategy registered from outside seqpar may name a `CostModel` of its
own module (or give the object itself); without one it is not planned.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from ..attention import STRATEGIES, get_strategy
from . import memory as mem
from . import schedules as sched
from .candidate import Config
from .inputs import PlanInput
from .stages import Stage

__all__ = ["CostModel", "cost_model", "config_cost_model", "planned_strategies", "LOCAL", "RING", "ULYSSES", "USP",
           "ALLGATHER", "WALLFACER", "FPDT"]


@dataclass(frozen=True)
class CostModel:
    """schedule(inp, cfg, rank): the stages of one attention layer on `rank`, with bytes equal to
    what CommStats counts; memory(inp, cfg): attention memory beyond the layer's own q/k/v/out,
    as (saved per layer, peak working set) in bytes."""

    schedule: Callable[[PlanInput, Config, int], list[Stage]]
    memory: Callable[[PlanInput, Config], tuple[float, float]]


#: attention without sequence parallelism: what the candidates whose sp is 1 (the world taken by tp,
#: pp and dp) run; not a strategy to compare ('local' names no cost model, so it is not planned alone)
LOCAL = CostModel(sched.local_schedule, mem.local_memory)
RING = CostModel(sched.ring_schedule, mem.ring_memory)
ULYSSES = CostModel(sched.ulysses_schedule, mem.ulysses_memory)
USP = CostModel(sched.usp_schedule, mem.usp_memory)
ALLGATHER = CostModel(sched.allgather_schedule, mem.allgather_memory)  # also LSS: the same traffic and work
WALLFACER = CostModel(sched.wallfacer_schedule, mem.wallfacer_memory)
FPDT = CostModel(sched.fpdt_schedule, mem.fpdt_memory)


def _load(reference) -> CostModel:
    if not isinstance(reference, str):
        return reference
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def cost_model(strategy: str) -> CostModel:
    """The cost model the strategy registered (ValueError if it has none)."""
    reference = get_strategy(strategy).cost_model
    if reference is None:
        raise ValueError(f"strategy {strategy!r} has no cost model; planned: {planned_strategies()}")
    return _load(reference)


def planned_strategies() -> list[str]:
    """Registered strategies with a cost model, in registration order."""
    return [name for name, cls in STRATEGIES.items() if cls.cost_model is not None]


def config_cost_model(cfg: Config) -> CostModel:
    """The cost model of a candidate: its strategy's, LOCAL for sp = 1."""
    return LOCAL if cfg.strategy == "local" else cost_model(cfg.strategy)
