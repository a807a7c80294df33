"""``beamvision convert``: a model artifact for serving: SavedModel (TF Serving, Vertex AI), TFLite, ONNX.

    beamvision convert --model models/flowers --format savedmodel --output serving/flowers \\
        [--check 'photos/**/*.jpg']
    beamvision convert --model models/flowers --format tflite --quantize int8 --data data/flowers \\
        --output phone/flowers --check 'photos/**/*.jpg'

What each format writes and takes is ``beamvision.models.conversion``'s
(``FORMATS``). ``--check`` measures the converted model against classify on
real image files: each file decoded as classify decodes it and run through
the artifact's Keras model, against the converted model fed what it takes
(the file's bytes for a SavedModel, classify's pixels for TFLite and ONNX);
the top-1 agreement and the largest probability difference are printed and
kept in ``OUT/conversion.json`` with the model's size. ``--quantize int8``
(TFLite) calibrates on a sample of prepare's training split (``--data``), as
``optimize`` does. The output folder appears whole or not at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time

import numpy as np

from beamvision import __version__, storage
from beamvision.models.artifact import load_artifact, verify_artifact
from beamvision.models.conversion import (
    BYTES,
    FORMATS,
    NO_QUANTIZATION,
    REPORT_FILE,
    agreement,
    folder_bytes,
    write_labels,
)
from beamvision.pipelines.flags import UsageError, add_switch, parse, positive_int
from beamvision.transforms.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from beamvision.transforms.read import expand_pattern

QUANTIZATIONS = tuple(dict.fromkeys(q for f in FORMATS.values() for q in f.quantizations))
DEFAULT_CHECK_LIMIT = 1000
DEFAULT_CALIBRATION_SIZE = 300  # as optimize's
CHECK_BATCH = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODEL", help="the model artifact, local or URI")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to convert it to")
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="the folder to write (savedmodel: DIR/1/), local or URI",
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default=NO_QUANTIZATION,
        help="int8 (tflite): INT8 weights and activations, calibrated on --data (default none: float)",
    )
    parser.add_argument(
        "--data",
        metavar="PREFIX",
        help="output of beamvision prepare: its train split calibrates --quantize int8",
    )
    parser.add_argument(
        "--calibration_size",
        type=positive_int,
        default=DEFAULT_CALIBRATION_SIZE,
        metavar="N",
        help=f"training images that calibrate INT8 (default {DEFAULT_CALIBRATION_SIZE})",
    )
    parser.add_argument(
        "--check",
        metavar="PATTERN",
        help="image files (a glob or a folder) to measure the converted model's agreement with classify on",
    )
    parser.add_argument(
        "--check_limit",
        type=positive_int,
        default=DEFAULT_CHECK_LIMIT,
        metavar="N",
        help=f"at most this many of them, drawn by --seed (default {DEFAULT_CHECK_LIMIT})",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="which images calibrate and check (default 0)"
    )
    add_switch(parser, "--overwrite", "replace what --output holds")


@dataclasses.dataclass(frozen=True)
class Config:
    model: str
    format: str
    output: str
    quantize: str
    data: str | None
    calibration_size: int
    check: str | None
    check_limit: int
    seed: int
    overwrite: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        serving = FORMATS[args.format]
        if args.quantize not in serving.quantizations:
            raise UsageError(
                f"--quantize {args.quantize}: {serving.title} takes {', '.join(serving.quantizations)}"
            )
        if args.quantize != NO_QUANTIZATION and not args.data:
            raise UsageError(f"--quantize {args.quantize}: needs --data, prepare's output to calibrate on")
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        return cls(**{**given, "model": args.model.rstrip("/"), "output": args.output.rstrip("/")})


def run(argv: list[str] | None = None) -> dict:
    """Converts ``--model`` into ``--output``; prints what was written and its agreement.

    Returns:
        The report written to ``OUT/conversion.json``.
    """
    config = Config.from_args(parse("beamvision convert", __doc__.splitlines()[0], add_arguments, argv))
    started = time.monotonic()
    manifest = verify_artifact(config.model)
    if manifest.quantization:
        raise UsageError(
            f"--model {config.model}: holds an INT8 model for OpenVINO (beamvision optimize), which "
            "does not convert; convert the float artifact it came from"
        )
    _check_output(config)
    check_files = _check_files(config) if config.check else []
    serving = FORMATS[config.format]
    artifact = load_artifact(config.model)
    quantized = f" ({config.quantize})" if config.quantize != NO_QUANTIZATION else ""
    print(
        f"converting {manifest.name} version {manifest.version} to {serving.title}{quantized} ...", flush=True
    )
    with tempfile.TemporaryDirectory() as tmp:
        calibration = _calibration(config, manifest, tmp) if config.quantize != NO_QUANTIZATION else None
        folder = os.path.join(tmp, "out")
        os.makedirs(folder)
        serving.write(artifact, folder, calibration)
        write_labels(manifest.labels, folder)
        size = folder_bytes(folder)
        checked = _agreement(artifact, serving, folder, check_files)
        report = {
            "format": serving.name,
            "quantization": config.quantize,
            "model_file": serving.model_file,
            **serving.signature(manifest.input_size),
            "labels": list(manifest.labels),
            "multi_label": manifest.multi_label,
            "source": {"uri": config.model, "name": manifest.name, "version": manifest.version},
            "size_bytes": size,
            "agreement": {"check": config.check, **checked},
            "beamvision_version": __version__,
            "seconds": round(time.monotonic() - started, 1),
        }
        with open(os.path.join(folder, REPORT_FILE), "w") as f:
            json.dump(report, f, indent=2)
        _publish(folder, config.output, config.overwrite)
    _print_summary(config, serving, report)
    return report


def _check_output(config: Config) -> None:
    """Refuses an ``--output`` that holds anything but an earlier conversion, or holds the model."""
    model, output = storage.canonical(config.model), storage.canonical(config.output)
    if model == output or model.startswith(output.rstrip("/") + "/"):
        raise UsageError(f"--output {config.output}: holds --model {config.model}; choose another place")
    if storage.is_local(config.output) and os.path.isfile(config.output):
        raise UsageError(f"--output {config.output}: is a file; --output names the folder to write")
    if not storage.list_files(config.output):
        return
    if not config.overwrite:
        raise UsageError(f"--output {config.output}: is not empty; choose a new place or pass --overwrite")
    if not storage.exists(storage.join(config.output, REPORT_FILE)):
        raise UsageError(
            f"--output {config.output}: holds files but no {REPORT_FILE} (not a conversion); "
            "--overwrite replaces only what convert wrote"
        )


def _check_files(config: Config) -> list[str]:
    """The image files ``--check`` names, at most ``--check_limit`` of them drawn by ``--seed``."""
    files = [m.path for m in storage.match(expand_pattern(config.check))]
    if not files:
        raise UsageError(f"--check {config.check}: matches no files")
    if len(files) > config.check_limit:
        chosen = np.random.default_rng(config.seed).choice(len(files), config.check_limit, replace=False)
        files = [files[i] for i in sorted(chosen)]
    return files


def _calibration(config: Config, manifest, tmp: str) -> np.ndarray:
    """The INT8 calibration sample: ``--calibration_size`` images of prepare's training split."""
    from beamvision.models import ModelError
    from beamvision.models.dataset import calibration_sample
    from beamvision.models.training import local_shards, read_dataset_info

    try:
        _, stats = read_dataset_info(config.data)
    except ModelError as exc:
        raise UsageError(str(exc)) from None
    if stats["image_size"] != manifest.input_size:
        raise UsageError(
            f"--data {config.data}: its images are {stats['image_size']}px, and --model {config.model} "
            f"takes {manifest.input_size}px"
        )
    total = stats["totals"]["train"]
    if not total:
        raise UsageError(f"--data {config.data}: the training split is empty; nothing to calibrate on")
    shards = local_shards(config.data, "train", os.path.join(tmp, "train"))
    images = calibration_sample(shards, manifest.input_size, total, config.calibration_size, config.seed)
    print(f"calibrating INT8 on {len(images):,} training images of {config.data} ...", flush=True)
    return images


def _agreement(artifact, serving, folder: str, files: list[str]) -> dict:
    """The converted model against classify (decode_image and the Keras model) on ``files``.

    Files classify cannot decode are skipped (they would be error rows);
    files the converted model cannot take (a SavedModel reads no TIFF, say)
    are counted as ``not_taken``, and the others still compared.
    """
    from beamvision.transforms.engines import inference_function

    size = artifact.manifest.input_size
    reference_model, converted = inference_function(artifact, None, embeddings=False), serving.load(folder)
    reference, result, skipped, not_taken = [], [], 0, 0
    for start in range(0, len(files), CHECK_BATCH):
        batch = []
        for uri in files[start : start + CHECK_BATCH]:
            data = storage.read_bytes(uri)
            try:
                batch.append((data, decode_image(data, size, DEFAULT_MAX_PIXELS).pixels))
            except DecodeError:
                skipped += 1  # classify would make it an error row: nothing to compare
        for group in _taken(converted, serving, batch):
            if group is None:
                not_taken += 1
                continue
            items, probabilities = group
            reference.append(reference_model(np.stack([p for _, p in items]))["probabilities"].numpy())
            result.append(probabilities)
    classes = len(artifact.manifest.labels)
    stacked = [
        np.concatenate(r).astype(np.float32) if r else np.zeros((0, classes), np.float32)
        for r in (reference, result)
    ]
    return {**agreement(*stacked), "skipped": skipped, "not_taken": not_taken}


def _taken(converted, serving, batch: list):
    """(items, probabilities) for the batch at once, else file by file; None for each file it refuses."""
    if not batch:
        return
    try:
        yield batch, converted([d if serving.takes == BYTES else p for d, p in batch])
        return
    except Exception:  # one file it cannot take fails the batch: find which, one at a time
        if len(batch) == 1:
            yield None
            return
    for item in batch:
        yield from _taken(converted, serving, [item])


def _publish(folder: str, output: str, overwrite: bool) -> None:
    """Puts the finished ``folder`` at ``output``: renamed into place locally; remotely, its report last.

    Locally the new folder is assembled beside ``output`` (the same disk) and
    renamed over it, so ``output`` is the old conversion or the new one, whole.
    """
    if storage.is_local(output):
        parent = os.path.dirname(os.path.abspath(output))
        os.makedirs(parent, exist_ok=True)
        staged = tempfile.mkdtemp(prefix=".convert-", dir=parent)
        shutil.copytree(folder, staged, dirs_exist_ok=True)
        old = None
        if os.path.exists(output):  # empty, or an earlier conversion with --overwrite (_check_output)
            old = tempfile.mkdtemp(prefix=".convert-old-", dir=parent)
            os.replace(output, os.path.join(old, "replaced"))
        os.replace(staged, output)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return
    if overwrite:
        storage.delete_tree(output)
    files = [
        os.path.relpath(os.path.join(root, name), folder)
        for root, _, names in os.walk(folder)
        for name in names
    ]
    for name in sorted(files, key=lambda name: name == REPORT_FILE):  # its presence says the folder is whole
        storage.write_atomic(storage.join(output, name), local_path=os.path.join(folder, name))


def _print_summary(config: Config, serving, report: dict) -> None:
    checked = report["agreement"]
    print(
        f"wrote {serving.title} to {config.output}: "
        f"{report['size_bytes'] / 1e6:.1f} MB in {report['seconds']}s"
    )
    if checked["images"]:
        print(
            f"agreement with classify on {checked['images']:,} images of {config.check}: "
            f"top-1 {checked['top1_agreement']:.1%} ({checked['same_top1']:,} same), "
            f"largest probability difference {checked['max_abs_difference']:.4f}"
            + (f"; {checked['skipped']} could not be decoded" if checked["skipped"] else "")
            + (f"; {checked['not_taken']} not taken by {serving.title}" if checked["not_taken"] else "")
        )
    elif config.check:
        print(f"agreement not measured: none of the {checked['skipped']} files of {config.check} decoded")
    else:
        print("agreement not measured (pass --check PATTERN: image files to compare with classify on)")
