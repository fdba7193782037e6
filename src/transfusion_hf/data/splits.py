"""Train / held-out splits of the built-in data sets, whose combinations of attributes are held out as a whole so
that the evaluation measures compositional generalisation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

SPLITS: tuple[str, ...] = ("train", "held_out", "all")


class _HasHeldOut(Protocol):
    @property
    def is_held_out(self) -> bool: ...


SpecT = TypeVar("SpecT", bound=_HasHeldOut)


def split_combinations(combinations: Sequence[SpecT], split: str) -> tuple[SpecT, ...]:
    """The combinations of `split` (`"train"`, `"held_out"` or `"all"`), in their given order.

    Args:
        combinations (`Sequence`): every combination of a data set, each with an `is_held_out` property.
        split (`str`): one of `SPLITS`.
    """
    if split == "all":
        return tuple(combinations)
    if split == "train":
        return tuple(spec for spec in combinations if not spec.is_held_out)
    if split == "held_out":
        return tuple(spec for spec in combinations if spec.is_held_out)
    raise ValueError(f"Unknown split {split!r}; expected one of {list(SPLITS)}.")


__all__ = ["SPLITS", "split_combinations"]
