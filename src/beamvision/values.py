"""Checked values: the rules a value must meet, as text from a flag or as a value read from a file.

A check converts a value and refuses one it cannot take with a ``ValueError``
whose message says what was expected and what was received
(``expected a positive integer, received '0'``). The CLI's flags use the
checks as argparse types (``beamvision.pipelines.flags.value_type``), and
``beamvision tune`` checks the values of its space file with the same ones,
so both say the same thing about the same value.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

from beamvision.console import boolean

Check = Callable[[Any], Any]


def checked(convert: Callable[[Any], Any], is_valid: Callable[[Any], bool], expected: str) -> Check:
    """A check that converts a value with ``convert`` and refuses what fails it or ``is_valid``."""

    def check(value: Any) -> Any:
        try:
            converted = convert(value)
        except (TypeError, ValueError):
            converted = None
        if converted is None or not is_valid(converted):
            raise ValueError(f"expected {expected}, received {value!r}")
        return converted

    return check


def _whole(value: Any) -> int:
    """An int, or text that spells one; never a bool or a float (``8.0`` is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(value)
    return int(value)


def _real(value: Any) -> float:
    """A float from a number or from text that spells one; never a bool."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(value)
    return float(value)


integer = checked(_whole, lambda v: True, "an integer")
positive_int = checked(_whole, lambda v: v >= 1, "a positive integer")
fraction = checked(_real, lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)")
share = checked(_real, lambda v: 0.0 <= v <= 1.0, "a share in [0, 1]")
non_negative_float = checked(_real, lambda v: v >= 0.0, "a non-negative number")
accuracy_points = checked(_real, lambda v: 0.0 <= v <= 100.0, "points of accuracy in [0, 100]")
positive_float = checked(_real, lambda v: v > 0.0 and not math.isinf(v), "a positive number")


def text(value: Any) -> str:
    """Any value, as the text a flag would give."""
    return str(value)


def switch(value: Any) -> bool:
    """An on/off value: a bool, or the text an on/off flag takes (``beamvision.console.boolean``)."""
    if isinstance(value, bool):
        return value
    try:
        return boolean(str(value))
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None


def one_of(choices: Sequence[str]) -> Check:
    """A check that takes only one of ``choices``, in argparse's words for a choice refused."""
    choices = tuple(choices)

    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"invalid choice: {value!r} (choose from {', '.join(map(repr, choices))})")
        return value

    return check


def subset_of(choices: Sequence[str]) -> Check:
    """A check of comma-separated names from ``choices`` (or ``none``); a list of them also does."""
    choices = tuple(choices)

    def check(value: Any) -> tuple[str, ...]:
        given = (",".join(map(str, value)) or "none") if isinstance(value, list | tuple) else str(value)
        if given == "none":
            return ()
        names = tuple(x.strip() for x in given.split(",") if x.strip())
        if not names or any(x not in choices for x in names):
            raise ValueError(
                f"expected 'none' or a comma-separated subset of {','.join(choices)}, received {given!r}"
            )
        return names

    return check
