"""INT8 for OpenVINO with NNCF: accuracy-controlled quantisation, the layers it kept float, and scoring.

``quantize`` runs NNCF's own ``quantize_with_accuracy_control``: post-training
quantisation calibrated on one sample, then, while the top-1 accuracy on a
validation sample is more than ``max_drop`` points below fp32's, the
quantised operations that cost the most (ranked by how far each moves the
outputs from fp32's) go back to float, one group at a time. It returns the
model NNCF settled on and the fully quantised one it started from, so that
``float_layers`` can say which operations stayed float and ``score`` can put
a figure on what plain INT8 would have cost. By default every convolution's
and matrix product's weights take 7 bits (``OVERFLOW_FIXES``), so that CPUs
without VNNI compute the model exactly (docs/training.md, "Why plain INT8
lost labels"). Everything here takes and returns ``openvino.Model`` objects
and NumPy arrays; ``beamvision optimize`` reads the data and writes the
artifact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from beamvision import console
from beamvision.models.artifact import PROBABILITIES
from beamvision.models.metrics import TOP_K, classification_metrics

if TYPE_CHECKING:
    import openvino as ov

# NNCF's overflow fix: which weights are quantised to half the 8-bit range (7 bits). A CPU
# without VNNI (AVX2, AVX-512 before Cascade Lake) multiplies uint8 activations by int8
# weights with an instruction that adds each pair of products into 16 bits and saturates
# there; with 7-bit weights no pair can overflow, so every CPU computes the same INT8 model.
OVERFLOW_FIXES = ("enable", "first_layer_only", "disable")
SATURATION_FREE = "enable"  # the fix under which no CPU saturates
DEFAULT_OVERFLOW_FIX = SATURATION_FREE
NNCF_OVERFLOW_FIX = "first_layer_only"  # NNCF's own default: what optimize used before it chose one
# How quantize calls NNCF, as an artifact's manifest records it.
METHOD = {
    "tool": "nncf",
    "algorithm": "quantize_with_accuracy_control",
    "drop_type": "absolute top-1 accuracy",
}


@dataclasses.dataclass(frozen=True)
class Quantized:
    """What ``quantize`` made: the model NNCF settled on, and the fully quantised model it began with."""

    model: ov.Model
    plain: ov.Model


def quantize(
    model: ov.Model,
    calibration: np.ndarray,
    validation: tuple[np.ndarray, np.ndarray],
    preset: str,
    max_drop_points: float,
    workdir: str,
    overflow_fix: str = DEFAULT_OVERFLOW_FIX,
) -> Quantized:
    """NNCF INT8 quantisation of ``model``, its validation top-1 accuracy held within ``max_drop_points``.

    Args:
        model: the fp32 OpenVINO model (input uint8 pixels, output ``probabilities``).
        calibration: uint8 images [n, size, size, 3], each one calibration batch.
        validation: uint8 images [m, size, size, 3] and the index of each true label among the model's
            [m]; NNCF also ranks the layers to put back to float on all of them.
        preset: NNCF's quantisation preset, ``performance`` or ``mixed``.
        max_drop_points: the most top-1 accuracy, in points, the INT8 model may lose on ``validation``;
            100 accepts any drop, so NNCF stops after plain post-training quantisation.
        workdir: an empty local folder for the fully quantised model NNCF starts from.
        overflow_fix: one of ``OVERFLOW_FIXES``: which weights NNCF quantises to 7 bits.

    Returns:
        The model NNCF returned, which may be outside the bound when NNCF could not reach it (the
        caller measures it), and the fully quantised one.
    """
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (
        AdvancedAccuracyRestorerParameters,
        AdvancedQuantizationParameters,
        OverflowFix,
    )

    # NNCF sets its logger to INFO when imported, with a handler of its own on stdout: its lines
    # (each reverted operation named) are --verbose's; its warnings repeat what the summary says.
    nncf.set_log_level(logging.INFO if console.is_verbose() else logging.ERROR)
    images, labels = validation
    restorer = AdvancedAccuracyRestorerParameters(
        intermediate_model_dir=workdir, ranking_subset_size=len(labels)
    )
    bars = contextlib.redirect_stdout(io.StringIO()) if console.is_quiet() else contextlib.nullcontext()
    with bars:  # NNCF's progress bars, on stdout
        controlled = nncf.quantize_with_accuracy_control(
            model,
            calibration_dataset=nncf.Dataset(list(calibration), lambda image: image[None]),
            validation_dataset=nncf.Dataset(
                list(zip(images, labels, strict=True)), lambda item: item[0][None]
            ),
            validation_fn=_validate,
            max_drop=max_drop_points / 100,
            drop_type=nncf.DropType.ABSOLUTE,
            preset=nncf.QuantizationPreset(preset),
            subset_size=len(calibration),
            advanced_quantization_parameters=AdvancedQuantizationParameters(
                overflow_fix=OverflowFix(overflow_fix)
            ),
            advanced_accuracy_restorer_parameters=restorer,
        )
    plain = ov.Core().read_model(os.path.join(workdir, "intermediate_model.xml"))
    return Quantized(controlled, plain)


def overflow_fix(record: dict[str, Any]) -> str:
    """The overflow fix an artifact's ``quantization`` record was made with (NNCF's, before it said)."""
    return record["method"].get("overflow_fix", NNCF_OVERFLOW_FIX)


def _validate(compiled: Any, items: Iterable[tuple[np.ndarray, int]]) -> tuple[float, list[list[np.ndarray]]]:
    """NNCF's validation function: top-1 accuracy, and each item's outputs to rank layers by.

    Returning the outputs (not a 0-or-1 score per image) has NNCF rank the
    quantised operations by how far reverting each brings the outputs back
    to fp32's: a finer signal than accuracy on a few hundred images. They are
    listed as NNCF's OpenVINO engine lists the outputs of the models it
    ranks (each output once per tensor name), or the two would not line up.
    """
    probabilities = compiled.output(PROBABILITIES)
    outputs, correct = [], []
    for image, label in items:
        result = compiled(image[None])
        outputs.append([value for port, value in result.items() for _ in port.get_names()])
        correct.append(int(np.argmax(result[probabilities][0])) == label)
    return float(np.mean(correct)), outputs


def quantized_ops(model: ov.Model) -> dict[str, str]:
    """The operations NNCF quantised, as its accuracy control counts them: friendly name -> op type.

    Those a FakeQuantize feeds, directly or through operations that carry a
    quantised tensor on unchanged (a Reshape, a pooling), in graph order. It
    walks NNCF's own graph of the model with NNCF's own lists of quantizer
    and quantisable operations, so it counts what NNCF's report counts.
    """
    from nncf.openvino.graph.nncf_graph_builder import GraphConverter
    from nncf.quantization.algorithms.accuracy_control.openvino_backend import (
        OVAccuracyControlAlgoBackend as Backend,
    )

    graph = GraphConverter.create_nncf_graph(model)
    quantizable = Backend.get_quantizable_metatypes()
    found = set()
    for quantizer in graph.get_nodes_by_metatypes(Backend.get_quantizer_metatypes()):
        to_see = list(graph.get_next_nodes(quantizer))
        while to_see:
            node = to_see.pop()
            if node.metatype in quantizable:
                found.add(node.node_name)
            else:
                to_see.extend(graph.get_next_nodes(node))
    return {
        op.get_friendly_name(): op.get_type_name()
        for op in model.get_ordered_ops()
        if op.get_friendly_name() in found
    }


# Keras layer classes -> the OpenVINO operation each converts to, for naming quantised operations.
KERAS_OPS = {"Conv2D": "Convolution", "DepthwiseConv2D": "GroupConvolution", "Dense": "MatMul"}


def keras_layers(keras_model: Any, model: ov.Model) -> dict[str, str]:
    """OpenVINO operation friendly name -> the Keras layer it came from, for the layers that have weights.

    Conversion keeps no layer names (a convolution is called after a Transpose
    it absorbed), so operations are matched to layers in graph order: the
    n-th convolution, depthwise convolution or matrix product to the n-th
    Conv2D, DepthwiseConv2D or Dense layer, each pair of the same kind and
    weight dimensions (in whatever layout). An empty dict when any pair
    differs (parallel branches listed in another order), rather than a wrong name.
    """
    layers = [
        layer
        for layer in keras_model._flatten_layers(include_self=False, recursive=True)
        if type(layer).__name__ in KERAS_OPS
    ]
    ops = [op for op in model.get_ordered_ops() if op.get_type_name() in KERAS_OPS.values()]
    if len(layers) != len(ops) or any(
        KERAS_OPS[type(layer).__name__] != op.get_type_name()
        or _dimensions(layer.kernel.shape) != _dimensions(op.input(1).get_partial_shape().to_shape())
        for layer, op in zip(layers, ops, strict=False)
    ):
        return {}
    return {op.get_friendly_name(): layer.name for op, layer in zip(ops, layers, strict=True)}


def _dimensions(shape) -> list[int]:
    """A weight's dimensions beyond 1, sorted: equal for a Keras kernel and its OpenVINO constant."""
    return sorted(int(d) for d in shape if int(d) != 1)


def float_layers(quantized: Quantized, names: dict[str, str]) -> list[dict[str, str | None]]:
    """The operations plain INT8 quantised and the controlled model keeps float, in graph order.

    Each is its OpenVINO ``name`` and ``type`` and, from ``names`` (``keras_layers``), its Keras ``layer``.
    """
    kept = quantized_ops(quantized.model)
    return [
        {"name": name, "type": op_type, "layer": names.get(name)}
        for name, op_type in quantized_ops(quantized.plain).items()
        if name not in kept
    ]


def score(
    models: dict[str, ov.Model],
    compile_model: Callable[[ov.Model], Any],
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    model_labels: list[str],
    reference: str = "fp32",
) -> dict[str, Any]:
    """Top-1 (and top-5 above 5 classes) accuracy of each model, and how each compares with ``reference``.

    Args:
        models: name -> OpenVINO model; ``reference`` among them.
        compile_model: an OpenVINO model to a compiled one, as the models will run (optimize: as
            ``classify --engine openvino --precision fp32`` compiles them).
        batches: (uint8 images [n, size, size, 3], index of each true label among ``model_labels``).
        model_labels: the models' labels.
        reference: the model the others are compared with.

    Returns:
        ``examples``, then per model its ``accuracy`` (and ``top5_accuracy``) and, for the others,
        ``drop_points`` (reference's accuracy minus its, in points) and ``top1_agreement`` (the share
        of images it gives reference's top-1 label).
    """
    compiled = {name: compile_model(model) for name, model in models.items()}
    k = min(TOP_K, len(model_labels))  # enough ranks for classification_metrics' top-k
    truth, ranked = [], {name: [] for name in models}
    for images, labels in batches:
        truth.append(labels)
        for name, model in compiled.items():
            probabilities = model(images)[model.output(PROBABILITIES)]
            ranked[name].append(
                np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
            )  # as the engine ranks
    y_true = np.concatenate(truth)
    tops = {name: np.concatenate(r) for name, r in ranked.items()}
    scores: dict[str, Any] = {"examples": len(y_true)}
    for name, ranks in tops.items():
        metrics = classification_metrics(y_true, ranks, model_labels)
        scores[name] = {key: metrics[key] for key in ("accuracy", "top5_accuracy") if key in metrics}
    for name, ranks in tops.items():
        if name != reference:
            drop = scores[reference]["accuracy"] - scores[name]["accuracy"]
            scores[name]["drop_points"] = round(100 * drop, 2)
            scores[name]["top1_agreement"] = float(np.mean(ranks[:, 0] == tops[reference][:, 0]))
    return scores


def sample_fingerprint(images: np.ndarray) -> str:
    """SHA-256 of a calibration sample's pixels: equal exactly when two runs calibrated on the same images."""
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
