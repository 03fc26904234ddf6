"""Registries of the training kinds (timm's habit): one entry per choice that bench.space declares.

bench.optimizers, bench.losses and bench.schedules each keep a table `name -> kind`, where a kind is a frozen
dataclass holding everything the code knows about that choice: its solo torch form beside its per-member (packed)
form, as HFTA keeps its fused operators beside the plain ones. Adding a kind is one entry there and its name in
bench.space's choices; the table refuses to load when the two disagree (bench.space imports no torch, so it cannot
read the tables itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar


class Kind(Protocol):
    @property
    def name(self) -> str: ...


K = TypeVar("K", bound=Kind)


def registry(what: str, choices: Sequence[str], kinds: Sequence[K]) -> dict[str, K]:
    """`name -> kind` in the order bench.space declares the choices; raises when a choice has no kind or a kind is
    no choice."""
    table = {kind.name: kind for kind in kinds}
    if len(table) != len(kinds) or set(table) != set(choices):
        raise ValueError(f"the {what} registry ({', '.join(k.name for k in kinds)}) does not match the choices "
                         f"bench.space declares ({', '.join(choices)})")
    return {name: table[name] for name in choices}


def lookup(table: dict[str, K], what: str, name: str) -> K:
    """The kind called `name`; ValueError when there is none."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(table)}") from None
