"""The one schema of strategy options: what a user may give `seqpar.init`, and what it resolves to.

`StrategyOptions` lists every option any strategy reads, typed, with its help text; None is
the only way to say "not given" (the strategy's default applies). Every other spelling of
these options is derived from it: `seqpar train`'s flags and config keys (train/config.py),
`seqpar verify`'s flags, the planner's candidates (each strategy's `candidates`) and
`--strategy auto`'s choice. `Settings` is what a strategy resolves them to for a group of
`size` ranks (attention/base.py `Strategy.resolve`): every field set, defaults filled in.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from ..layout import DOCUMENTS, LAYOUTS, TokenLayout
from ..mesh import DEFAULT_PLACEMENT, PLACEMENTS

__all__ = ["StrategyOptions", "Settings", "option_fields", "add_option_arguments", "options_from_args",
           "NEUTRAL", "positive_int", "COMMON"]

#: options every strategy takes (they shape the attention call, not the strategy's degrees)
COMMON = ("local_window", "tile")


def _opt(kind: type, help_text: str, choices: tuple = (), neutral: Any = None):
    """A StrategyOptions field of type `kind` (int, bool or str), None by default; `neutral`: the
    value that means "not used" (a strategy that does not use the option accepts it at that
    value, so generic callers may pass ulysses=1, chunks=1, offload=False)."""
    return field(default=None, metadata={"kind": kind, "help": help_text, "choices": choices, "neutral": neutral})


@dataclass(frozen=True)
class StrategyOptions:
    """Options of `seqpar.init` as the user gave them (None = the strategy's default)."""

    layout: str | None = _opt(str, "token layout (default: the strategy's: zigzag for ring / usp / allgather / "
                              "wallfacer / lss, contiguous for ulysses / fpdt and usp with a ring of 1)",
                              LAYOUTS + (DOCUMENTS,))
    ulysses: int | None = _opt(int, "Ulysses (all-to-all) degree: usp's, or restating ulysses' / fpdt's group size",
                               neutral=1)
    ring: int | None = _opt(int, "ring degree: usp's, or restating ring's group size", neutral=1)
    team_size: int | None = _opt(int, "WallFacer team size C (C^2 must divide the group; default 2 when 4 divides it)",
                                 neutral=1)
    chunks: int | None = _opt(int, "FPDT sequence chunks (default 1)", neutral=1)
    offload: bool | None = _opt(bool, "FPDT: keep the K/V chunks in host memory (default off)", neutral=False)
    placement: str | None = _opt(str, "usp / wallfacer: which traffic stays inside a node "
                                      f"(default {DEFAULT_PLACEMENT})", PLACEMENTS)
    ranks_per_node: int | None = _opt(int, "wallfacer: ranks per node for its topology report (default: "
                                      "LOCAL_WORLD_SIZE, else the hostnames)")
    local_window: int | None = _opt(int, "every strategy: the sliding window (tokens) the model's attention uses; "
                                         "then the default layout is contiguous (balanced for windowed work, where "
                                         "zigzag buys nothing)")
    tile: int | None = _opt(int, "every strategy: query rows per kernel tile of windowed attention (tiles no "
                                 "query sees are skipped; default 128)")
    #: options of strategies defined outside seqpar (their `accepted_options`), by name
    extras: Mapping[str, Any] = field(default_factory=dict, metadata={"help": None})

    def __post_init__(self):
        self.check_types()

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "StrategyOptions":
        """Keyword arguments of `seqpar.init`: the schema's options typed, anything else an extra."""
        names = {f.name for f in option_fields()}
        given = {k: v for k, v in kwargs.items() if k in names and v is not None}
        return cls(**given, extras={k: v for k, v in kwargs.items() if k not in names})

    def check_types(self) -> None:
        """One-line errors for values of the wrong type or outside their choices."""
        for f in option_fields():
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.metadata["choices"] and value not in f.metadata["choices"]:
                raise ValueError(f"unknown {f.name} {value!r}; choose from {list(f.metadata['choices'])}")
            kind = f.metadata["kind"]
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be True or False, got {value!r}")
            if kind is int:
                positive_int(f.name, value)

    def given(self) -> dict[str, Any]:
        """The options given with a value other than None or their 'not used' value, plus extras."""
        out = {}
        for f in option_fields():
            value, neutral = getattr(self, f.name), f.metadata["neutral"]
            if value is None or (neutral is not None and value == neutral and type(value) is type(neutral)):
                continue
            out[f.name] = value
        return {**out, **self.extras}


def option_fields():
    """The typed options (every field of StrategyOptions but `extras`), in schema order."""
    return [f for f in fields(StrategyOptions) if f.name != "extras"]


NEUTRAL = {f.name: f.metadata["neutral"] for f in option_fields() if f.metadata["neutral"] is not None}


def positive_int(name: str, value: Any, strategy: str | None = None) -> int:
    """`value` as a degree (int >= 1) or a clear ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        who = f"strategy {strategy!r}: " if strategy else ""
        raise ValueError(f"{who}{name} must be >= 1 (an integer), got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """A strategy's resolved settings for a group of `size` ranks: every option set."""

    strategy: str
    size: int
    layout: TokenLayout
    ulysses: int = 1      # head-scatter (all-to-all) degree
    ring: int = 1         # ring degree (K/V rotation)
    team_size: int = 1    # WallFacer C
    chunks: int = 1       # FPDT sequence chunks
    offload: bool = False
    placement: str | None = None       # usp / wallfacer (resolved to DEFAULT_PLACEMENT)
    ranks_per_node: int | None = None  # wallfacer's topology report (None: detected)
    local_window: int | None = None    # the model's sliding window (layout default, planner)
    tile: int | None = None            # windowed kernel tile (None: documents.DEFAULT_TILE)
    extras: tuple[tuple[str, Any], ...] = ()

    def extra(self, name: str, default: Any = None) -> Any:
        """An option of a strategy defined outside seqpar."""
        return dict(self.extras).get(name, default)

    def options(self) -> StrategyOptions:
        """The options that resolve to these settings again."""
        given = {f.name: getattr(self, f.name) for f in option_fields() if f.name != "layout"}
        return StrategyOptions(layout=self.layout.kind, **given, extras=dict(self.extras))

    def init_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `seqpar.init` that reproduce these settings."""
        return self.options().given()

    def with_size(self, size: int) -> "Settings":
        return replace(self, size=size)


# -- command-line flags, derived from the schema ---------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_option_arguments(parser: argparse.ArgumentParser | Any, help_suffix: str = "") -> None:
    """One --flag per option (None when not given): `seqpar verify` and `seqpar train` share them."""
    for f in option_fields():
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": f.metadata["help"] + help_suffix}
        if f.metadata["kind"] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.metadata["choices"]:
            kwargs["choices"] = list(f.metadata["choices"])
        else:
            kwargs.update(type=int, metavar="INT")
        parser.add_argument(_flag(f.name), **kwargs)


def options_from_args(args: argparse.Namespace) -> StrategyOptions:
    return StrategyOptions(**{f.name: getattr(args, f.name, None) for f in option_fields()})
