"""``beamvision optimize``: a model artifact to a new one that runs INT8 on OpenVINO (NNCF post-training).

    beamvision optimize --model gs://bucket/models/f1 --data gs://bucket/data/flowers \\
        --output gs://bucket/models/f1-int8 [--calibration_size 300] [--preset performance|mixed]

Takes the artifact's OpenVINO model (the one it stores, or converted from
model.keras as ``--engines openvino`` would), calibrates NNCF post-training
quantisation on a sample (by ``--seed``) of the training split that prepare
wrote, as the uint8 pixels classify feeds the model, and measures the top-1
accuracy of the fp32 and the INT8 model on the test split. The new artifact
keeps the Keras model (the same weights: it stays a valid artifact), stores
the INT8 model as openvino/model.xml and model.bin, which ``classify --engine
openvino`` runs unchanged, and records the quantisation in its manifest (see
``beamvision.models.artifact.Manifest``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from beamvision import storage
from beamvision.console import counted
from beamvision.models import ModelError
from beamvision.models.artifact import (
    MODEL_FILE,
    Manifest,
    artifact_exists,
    fetch_savedmodel,
    load_artifact,
    new_manifest,
    save_artifact,
    verify_artifact,
)
from beamvision.models.dataset import calibration_sample
from beamvision.models.metrics import classification_metrics
from beamvision.models.training import evaluation_split, local_shards, make_dataset, read_dataset_info
from beamvision.pipelines.flags import UsageError, add_switch, parse, positive_int
from beamvision.transforms.engines import OpenVINOEngine

if TYPE_CHECKING:  # OpenVINO is imported where a model is converted, quantised or scored
    import openvino as ov

CALIBRATION_SPLIT = "train"
# An INT8 model more than this many points of accuracy below fp32 gets a warning.
WARN_DROP_POINTS = 1.0
EVALUATION_BATCH = 64
QUANTIZATION_PRESETS = ("performance", "mixed")
DEFAULT_CALIBRATION_SIZE = 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="MODEL", help="the model artifact to quantise, local or URI"
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="PREFIX",
        help="output of beamvision prepare for this model: its train split calibrates, "
        "its test split measures the accuracy of both models",
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="the INT8 model artifact to write, local or URI"
    )
    parser.add_argument(
        "--calibration_size",
        type=positive_int,
        default=DEFAULT_CALIBRATION_SIZE,
        metavar="N",
        help=f"training images that calibrate (default {DEFAULT_CALIBRATION_SIZE}, "
        "or the whole split if it is smaller)",
    )
    parser.add_argument(
        "--preset",
        choices=QUANTIZATION_PRESETS,
        default="performance",
        help="NNCF's quantisation preset: performance (default; symmetric weights and activations) "
        "or mixed (asymmetric activations: can be more accurate where they are not centred on zero)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="which training images calibrate (default 0)"
    )
    parser.add_argument("--name", help="model name recorded in results (default: --model's)")
    parser.add_argument(
        "--version", help="model version recorded in results (default: --model's version + '-int8')"
    )
    add_switch(parser, "--overwrite", "replace an existing artifact at --output")


@dataclasses.dataclass(frozen=True)
class Config:
    model: str
    data: str
    output: str
    calibration_size: int
    preset: str
    seed: int
    name: str | None
    version: str | None
    overwrite: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        model, output = args.model.rstrip("/"), args.output.rstrip("/")
        if model == output:
            # The INT8 artifact records the accuracy of its source: the source must stay.
            raise UsageError(f"--output {args.output}: is --model; write the INT8 artifact to a new place")
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        return cls(**{**given, "model": model, "data": args.data.rstrip("/"), "output": output})


def run(argv: list[str] | None = None) -> Manifest:
    """Quantises ``--model`` into ``--output``; prints a summary.

    Returns:
        The manifest of the INT8 artifact, as written.
    """
    config = Config.from_args(parse("beamvision optimize", __doc__.splitlines()[0], add_arguments, argv))
    import openvino as ov  # (after the flags: --help needs neither OpenVINO nor Keras)

    started = time.monotonic()
    source = verify_artifact(config.model)
    labels, stats = _check_inputs(config, source)
    evaluated_on = evaluation_split(stats["totals"])  # as train scores
    artifact = load_artifact(config.model)  # the Keras model, saved unchanged into the new artifact
    with tempfile.TemporaryDirectory() as tmp:
        images = _calibration_images(config, source, stats, tmp)
        fp32_files = OpenVINOEngine.local_files(artifact, os.path.join(tmp, "fp32"))
        fp32 = ov.Core().read_model(fp32_files[OpenVINOEngine.xml])
        int8 = quantize(fp32, images, config.preset)
        int8_files = OpenVINOEngine.save(int8, os.path.join(tmp, "int8"))
        evaluation_shards = local_shards(config.data, evaluated_on, os.path.join(tmp, evaluated_on))
        accuracy = compare_accuracy(fp32, int8, evaluation_shards, stats["image_size"], labels, source.labels)
        record = _quantization_record(config, source, images, {"split": evaluated_on, **accuracy}, started)
        manifest = new_manifest(
            artifact.model,
            source.architecture,
            source.labels,
            source.weights,
            name=config.name or source.name,
            version=config.version or f"{source.version}-int8",
            training=source.training,  # model.keras is the source's: so are its training and metrics
            metrics=source.metrics,
            preprocessing=source.preprocessing,
        )
        # ... and what it predicts (a label set, at which thresholds) and where it came from.
        kept = {"multi_label": source.multi_label, "thresholds": source.thresholds, "origin": source.origin}
        manifest = dataclasses.replace(manifest, quantization=record, **kept)
        carried = fetch_savedmodel(config.model, source, os.path.join(tmp, "savedmodel"))  # an import's
        manifest = save_artifact(
            artifact.model, manifest, config.output, config.overwrite, extra_files={**carried, **int8_files}
        )
        fp32_megabytes = os.path.getsize(fp32_files[OpenVINOEngine.weights]) / 1e6
    _print_summary(config, manifest, fp32_megabytes, time.monotonic() - started)
    return manifest


def _calibration_images(config: Config, source: Manifest, stats: dict[str, Any], tmp: str) -> np.ndarray:
    """The calibration sample (``calibration_sample``), announced as calibration starts."""

    shards = local_shards(config.data, CALIBRATION_SPLIT, os.path.join(tmp, CALIBRATION_SPLIT))
    images = calibration_sample(
        shards, source.input_size, stats["totals"][CALIBRATION_SPLIT], config.calibration_size, config.seed
    )
    print(
        f"calibrating NNCF INT8 quantisation ({config.preset}) of {source.name} version {source.version} "
        f"on {len(images):,} {CALIBRATION_SPLIT} images of {config.data} ...",
        flush=True,
    )
    return images


def _quantization_record(
    config: Config, source: Manifest, images: np.ndarray, accuracy: dict[str, Any], started: float
) -> dict[str, Any]:
    """The manifest's ``quantization``: method, source, calibration sample and accuracy of both models."""
    import openvino as ov

    return {
        "precision": "int8",
        "method": {
            "tool": "nncf",
            "nncf_version": _nncf_version(),
            "openvino_version": ov.get_version(),
            "algorithm": "post-training quantization",
            "preset": config.preset,
        },
        "source": {
            "uri": config.model,
            "name": source.name,
            "version": source.version,
            "model_sha256": source.files[MODEL_FILE]["sha256"],
            OpenVINOEngine.name: "stored" if OpenVINOEngine.holds(source) else "converted",
        },
        "calibration": {
            "data": config.data,
            "split": CALIBRATION_SPLIT,
            "images": len(images),
            "requested": config.calibration_size,
            "seed": config.seed,
            "sample_sha256": sample_fingerprint(images),
        },
        "accuracy": accuracy,
        "seconds": round(time.monotonic() - started, 1),
    }


def _check_inputs(config: Config, source: Manifest) -> tuple[list[str], dict[str, Any]]:
    """Refuses what cannot be quantised or measured, before any work; returns the data's labels and stats."""
    from apache_beam.io.filesystems import FileSystems

    if source.quantization:
        raise UsageError(
            f"--model {config.model}: is already quantised; optimize the float artifact it came from"
        )
    if source.multi_label:  # its calibration data and its accuracy check are single-label ones
        raise UsageError(
            f"--model {config.model}: is a multi-label model; optimize quantises single-label models only "
            "(classify --engine openvino runs it in float)"
        )
    if not config.overwrite and artifact_exists(config.output):
        raise UsageError(
            f"--output {config.output}: already holds a model artifact; "
            "choose a new place or pass --overwrite"
        )
    try:
        labels, stats = read_dataset_info(config.data)
    except ModelError as exc:
        raise UsageError(str(exc)) from None
    if not FileSystems.match([storage.join(config.data, f"{CALIBRATION_SPLIT}-*.tfrecord")])[0].metadata_list:
        raise UsageError(
            f"--data {config.data}: no {CALIBRATION_SPLIT}-*.tfrecord shards there to calibrate on"
        )
    if stats["image_size"] != source.input_size:
        raise UsageError(
            f"--data {config.data}: its images are {stats['image_size']}px, and --model {config.model} "
            f"takes {source.input_size}px (prepare the data with --image_size {source.input_size})"
        )
    unknown = [label for label in labels if label not in source.labels]
    if unknown:
        raise UsageError(
            f"--data {config.data}: {len(unknown)} of its {len(labels)} classes are not labels of --model "
            f"{config.model} (first: {unknown[0]}), so its accuracy cannot be measured on it"
        )
    if not stats["totals"][CALIBRATION_SPLIT]:
        raise UsageError(f"--data {config.data}: the training split is empty; nothing to calibrate on")
    return labels, stats


def sample_fingerprint(images: np.ndarray) -> str:
    """SHA-256 of a calibration sample's pixels: equal exactly when two runs calibrated on the same images."""
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def quantize(model: ov.Model, images: np.ndarray, preset: str) -> ov.Model:
    """NNCF post-training INT8 quantisation of an OpenVINO model, calibrated on every image, one a batch."""
    import nncf

    dataset = nncf.Dataset(list(images), lambda image: image[None])
    return nncf.quantize(model, dataset, preset=nncf.QuantizationPreset(preset), subset_size=len(images))


def compare_accuracy(
    fp32: ov.Model,
    int8: ov.Model,
    shards: list[str],
    image_size: int,
    labels: list[str],
    model_labels: list[str],
) -> dict[str, Any]:
    """Top-1 (and top-5 above 5 classes) accuracy of both OpenVINO models on a split, and their agreement.

    ``labels`` are the data's classes, ``model_labels`` the model's, which
    may be more: an ImageNet model calibrated and scored on a few of its
    classes (a data label is matched to the model's by name).

    Both are compiled for the CPU with fp32 as the precision of what is not
    quantised, as ``classify --engine openvino --precision fp32`` runs them.
    """
    compiled = [OpenVINOEngine.compile(m, "fp32") for m in (fp32, int8)]
    k = min(5, len(model_labels))
    to_model = np.asarray([model_labels.index(label) for label in labels])
    y_true, ranked = [], ([], [])
    dataset = make_dataset(shards, image_size, image_size, len(labels), EVALUATION_BATCH, training=False)
    for images, onehot in dataset:
        y_true.append(to_model[np.argmax(onehot.numpy(), axis=1)])
        for model, out in zip(compiled, ranked, strict=True):
            probabilities = model(images.numpy())[model.output("probabilities")]
            out.append(np.argsort(-probabilities, axis=1, kind="stable")[:, :k])  # as the engine ranks
    truth = np.concatenate(y_true)
    fp32_ranked, int8_ranked = (np.concatenate(r) for r in ranked)
    scores = {}
    for name, ranks in (("fp32", fp32_ranked), ("int8", int8_ranked)):
        metrics = classification_metrics(truth, ranks, model_labels)
        scores[name] = {key: metrics[key] for key in ("accuracy", "top5_accuracy") if key in metrics}
    return {
        "examples": len(truth),
        **scores,
        "drop_points": round(100 * (scores["fp32"]["accuracy"] - scores["int8"]["accuracy"]), 2),
        "top1_agreement": float(np.mean(fp32_ranked[:, 0] == int8_ranked[:, 0])),
    }


def _nncf_version() -> str:
    import nncf

    return nncf.__version__


def _print_summary(config: Config, manifest: Manifest, fp32_megabytes: float, seconds: float) -> None:
    record = manifest.quantization
    accuracy, calibration = record["accuracy"], record["calibration"]
    fp32, int8, drop = accuracy["fp32"]["accuracy"], accuracy["int8"]["accuracy"], accuracy["drop_points"]
    int8_megabytes = manifest.files[OpenVINOEngine.weights]["bytes"] / 1e6
    print(
        f"quantised {manifest.name} to INT8 ({config.preset}) in {seconds:.0f}s, calibrated on "
        f"{calibration['images']:,} {calibration['split']} images (seed {calibration['seed']})"
    )
    print(
        f"{accuracy['split']} accuracy on {counted(accuracy['examples'], 'image')}: "
        f"fp32 {fp32:.1%}, int8 {int8:.1%} "
        f"(drop {drop:.1f} points); same top-1 label on {accuracy['top1_agreement']:.1%}"
    )
    print(
        f"artifact: {config.output} ({manifest.name} version {manifest.version}); OpenVINO model "
        f"{int8_megabytes:.1f} MB (fp32 {fp32_megabytes:.1f} MB); run it with classify --engine openvino"
    )
    if accuracy["split"] == CALIBRATION_SPLIT:
        print(
            f"WARNING: --data {config.data} has no test or validation images: the accuracy above is on the "
            "images it calibrated on, and flatters the INT8 model",
            file=sys.stderr,
        )
    if drop > WARN_DROP_POINTS:
        print(
            f"WARNING: the INT8 model's {accuracy['split']} accuracy is {drop:.1f} points below fp32's: "
            "check it before use, or try --preset mixed or a larger --calibration_size",
            file=sys.stderr,
        )
