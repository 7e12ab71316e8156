"""Sequence-parallel attention strategies, one module (and one autograd Function) each.

Strategies register themselves by name; `get_strategy` imports the module lazily.
"""
from __future__ import annotations

import importlib

from .base import Settings, Strategy, StrategyConfig

__all__ = ["Strategy", "StrategyConfig", "Settings", "STRATEGIES", "register", "get_strategy"]

# name -> module defining it (imported on first use)
STRATEGIES = {
    "local": "seqpar.attention.local",
    "ring": "seqpar.attention.ring",
    "ulysses": "seqpar.attention.ulysses",
    "usp": "seqpar.attention.usp",
    "allgather": "seqpar.attention.allgather",
    "wallfacer": "seqpar.attention.wallfacer",
    "lss": "seqpar.attention.lss",
    "fpdt": "seqpar.attention.fpdt",
}
_REGISTRY: dict[str, type[Strategy]] = {}


def register(name: str):
    """Class decorator: make a Strategy subclass available under `name`."""
    def deco(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def get_strategy(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}")
    if name not in _REGISTRY:
        importlib.import_module(STRATEGIES[name])
    return _REGISTRY[name]
