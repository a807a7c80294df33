"""The search space of ``beamvision tune``: train flags to try, read from YAML or JSON, and its trials.

    architecture: [squeezenet, mobilenet_v2]               # a list: one of these values
    learning_rate: {low: 1.0e-4, high: 1.0e-1, log: true}  # a range: uniform, or log-uniform
    batch_size: {low: 16, high: 64, log: true, num: 3}     # with num: that many points (grid search)
    epochs: 8                                              # one value: every trial

Every key is a flag of ``beamvision train`` (without the dashes) and every
value is checked by train's own parser before any trial starts, so a typo in
the file is one error line, not a failed search. A combination that train
refuses (``freeze_base: true`` with random weights) is only found when that
trial runs, and becomes its error row. Grid search takes every combination,
the first key's values varying slowest; random search draws distinct trials
from a generator seeded with ``--seed``: the same seed, the same trials in
the same order.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

RANGE_KEYS = {"low", "high", "log", "num"}


class SpaceError(ValueError):
    """The search space file cannot be used; the message is one line naming the key."""


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One flag of the space: fixed, a list of choices, or a numeric range."""

    flag: str
    choices: tuple[Any, ...] = ()  # a fixed value is one choice
    low: float | None = None
    high: float | None = None
    log: bool = False
    num: int | None = None  # points of a range on a grid
    integer: bool = False  # a range of whole numbers (both ends are integers)

    @property
    def is_range(self) -> bool:
        return self.low is not None

    @property
    def varies(self) -> bool:
        return self.is_range or len(self.choices) > 1

    def grid(self) -> list[Any]:
        """The values a grid search takes (a range needs ``num``)."""
        if not self.is_range:
            return list(self.choices)
        if self.num is None:
            raise SpaceError(f"{self.flag}: a range needs num: N for --search grid (or use --search random)")
        points = (np.geomspace if self.log else np.linspace)(self.low, self.high, self.num)
        if self.integer:
            return list(dict.fromkeys(round(float(p)) for p in points))
        return [float(f"{p:.6g}") for p in points]

    def sample(self, rng: np.random.Generator) -> Any:
        """One value drawn at random: a choice uniformly, a range uniformly or log-uniformly."""
        if not self.is_range:
            return self.choices[int(rng.integers(len(self.choices)))]
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return round(value) if self.integer else float(f"{value:.6g}")

    def describe(self) -> Any:
        """The dimension as written in a space file."""
        if self.is_range:
            out = {"low": self.low, "high": self.high, "log": self.log}
            return {**out, "num": self.num} if self.num else out
        return self.choices[0] if len(self.choices) == 1 else list(self.choices)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]

    @property
    def varied(self) -> list[str]:
        """The flags that differ between trials, in the file's order."""
        return [d.flag for d in self.dimensions if d.varies]

    def log_scaled(self) -> set[str]:
        return {d.flag for d in self.dimensions if d.log}

    def describe(self) -> dict[str, Any]:
        return {d.flag: d.describe() for d in self.dimensions}

    def trials(self, search: str, count: int | None, seed: int) -> list[dict[str, Any]]:
        """Each trial's flags, in trial order.

        grid: every combination (the first ``count`` with a count); random:
        ``count`` distinct draws, fewer when the space has fewer combinations.
        """
        if search == "grid":
            combos = itertools.product(*(d.grid() for d in self.dimensions))
            flags = [d.flag for d in self.dimensions]
            return [dict(zip(flags, values, strict=True)) for values in itertools.islice(combos, count)]
        rng = np.random.default_rng(seed)
        drawn: dict[str, dict[str, Any]] = {}
        attempts = 0
        while len(drawn) < count and attempts < 100 * count:
            attempts += 1
            trial = {d.flag: d.sample(rng) for d in self.dimensions}
            drawn.setdefault(json.dumps(trial, sort_keys=True), trial)
        return list(drawn.values())


def _number(flag: str, key: str, value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SpaceError(f"{flag}: {key} must be a number, received {value!r}")
    if isinstance(value, str):
        try:
            value = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise SpaceError(f"{flag}: {key} must be a number, received {value!r}") from None
    if not math.isfinite(value):
        raise SpaceError(f"{flag}: {key} must be a finite number, received {value!r}")
    return value


def _dimension(flag: str, value: Any) -> Dimension:
    if isinstance(value, dict):
        unknown = sorted(set(value) - RANGE_KEYS)
        if unknown or "low" not in value or "high" not in value:
            raise SpaceError(
                f"{flag}: a range is {{low: X, high: Y}} with optional log: true and num: N, "
                f"received {value!r}"
            )
        low, high = _number(flag, "low", value["low"]), _number(flag, "high", value["high"])
        if not low < high:
            raise SpaceError(f"{flag}: low must be below high, received low {low} and high {high}")
        log = value.get("log", False)
        if not isinstance(log, bool):
            raise SpaceError(f"{flag}: log must be true or false, received {log!r}")
        if log and low <= 0:
            raise SpaceError(f"{flag}: a log range needs low above 0, received {low}")
        num = value.get("num")
        if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 2):
            raise SpaceError(f"{flag}: num must be an integer of at least 2, received {num!r}")
        integer = isinstance(low, int) and isinstance(high, int)
        return Dimension(flag, low=low, high=high, log=log, num=num, integer=integer)
    if isinstance(value, list):
        if not value:
            raise SpaceError(f"{flag}: an empty list of choices")
        if any(isinstance(v, dict | list) for v in value):
            raise SpaceError(f"{flag}: choices must be plain values, received {value!r}")
        if len({json.dumps(v) for v in value}) != len(value):
            raise SpaceError(f"{flag}: the same choice twice in {value!r}")
        return Dimension(flag, choices=tuple(value))
    if value is None:
        raise SpaceError(f"{flag}: no value")
    return Dimension(flag, choices=(value,))


def parse_space(
    text: str, allowed: set[str], check: Callable[[str, Any], None], reserved: dict[str, str] | None = None
) -> SearchSpace:
    """The space in ``text`` (YAML, or JSON, its subset), each flag and value checked.

    ``allowed``: the flags a space may set; ``reserved``: flags set otherwise,
    with the reason; ``check(flag, value)`` raises ``SpaceError`` for a value
    that train would refuse (called for each choice, and both ends of a range).
    """
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise SpaceError(f"not valid YAML or JSON{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict) or not data:
        raise SpaceError("must be a mapping of train flags to values, lists of values or ranges")
    dimensions = []
    for flag, value in data.items():
        flag = str(flag).removeprefix("--")
        if flag in (reserved or {}):
            raise SpaceError(f"{flag}: {reserved[flag]}")
        if flag not in allowed:
            raise SpaceError(f"{flag}: not a flag of beamvision train (it has {', '.join(sorted(allowed))})")
        dimension = _dimension(flag, value)
        for candidate in (dimension.low, dimension.high) if dimension.is_range else dimension.choices:
            check(flag, candidate)
        dimensions.append(dimension)
    return SearchSpace(tuple(dimensions))
