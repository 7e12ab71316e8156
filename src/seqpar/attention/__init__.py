"""Sequence-parallel attention strategies, one module (and one autograd Function) each.

Each strategy module registers its class with `@register(name)` (attention/registry.py);
importing this package registers the built-in ones, in the planner's order. `STRATEGIES`
is the live registry (name -> class): strategies registered from outside appear in it.
"""
from __future__ import annotations

# built-in strategies, registered on import in this order: the planner's order for ties
# isort: off
from . import local, ring, ulysses, usp, allgather, lss, fpdt, wallfacer  # noqa: F401
# isort: on
from .base import Strategy
from .options import Settings, StrategyOptions
from .registry import STRATEGIES, get_strategy, register

__all__ = ["Strategy", "StrategyOptions", "Settings", "STRATEGIES", "register", "get_strategy"]
