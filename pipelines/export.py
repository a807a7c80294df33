"""``beamvision export``: pack an architecture and its weights into a model artifact.

beamvision export --architecture mobilenet_v2 --weights imagenet --output gs://b/models/mnv2
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

from beamvision.models import create_model, get_spec
from beamvision.models.artifact import MODEL_FILE, Manifest, new_manifest, save_artifact
from beamvision.models.labels import imagenet_labels, numbered_labels, read_labels_file
from beamvision.models.registry import IMAGENET_CLASSES
from beamvision.pipelines.flags import (
    UsageError,
    add_architecture_argument,
    add_artifact_identity_arguments,
    check_model_arguments,
    parse,
    positive_int,
)
from beamvision.transforms.engines import engine_files

WEIGHTS_HELP = (
    "imagenet (Keras's published weights, from its cache dir $KERAS_HOME/models or downloaded), "
    "none (random initialisation, for tests and benchmarks), or the path or URI of a weights file"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_architecture_argument(parser)
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
    add_artifact_identity_arguments(parser, "export")


@dataclasses.dataclass(frozen=True)
class Config:
    architecture: str
    weights: str | None  # None, "imagenet" or a weights file URI
    num_classes: int
    labels_source: str | None  # None (class_i), "imagenet" or a file URI
    input_size: int
    output: str
    name: str | None
    version: str | None
    overwrite: bool
    engines: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        spec = get_spec(args.architecture)
        weights = None if args.weights == "none" else args.weights
        input_size = args.input_size or spec.default_input_size
        check_model_arguments(spec.name, input_size=input_size, weights=weights)
        labels = args.labels
        if weights == "imagenet":
            if args.num_classes not in (None, IMAGENET_CLASSES) or labels not in (None, "imagenet"):
                raise UsageError(
                    "--weights imagenet: takes the 1,000 ImageNet classes; drop --num_classes/--labels"
                )
            labels = "imagenet"
        num_classes = IMAGENET_CLASSES if labels == "imagenet" else args.num_classes or IMAGENET_CLASSES
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
            tuple(args.engines),
        )


def run(argv: list[str] | None = None) -> Manifest:
    """Exports the artifact that ``argv`` describes and prints a summary.

    Returns:
        The manifest as written.
    """
    config = Config.from_args(parse("beamvision export", __doc__.splitlines()[0], add_arguments, argv))
    labels = _labels(config)
    started = time.monotonic()
    print(
        f"building {config.architecture} at {config.input_size}px, {len(labels)} classes, "
        f"weights {config.weights or 'none'} ...",
        flush=True,
    )
    model = create_model(config.architecture, len(labels), config.input_size, config.weights)
    weights = {None: "none", "imagenet": "imagenet"}.get(config.weights, f"file:{config.weights}")
    manifest = new_manifest(
        model, config.architecture, labels, weights, name=config.name, version=config.version
    )
    with tempfile.TemporaryDirectory() as converted:
        extra = engine_files(model, manifest, config.engines, converted)
        manifest = save_artifact(model, manifest, config.output, config.overwrite, extra_files=extra)
    megabytes = manifest.files[MODEL_FILE]["bytes"] / 1e6
    print(
        f"exported {manifest.name} version {manifest.version}: {config.architecture}, "
        f"{model.count_params():,} parameters, {megabytes:.1f} MB, to {config.output} "
        f"in {time.monotonic() - started:.1f}s"
    )
    return manifest


def _labels(config: Config) -> list[str]:
    if config.labels_source == "imagenet":
        return list(imagenet_labels())
    if config.labels_source is not None:
        try:
            return read_labels_file(config.labels_source)
        except ValueError as exc:
            raise UsageError(f"--labels {config.labels_source}: {exc}") from None
    return numbered_labels(config.num_classes)
