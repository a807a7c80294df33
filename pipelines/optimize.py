"""``beamvision optimize``: a model artifact to one that runs INT8 on OpenVINO, within a bound of fp32.

    beamvision optimize --model gs://bucket/models/f1 --data gs://bucket/data/flowers \\
        --output gs://bucket/models/f1-int8 [--max_drop 1.0] [--calibration_size 300] [--preset mixed]

Takes the artifact's OpenVINO model (the one it stores, or converted from
model.keras as ``--engines openvino`` would) and quantises it with NNCF's
accuracy control (``beamvision.models.quantization``): calibrated on a sample
(by ``--seed``) of the training split that prepare wrote, as the uint8 pixels
classify feeds the model, then with the layers that cost the most accuracy
put back to float until the top-1 accuracy on the validation split is within
``--max_drop`` points of fp32's; weights take 7 bits (``--overflow_fix``),
so that CPUs without VNNI compute it exactly. The test split, which NNCF
never sees, measures both models for the report. When no INT8 model is
within the bound, optimize says so in one line and exits with status 1,
writing nothing. The new artifact keeps the Keras model (the same weights: it stays a valid artifact), stores
the INT8 model as openvino/model.xml and model.bin, which ``classify --engine
openvino`` runs unchanged, and records the quantisation in its manifest (see
``beamvision.models.artifact.Manifest``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from beamvision import storage
from beamvision.console import counted
from beamvision.exits import RunFailed, Status
from beamvision.models import ModelError, quantization
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
from beamvision.models.dataset import split_sample
from beamvision.models.training import evaluation_split, local_shards, make_dataset, read_dataset_info
from beamvision.pipelines.flags import UsageError, accuracy_points, add_switch, parse, positive_int
from beamvision.transforms.engines import OpenVINOEngine

if TYPE_CHECKING:  # OpenVINO is imported where a model is converted, quantised or scored
    import openvino as ov

CALIBRATION_SPLIT = "train"
CONTROL_SPLIT = "val"  # NNCF holds the INT8 model's accuracy within --max_drop on it
DEFAULT_MAX_DROP = 1.0
EVALUATION_BATCH = 64
QUANTIZATION_PRESETS = ("performance", "mixed")
DEFAULT_CALIBRATION_SIZE = 300
DEFAULT_VALIDATION_SIZE = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="MODEL", help="the model artifact to quantise, local or URI"
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="PREFIX",
        help="output of beamvision prepare for this model: its train split calibrates, its validation "
        "split holds INT8 within --max_drop, its test split reports the accuracy of both models",
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="the INT8 model artifact to write, local or URI"
    )
    parser.add_argument(
        "--max_drop",
        type=accuracy_points,
        default=DEFAULT_MAX_DROP,
        metavar="POINTS",
        help=f"the most top-1 accuracy, in points, INT8 may lose against fp32 on the validation split "
        f"(default {DEFAULT_MAX_DROP}); layers go back to float until it holds, and when no INT8 model "
        "does, optimize writes nothing and exits with status 1. 100: plain INT8, any drop",
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
        "--validation_size",
        type=positive_int,
        default=DEFAULT_VALIDATION_SIZE,
        metavar="N",
        help=f"validation images --max_drop holds on (default {DEFAULT_VALIDATION_SIZE:,}, or the whole "
        "split if it is smaller): NNCF scores every one of them after each layer it puts back to float",
    )
    parser.add_argument(
        "--preset",
        choices=QUANTIZATION_PRESETS,
        default="performance",
        help="NNCF's quantisation preset: performance (default; symmetric weights and activations) "
        "or mixed (asymmetric activations: can be more accurate where they are not centred on zero)",
    )
    parser.add_argument(
        "--overflow_fix",
        choices=quantization.OVERFLOW_FIXES,
        default=quantization.DEFAULT_OVERFLOW_FIX,
        help="which weights NNCF quantises to 7 bits, so that CPUs without VNNI (AVX2, and AVX-512 "
        "before Cascade Lake) cannot saturate while multiplying them: enable (default: all, and every "
        "CPU computes the same model), first_layer_only (NNCF's own default) or disable (full 8 bits; "
        "for workers with VNNI or AMX only)",
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
    max_drop: float
    calibration_size: int
    validation_size: int
    preset: str
    overflow_fix: str
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

    Raises:
        RunFailed: (status 1) when no INT8 model is within ``--max_drop``; nothing is written.
    """
    config = Config.from_args(parse("beamvision optimize", __doc__.splitlines()[0], add_arguments, argv))
    started = time.monotonic()
    source = verify_artifact(config.model)
    labels, stats = _check_inputs(config, source)
    artifact = load_artifact(config.model)  # the Keras model, saved unchanged into the new artifact
    with tempfile.TemporaryDirectory() as tmp:
        data = _Data(config, stats, labels, source.labels, tmp)
        fp32_files = OpenVINOEngine.local_files(artifact, os.path.join(tmp, "fp32"))
        int8, record = _quantize(config, source, artifact, fp32_files, data, tmp)
        record["seconds"] = round(time.monotonic() - started, 1)
        manifest = _save(
            config, source, artifact, record, OpenVINOEngine.save(int8, os.path.join(tmp, "int8"))
        )
        fp32_megabytes = os.path.getsize(fp32_files[OpenVINOEngine.weights]) / 1e6
    _print_summary(config, manifest, fp32_megabytes, time.monotonic() - started)
    return manifest


class _Data:
    """The prepared splits of ``--data``: uint8 pixels, and the index of each true label among the model's."""

    def __init__(
        self, config: Config, stats: dict[str, Any], labels: list[str], model_labels: list[str], tmp: str
    ):
        self._config, self._labels, self._tmp = config, labels, tmp
        self.totals, self.image_size = stats["totals"], stats["image_size"]
        self._to_model = np.asarray([model_labels.index(label) for label in labels])  # matched by name

    def shards(self, split: str) -> list[str]:
        return local_shards(self._config.data, split, os.path.join(self._tmp, split))

    def sample(self, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``size`` images of ``split`` (all, if fewer) drawn by ``--seed``, and their labels."""
        total, seed = self.totals[split], self._config.seed
        images, labels = split_sample(self.shards(split), self.image_size, total, size, seed)
        return images, self._to_model[labels]

    def batches(self, split: str):
        """Every image of ``split`` in batches, with their labels."""
        size, classes = self.image_size, len(self._labels)
        for images, onehot in make_dataset(
            self.shards(split), size, size, classes, EVALUATION_BATCH, training=False
        ):
            yield images.numpy(), self._to_model[np.argmax(onehot.numpy(), axis=1)]


def _quantize(
    config: Config, source: Manifest, artifact, fp32_files: dict[str, str], data: _Data, tmp: str
) -> tuple[ov.Model, dict[str, Any]]:
    """The INT8 model within ``--max_drop`` and the manifest's record of it; refuses one outside the bound."""
    import openvino as ov  # (here: --help needs neither OpenVINO nor Keras)

    images, _ = data.sample(CALIBRATION_SPLIT, config.calibration_size)  # as calibration_sample draws
    validation = data.sample(CONTROL_SPLIT, config.validation_size)
    _announce(config, source, len(images), len(validation[1]))
    fp32 = ov.Core().read_model(fp32_files[OpenVINOEngine.xml])
    os.makedirs(nncf_dir := os.path.join(tmp, "nncf"))
    quantized = quantization.quantize(
        fp32, images, validation, config.preset, config.max_drop, nncf_dir, config.overflow_fix
    )
    models = {"fp32": fp32, "int8": quantized.model, "plain_int8": quantized.plain}
    control = quantization.score(models, _compile, _in_batches(*validation), source.labels)
    layers = {
        "quantized_layers": len(quantization.quantized_ops(quantized.plain)),
        "float_layers": quantization.float_layers(
            quantized, quantization.keras_layers(artifact.model, quantized.plain)
        ),
    }
    _check_bound(config, control, layers, quantized.model)
    reported_on = evaluation_split(data.totals)  # as train scores: test, else the validation split
    accuracy = (
        control
        if reported_on == CONTROL_SPLIT
        else quantization.score(models, _compile, data.batches(reported_on), source.labels)
    )
    record = _quantization_record(
        config,
        source,
        images,
        {"split": CONTROL_SPLIT, **control},
        {"split": reported_on, **accuracy},
        layers,
    )
    return quantized.model, record


def _compile(model: ov.Model):
    """As ``classify --engine openvino --precision fp32`` compiles it: what is not quantised in fp32."""
    return OpenVINOEngine.compile(model, "fp32")


def _in_batches(images: np.ndarray, labels: np.ndarray):
    for start in range(0, len(labels), EVALUATION_BATCH):
        yield images[start : start + EVALUATION_BATCH], labels[start : start + EVALUATION_BATCH]


def _save(
    config: Config, source: Manifest, artifact, record: dict[str, Any], int8_files: dict[str, str]
) -> Manifest:
    """Writes the INT8 artifact: the source's Keras model and what it records, the INT8 model, the record."""
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
    with tempfile.TemporaryDirectory() as tmp:
        carried = fetch_savedmodel(config.model, source, tmp)  # an import's
        return save_artifact(
            artifact.model, manifest, config.output, config.overwrite, extra_files={**carried, **int8_files}
        )


def _check_bound(config: Config, control: dict[str, Any], layers: dict[str, Any], model: ov.Model) -> None:
    """Refuses, in one line, an INT8 model outside ``--max_drop``, or none (none quantised, or all float)."""
    drop, total = control["int8"]["drop_points"], layers["quantized_layers"]
    if not total:
        raise RunFailed(
            f"--model {config.model}: NNCF found nothing to quantise in it (no convolution or matrix "
            "product it quantises); nothing written",
            Status.FAILED,
        )
    where = f"no INT8 model within --max_drop {config.max_drop:g} of fp32 on the " + counted(
        control["examples"], "validation image"
    )
    retry = "nothing written (raise --max_drop, or try --preset mixed or a larger --calibration_size)"
    if drop > config.max_drop:
        raise RunFailed(
            f"{where} of {config.data}: the closest NNCF found is {drop:.1f} points below, with "
            f"{len(layers['float_layers'])} of its {total} quantised layers back in float; {retry}",
            Status.FAILED,
        )
    if not quantization.quantized_ops(model):
        raise RunFailed(
            f"{where} of {config.data}: all {total} quantised layers had to go back to float; {retry}",
            Status.FAILED,
        )


def _points(value: float) -> str:
    return f"{value:g} point{'' if value == 1 else 's'}"


def _announce(config: Config, source: Manifest, calibration: int, validation: int) -> None:
    """What optimize is about to do, and how fine the bound is on this many validation images."""
    step = 100 / validation  # the points one validation image is worth
    grain = (
        f"; one of them is {step:.1f} points, so none may change its label" if step > config.max_drop else ""
    )
    print(
        f"quantising {source.name} version {source.version} to INT8 with NNCF ({config.preset}, overflow "
        f"fix {config.overflow_fix}): calibrating on {calibration:,} {CALIBRATION_SPLIT} images of "
        f"{config.data}, then holding top-1 accuracy on {counted(validation, 'validation image')} "
        f"within {_points(config.max_drop)} of fp32{grain} ...",
        flush=True,
    )


def _quantization_record(
    config: Config,
    source: Manifest,
    images: np.ndarray,
    control: dict[str, Any],
    accuracy: dict[str, Any],
    layers: dict[str, Any],
) -> dict[str, Any]:
    """The manifest's ``quantization``: method, source, calibration, the control, layers and accuracy."""
    import openvino as ov

    return {
        "precision": "int8",
        "method": {
            **quantization.METHOD,
            "nncf_version": _nncf_version(),
            "openvino_version": ov.get_version(),
            "preset": config.preset,
            "overflow_fix": config.overflow_fix,
            "max_drop_points": config.max_drop,
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
            "sample_sha256": quantization.sample_fingerprint(images),
        },
        "control": control,
        **layers,
        "accuracy": accuracy,
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
    if not stats["totals"][CONTROL_SPLIT]:
        raise UsageError(
            f"--data {config.data}: the validation split is empty, and NNCF holds INT8 within --max_drop "
            "on it (prepare with --val_fraction above 0)"
        )
    return labels, stats


def _nncf_version() -> str:
    import nncf

    return nncf.__version__


def _print_summary(config: Config, manifest: Manifest, fp32_megabytes: float, seconds: float) -> None:
    record = manifest.quantization
    control, accuracy, calibration = record["control"], record["accuracy"], record["calibration"]
    int8_megabytes = manifest.files[OpenVINOEngine.weights]["bytes"] / 1e6
    floats = record["float_layers"]
    print(
        f"quantised {manifest.name} to INT8 ({config.preset}) in {seconds:.0f}s, calibrated on "
        f"{calibration['images']:,} {calibration['split']} images (seed {calibration['seed']}); "
        f"{len(floats)} of its {record['quantized_layers']} quantised layers kept in float"
        + (f" (first: {floats[0]['layer'] or floats[0]['name']}, {floats[0]['type']})" if floats else "")
    )
    _print_accuracy("validation", control)
    if accuracy["split"] != CONTROL_SPLIT:
        _print_accuracy(accuracy["split"], accuracy)
    print(
        f"artifact: {config.output} ({manifest.name} version {manifest.version}); OpenVINO model "
        f"{int8_megabytes:.1f} MB (fp32 {fp32_megabytes:.1f} MB); run it with classify --engine openvino"
    )
    drop = accuracy["int8"]["drop_points"]
    if accuracy["split"] == CONTROL_SPLIT:
        print(
            f"WARNING: --data {config.data} has no test images: the accuracy above is on the validation "
            "images NNCF held it on, and flatters the INT8 model",
            file=sys.stderr,
        )
    elif drop > config.max_drop:
        print(
            f"WARNING: on the {counted(accuracy['examples'], 'test image')} INT8 is {drop:.1f} points "
            f"({counted(round(drop * accuracy['examples'] / 100), 'image')}) below fp32, more than "
            f"--max_drop {config.max_drop:g} (it holds on the "
            f"{counted(control['examples'], 'validation image')}): check it before use; more validation "
            "images make the bound firmer",
            file=sys.stderr,
        )


def _print_accuracy(split: str, scores: dict[str, Any]) -> None:
    fp32, int8, plain = (scores[name] for name in ("fp32", "int8", "plain_int8"))
    print(
        f"{split} accuracy on {counted(scores['examples'], 'image')}: fp32 {fp32['accuracy']:.1%}, "
        f"int8 {int8['accuracy']:.1%} (drop {int8['drop_points']:.1f} points); same top-1 label on "
        f"{int8['top1_agreement']:.1%}; plain INT8 {plain['accuracy']:.1%} (same top-1 on "
        f"{plain['top1_agreement']:.1%})"
    )
