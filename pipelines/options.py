"""Command-line options: the one definition of every beamvision flag.

Each command has an options class whose ``add_arguments`` declares its flags
(for Beam pipelines, a ``PipelineOptions`` subclass whose
``_add_argparse_args`` calls the same function, so Beam and the CLI see one
set), and a frozen config dataclass, validated once, that the command runs on.

User mistakes raise ``UsageError`` with one line naming the flag and the value
received; the CLI prints it and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses

from models import ModelError, get_spec, list_models


class UsageError(Exception):
    """A flag or value the user gave cannot be used. The message is one line."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that raises ``UsageError`` instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message}")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}")
    return value


def parse(prog: str, description: str, add_arguments, argv: list[str] | None) -> argparse.Namespace:
    """Parses ``argv`` with the flags ``add_arguments`` declares; unknown flags are errors."""
    parser = OneLineParser(prog=prog, description=description)
    add_arguments(parser)
    return parser.parse_args(argv)


# --- beamvision models ---------------------------------------------------------


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


# --- beamvision export ---------------------------------------------------------

WEIGHTS_HELP = (
    "imagenet (Keras's published weights, from its cache dir $KERAS_HOME/models or downloaded), "
    "none (random initialisation, for tests and benchmarks), or the path or URI of a weights file"
)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--architecture",
        required=True,
        choices=list_models(),
        metavar="NAME",
        help=f"one of: {', '.join(list_models())}",
    )
    parser.add_argument("--weights", required=True, metavar="{imagenet,none,PATH}", help=WEIGHTS_HELP)
    classes = parser.add_mutually_exclusive_group()
    classes.add_argument(
        "--num_classes",
        type=positive_int,
        metavar="N",
        help="output classes, named class_0 .. class_N-1 (default 1000)",
    )
    classes.add_argument(
        "--labels",
        metavar="FILE",
        help="text file of class names, one a line (local or URI); "
        "'imagenet' for the 1,000 ImageNet classes shipped with beamvision",
    )
    parser.add_argument(
        "--input_size",
        type=positive_int,
        metavar="N",
        help="square input side in pixels (default: the architecture's)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="artifact directory, local or URI")
    parser.add_argument("--name", help="model name recorded in results (default: the architecture)")
    parser.add_argument("--version", help="model version recorded in results (default: export time, UTC)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing artifact at --output")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    architecture: str
    weights: str | None  # None, "imagenet" or a weights file URI
    num_classes: int
    labels_source: str | None  # None (class_i), "imagenet" or a file URI
    input_size: int
    output: str
    name: str | None
    version: str | None
    overwrite: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExportConfig:
        spec = get_spec(args.architecture)
        weights = None if args.weights == "none" else args.weights
        input_size = args.input_size or spec.default_input_size
        if input_size < spec.min_input_size:
            raise UsageError(f"--input_size {input_size}: {spec.name} needs at least {spec.min_input_size}")
        labels = args.labels
        if weights == "imagenet":
            if not spec.imagenet_weights:
                raise UsageError(f"--weights imagenet: no ImageNet weights are published for {spec.name}")
            if args.num_classes not in (None, 1000) or labels not in (None, "imagenet"):
                raise UsageError(
                    "--weights imagenet: takes the 1,000 ImageNet classes; drop --num_classes/--labels"
                )
            if input_size != spec.default_input_size:
                raise UsageError(
                    f"--input_size {input_size}: ImageNet weights for {spec.name} "
                    f"need {spec.default_input_size}"
                )
            labels = "imagenet"
        num_classes = 1000 if labels == "imagenet" else args.num_classes or 1000
        return cls(
            spec.name,
            weights,
            num_classes,
            labels,
            input_size,
            args.output,
            args.name,
            args.version,
            args.overwrite,
        )


def config_error(flag: str, value, exc: ModelError) -> UsageError:
    """A ``UsageError`` for ``flag value`` from a model-layer error."""
    return UsageError(f"{flag} {value}: {exc}")
