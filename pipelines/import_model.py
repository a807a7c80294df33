"""``beamvision import``: a user's own model (Keras .keras or .h5, or a SavedModel) as a model artifact.

beamvision import --model my_model.keras --labels labels.txt --preprocessing unit --output models/mine

The file or SavedModel folder (local or any Beam filesystem URI such as
``gs://``) is checked before anything is written: it loads in Keras safe mode
(a SavedModel: its serving_default signature), takes one batch of
RGB images and gives one output per label. Its layers, with their weights, are
rebuilt on beamvision's uint8 input with ``--preprocessing`` (the
normalisation the model was trained with) inside the graph; the artifact
records the file's URI and SHA-256. Then it is an artifact like any other:
classify (every engine), evaluate, review and optimize take it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

from beamvision import storage
from beamvision.models.artifact import (
    IMPORTED,
    MODEL_FILE,
    SAVEDMODEL,
    SAVEDMODEL_DIR,
    Manifest,
    check_free,
    new_manifest,
    save_artifact,
)
from beamvision.models.errors import ModelError, one_line
from beamvision.models.importing import (
    SAVEDMODEL_FILE,
    load_user_model,
    model_format,
    wrap_savedmodel,
    wrap_user_model,
)
from beamvision.models.labels import read_labels_file
from beamvision.models.preprocessing import PREPROCESSING_MODES
from beamvision.pipelines.flags import (
    UsageError,
    add_artifact_identity_arguments,
    add_switch,
    check_file_exists,
    parse,
    positive_int,
)
from beamvision.transforms.engines import engine_files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="FILE",
        help="a Keras .keras or .h5 file, or a SavedModel folder; local or URI",
    )
    parser.add_argument(
        "--labels", required=True, metavar="FILE", help="class names, one a line: output i, line i"
    )
    parser.add_argument(
        "--preprocessing",
        required=True,
        choices=PREPROCESSING_MODES,
        help="what the model expects of pixels: "
        + "; ".join(f"{mode}: {what}" for mode, what in PREPROCESSING_MODES.items()),
    )
    parser.add_argument(
        "--input_size",
        type=positive_int,
        metavar="N",
        help="square side to run it at, for a model that takes any size (default: the model's own)",
    )
    add_switch(
        parser,
        "--multi_label",
        "the model scores each label on its own (an image may have several): its logits get a sigmoid, "
        "not a softmax (a sigmoid output is multi-label without it)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="artifact directory, local or URI")
    add_artifact_identity_arguments(parser, "import", name_default="the --model file's name")


@dataclasses.dataclass(frozen=True)
class Config:
    model: str
    format: str  # keras, h5 or savedmodel: importing.model_format's
    labels: str
    preprocessing: str
    input_size: int | None
    output: str
    name: str | None
    version: str | None
    overwrite: bool
    multi_label: bool = False
    engines: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        try:
            fmt = model_format(args.model)
        except ModelError as exc:
            check_file_exists("--model", args.model)  # a path that is not there says so first
            raise UsageError(str(exc)) from None
        if fmt != SAVEDMODEL:  # (a SavedModel folder in a bucket is a prefix, not an object that exists)
            check_file_exists("--model", args.model)
        check_file_exists("--labels", args.labels)
        return cls(
            args.model,
            fmt,
            args.labels,
            args.preprocessing,
            args.input_size,
            args.output,
            args.name,
            args.version,
            args.overwrite,
            args.multi_label,
            tuple(args.engines),
        )


def run(argv: list[str] | None = None) -> Manifest:
    """Imports the model that ``argv`` names and prints a summary.

    Returns:
        The manifest as written.
    """
    config = Config.from_args(parse("beamvision import", __doc__.splitlines()[0], add_arguments, argv))
    started = time.monotonic()
    fmt = config.format
    try:
        labels = read_labels_file(config.labels)
    except ModelError as exc:
        raise UsageError(str(exc)) from None
    check_free(config.output, config.overwrite)  # before the work, as after it
    with tempfile.TemporaryDirectory() as tmp:
        local, kept = _fetch(config.model, fmt, tmp)
        shape = config.preprocessing, config.input_size
        try:
            if fmt == SAVEDMODEL:
                wrapped = wrap_savedmodel(local, labels, *shape, config.multi_label)
            else:
                user = load_user_model(local, fmt)
                wrapped = wrap_user_model(user, labels, *shape, config.multi_label)
        except (ModelError, ValueError) as exc:  # ValueError: Keras refusing to rebuild it (a name twice)
            raise UsageError(f"--model {config.model}: {one_line(exc)}") from None
        hashed = os.path.join(local, SAVEDMODEL_FILE) if fmt == SAVEDMODEL else local
        origin = {
            "uri": storage.canonical(config.model),
            "format": fmt,
            "bytes": sum(os.path.getsize(path) for path in kept.values()) or os.path.getsize(local),
            "sha256": storage.sha256_file(hashed),  # a SavedModel's: its saved_model.pb's
            "output": wrapped.output,
            "classifier_layer": wrapped.classifier_layer,
            **({"output_key": wrapped.output_key} if wrapped.output_key else {}),
        }
        manifest = new_manifest(
            wrapped.model,
            IMPORTED,
            labels,
            IMPORTED,
            name=config.name or os.path.splitext(os.path.basename(config.model.rstrip("/")))[0],
            version=config.version,
            preprocessing=config.preprocessing,
        )
        manifest = dataclasses.replace(manifest, origin=origin, multi_label=wrapped.multi_label)
        extra = {
            **kept,
            **engine_files(wrapped.model, manifest, config.engines, os.path.join(tmp, "engines")),
        }
        manifest = save_artifact(wrapped.model, manifest, config.output, config.overwrite, extra_files=extra)
    megabytes = manifest.files[MODEL_FILE]["bytes"] / 1e6
    print(
        f"imported {config.model} as {manifest.name} version {manifest.version}: {wrapped.input_size}px, "
        f"{len(labels)} classes, output {wrapped.describe()}, "
        f"{wrapped.model.count_params():,} parameters, {megabytes:.1f} MB, to {config.output} "
        f"in {time.monotonic() - started:.1f}s"
    )
    return manifest


def _fetch(uri: str, fmt: str, tmp: str) -> tuple[str, dict[str, str]]:
    """The model's local copy, and for a SavedModel its files as the artifact stores them (name -> path)."""
    local = os.path.join(tmp, "source", os.path.basename(uri.rstrip("/")))
    if fmt != SAVEDMODEL:
        os.makedirs(os.path.dirname(local))
        storage.download(uri, local)
        return local, {}
    base, kept = uri.rstrip("/") + "/", {}
    for file_uri in storage.list_files(uri):  # one download each: Beam copies within one filesystem only
        relative = file_uri[len(base) :]
        path = os.path.join(local, *relative.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        storage.download(file_uri, path)
        kept[f"{SAVEDMODEL_DIR}/{relative}"] = path
    return local, kept
