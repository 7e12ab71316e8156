"""The strategy registry: `@register(name)` adds a Strategy class; everything else reads it.

`seqpar.init`, `seqpar.resolve`, the trainer's flags, `seqpar verify` and the planner all look
strategies up here, so a strategy defined outside the package becomes usable everywhere by
registering it (before `seqpar.init` is called, in every process).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

from .base import Strategy

__all__ = ["register", "get_strategy", "STRATEGIES"]

_REGISTRY: dict[str, type[Strategy]] = {}


def register(name: str):
    """Class decorator: make a Strategy subclass available under `name` (a name may be taken once)."""
    def deco(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"strategy name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def get_strategy(name: str) -> type[Strategy]:
    """The Strategy class registered under `name`, or a ValueError listing the names."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted(_REGISTRY)}")
    return _REGISTRY[name]


class _Strategies(Mapping):
    """Read-only live view of the registry: name -> Strategy class, in registration order."""

    def __getitem__(self, name: str) -> type[Strategy]:
        return _REGISTRY[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(_REGISTRY))

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return f"STRATEGIES({list(_REGISTRY)})"


STRATEGIES: Mapping[str, type[Strategy]] = _Strategies()
