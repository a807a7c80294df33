"""``beamvision models``: the registered architectures, as a table or JSON.

Parameter counts are for the default input size and 1,000 classes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from beamvision.models import get_spec, list_models
from beamvision.pipelines.flags import add_switch, parse

COLUMNS = ("name", "input_size", "min_input_size", "preprocessing", "params", "imagenet_weights")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_switch(parser, "--json", "print a JSON list instead of a table")


@dataclasses.dataclass(frozen=True)
class Config:
    json: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        return cls(args.json)


def rows() -> list[dict]:
    """One dict per architecture, with the keys in ``COLUMNS``."""
    out = []
    for name in list_models():
        spec = get_spec(name)
        out.append(
            {
                "name": name,
                "input_size": spec.default_input_size,
                "min_input_size": spec.min_input_size,
                "preprocessing": spec.preprocessing,
                "params": spec.params,
                "imagenet_weights": spec.imagenet_weights,
            }
        )
    return out


def format_table(records: list[dict]) -> str:
    """Left-aligned text columns with a header row."""
    cells = [list(COLUMNS)] + [
        [
            f"{r[c]:,}"
            if c == "params"
            else ("yes" if r[c] is True else "no" if r[c] is False else str(r[c]))
            for c in COLUMNS
        ]
        for r in records
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def run(argv: list[str] | None = None) -> list[dict]:
    """Prints the architecture table (or JSON with ``--json``) and returns the rows."""
    config = Config.from_args(parse("beamvision models", __doc__.splitlines()[0], add_arguments, argv))
    records = rows()
    print(json.dumps(records, indent=2) if config.json else format_table(records))
    return records
