"""A user's own model as a beamvision model: checked, then wrapped to take uint8 pixels like ours.

``load_user_model`` reads a ``.keras`` file (Keras 3's format) or a legacy
``.h5``/``.hdf5`` file, refusing what Keras's safe mode refuses (a Lambda layer
holds Python code) before anything is built. ``wrap_user_model`` checks the
model is an image classifier (one ``[batch, H, W, 3]`` input, one
``[batch, classes]`` output, ``classes`` equal to the labels) and rebuilds its
layers, unchanged and with their weights, on beamvision's uint8 input and
in-graph normalisation (``beamvision.models.preprocessing``). A model that
outputs logits gets a softmax; one whose output is a sigmoid is multi-label.

The result is an ordinary artifact model (what ``export`` and ``train``
write): flat, so its classifier layer's input is the image embedding, as for
the registry's architectures.

A TensorFlow SavedModel directory (``model.export()``, any TF 2 model with a
``serving_default`` signature, a subclassed Keras model too) is checked by its
signature and run through ``keras.layers.TFSMLayer``: its files are stored in
the artifact (``SAVEDMODEL_DIR``) and ``savedmodel_model`` rebuilds the
wrapper around them wherever the artifact is loaded. Its layers are not
visible, so it has no embedding; whether it outputs probabilities or logits
is measured on a probe batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

from beamvision.models.artifact import SAVEDMODEL, has_unsafe_layer
from beamvision.models.errors import ModelError, one_line

# How an imported model's output became probabilities: the final activation found -> what it means.
OUTPUT_KINDS = {
    "softmax": "probabilities of one label (single-label)",
    "sigmoid": "a probability per label (multi-label)",
    "logits": "unnormalised scores: a {head} is added",
}
KERAS_FORMATS = {".keras": "keras", ".h5": "h5", ".hdf5": "h5"}
SAVEDMODEL_FILE = "saved_model.pb"
SIGNATURE = "serving_default"


@dataclasses.dataclass(frozen=True)
class Wrapped:
    """A user's model rebuilt on beamvision's input, and what the import found out about it."""

    model: keras.Model
    input_size: int
    output: str  # a key of OUTPUT_KINDS
    classifier_layer: str | None  # the layer whose input is the embedding (None: a SavedModel's are hidden)
    multi_label: bool = False  # a sigmoid output, or logits of a model imported with --multi_label
    output_key: str | None = None  # a SavedModel signature's output that holds the scores

    def describe(self) -> str:
        """What its output is, as the import's summary says it: ``logits (unnormalised scores: ...)``."""
        from beamvision.models.registry import head_activation

        return f"{self.output} ({OUTPUT_KINDS[self.output].format(head=head_activation(self.multi_label))})"


def model_format(path: str) -> str:
    """``keras`` or ``h5`` for a model file's name, ``savedmodel`` for a folder holding saved_model.pb.

    Raises:
        ModelError: another kind of file, naming the kinds that are.
    """
    from beamvision import storage

    if storage.exists(storage.join(path.rstrip("/"), SAVEDMODEL_FILE)):
        return SAVEDMODEL
    suffix = os.path.splitext(path.rstrip("/"))[1].lower()
    if suffix not in KERAS_FORMATS:
        raise ModelError(
            f"--model {path}: not a model beamvision imports (a .keras, .h5 or .hdf5 file, "
            f"or a SavedModel folder holding {SAVEDMODEL_FILE})"
        )
    return KERAS_FORMATS[suffix]


def stored_config(local_path: str, fmt: str) -> dict[str, Any]:
    """The model's Keras config, read as JSON without building anything.

    Raises:
        ModelError: the file is not a model of that format.
    """
    import zipfile

    try:
        if fmt == "keras":
            with zipfile.ZipFile(local_path) as archive:
                return json.loads(archive.read("config.json"))
        import h5py

        with h5py.File(local_path, "r") as f:
            text = f.attrs.get("model_config")
        if text is None:
            raise ValueError("it holds weights only, no model_config")
        return json.loads(text.decode() if isinstance(text, bytes) else text)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:  # JSON errors are ValueErrors
        raise ModelError(f"not a {fmt} model file ({one_line(exc, 200)})") from None


def load_user_model(local_path: str, fmt: str) -> keras.Model:
    """Loads a user's Keras model file in safe mode, after checking its config for a Lambda layer.

    Raises:
        ModelError: one line: unsafe, or not loadable (and why, from Keras).
    """
    import keras

    config = stored_config(local_path, fmt)
    if has_unsafe_layer(config):
        raise ModelError(
            "it has a Lambda layer, which holds Python code; beamvision loads models in Keras "
            "safe mode only (rebuild it with built-in or registered layers)"
        )
    try:
        return keras.saving.load_model(local_path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a file it cannot rebuild
        raise ModelError(f"Keras cannot load it: {one_line(exc)}") from None


def wrap_user_model(
    user: keras.Model,
    labels: list[str],
    preprocessing: str,
    input_size: int | None,
    multi_label: bool = False,
) -> Wrapped:
    """``user`` rebuilt on a uint8 ``[batch, N, N, 3]`` input with ``preprocessing`` in the graph.

    Raises:
        ModelError: not one image input, not one output per label, or an input size that
            is missing (the model takes any) or differs from the model's.
    """
    import keras

    from beamvision.models.preprocessing import preprocess_class

    size = _input_size(user, input_size)
    outputs = user.outputs if hasattr(user, "outputs") else []
    if len(outputs) != 1 or len(outputs[0].shape) != 2:
        shapes = [tuple(x.shape) for x in outputs]
        raise ModelError(f"it must have one output of shape (batch, classes); it has {shapes or 'none'}")
    classes = outputs[0].shape[-1]
    if classes != len(labels):
        raise ModelError(f"it has {classes} outputs but the labels name {len(labels)} classes")

    images = keras.Input((size, size, 3), dtype="uint8", name="image")
    normalised = preprocess_class()(preprocessing, name="preprocess")(images)
    if isinstance(user, keras.Sequential):
        probabilities = normalised
        for layer in user.layers:  # every layer itself, so its weights come along
            probabilities = layer(probabilities)
    else:  # a functional model: its graph run on the new input with its own layers (what clone_model does)
        probabilities = user._run_through_graph(normalised, operation_fn=lambda layer: layer)
    model = keras.Model(images, probabilities, name=user.name)
    output = _output_kind(model)
    classifier = _classifier_layer(model)
    multi_label, added = output_head(output, multi_label)
    if added:
        scores = keras.layers.Activation(added, name="probabilities")(model.output)
        model = keras.Model(images, scores, name=user.name)
    # New layers with the same names and weights: the user's layers also belong to the user's own
    # graph, where ``layer.input`` (the embedding, for an engine) would find them first.
    fresh = keras.models.clone_model(model)
    fresh.set_weights(model.get_weights())
    return Wrapped(fresh, size, output, classifier, multi_label=multi_label)


def _input_size(user: keras.Model, input_size: int | None) -> int:
    inputs = getattr(user, "inputs", None) or []
    shapes = [tuple(x.shape) for x in inputs]
    if len(shapes) != 1 or len(shapes[0]) != 4 or shapes[0][3] != 3:
        raise ModelError(
            "it must take one batch of RGB images, shape (batch, height, width, 3); "
            f"it takes {shapes[0] if len(shapes) == 1 else shapes or 'no input'}"
        )
    return _square_size(shapes[0][1], shapes[0][2], input_size)


def _square_size(height: int | None, width: int | None, input_size: int | None) -> int:
    """The side to run a model at: its own, or ``--input_size`` for one that takes any size."""
    if height != width:
        raise ModelError(f"it takes {height}x{width} images; beamvision runs square inputs only")
    if height is None and input_size is None:
        raise ModelError("it takes images of any size: give the size to run it at with --input_size")
    if height is not None and input_size not in (None, height):
        raise ModelError(f"it takes {height}px images, not --input_size {input_size}")
    return int(height or input_size)


def _producer(tensor):
    return tensor._keras_history.operation


def _output_kind(model: keras.Model) -> str:
    """softmax, sigmoid or logits: the activation of the layer that makes the output."""
    import keras

    layer = _producer(model.output)
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", str(activation))
    return {"softmax": "softmax", "sigmoid": "sigmoid"}.get(name, "logits")


def _classifier_layer(model: keras.Model) -> str:
    """The last layer with weights on the way back from the output (a Dense or a 1x1 convolution)."""
    tensor = model.output
    while True:
        layer = _producer(tensor)
        if layer.weights:
            return layer.name
        parents = layer._inbound_nodes[0].input_tensors if layer._inbound_nodes else []
        if len(parents) != 1:
            raise ModelError("no layer with weights makes its output: it is not a classifier")
        tensor = parents[0]


def wrap_savedmodel(
    local_dir: str, labels: list[str], preprocessing: str, input_size: int | None, multi_label: bool = False
) -> Wrapped:
    """A SavedModel folder's ``serving_default`` signature on a uint8 input, checked like a Keras model.

    Raises:
        ModelError: no such signature, not one image input, not one output per label, a size missing.
    """
    import numpy as np
    import tensorflow as tf

    try:
        signatures = tf.saved_model.load(local_dir).signatures
    except Exception as exc:  # TensorFlow raises many types for a folder it cannot read
        raise ModelError(f"TensorFlow cannot load it: {one_line(exc)}") from None
    if SIGNATURE not in signatures:
        raise ModelError(f"it has no {SIGNATURE} signature (it has: {', '.join(signatures) or 'none'})")
    signature = signatures[SIGNATURE]
    inputs = list(signature.structured_input_signature[1].values())
    shapes = [tuple(spec.shape.as_list()) if spec.shape.rank is not None else None for spec in inputs]
    if len(inputs) != 1 or shapes[0] is None or len(shapes[0]) != 4 or shapes[0][3] != 3:
        raise ModelError(
            f"its {SIGNATURE} signature must take one batch of RGB images, shape (batch, height, width, 3); "
            f"it takes {shapes[0] if len(shapes) == 1 else shapes or 'no input'}"
        )
    size = _square_size(shapes[0][1], shapes[0][2], input_size)
    outputs = {key: spec.shape.as_list() for key, spec in signature.structured_outputs.items()}
    scores = [key for key, shape in outputs.items() if len(shape) == 2]
    if len(scores) != 1:
        raise ModelError(f"its {SIGNATURE} signature must give one (batch, classes) output, not {outputs}")
    classes = outputs[scores[0]][-1]
    if classes != len(labels):
        raise ModelError(f"it has {classes} outputs but the labels name {len(labels)} classes")
    probe = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    raw = savedmodel_model(local_dir, size, preprocessing, scores[0], activation=None)
    output = probed_output_kind(raw.predict(probe, verbose=0))
    multi_label, added = output_head(output, multi_label)
    model = savedmodel_model(local_dir, size, preprocessing, scores[0], activation=added)
    return Wrapped(model, size, output, None, multi_label=multi_label, output_key=scores[0])


def savedmodel_model(local_dir: str, size: int, preprocessing: str, output_key: str, activation: str | None):
    """uint8 images, ``preprocessing``, the SavedModel's serving signature, ``output_key``, ``activation``."""
    import keras

    from beamvision.models.preprocessing import preprocess_class

    images = keras.Input((size, size, 3), dtype="uint8", name="image")
    normalised = preprocess_class()(preprocessing, name="preprocess")(images)
    signature = keras.layers.TFSMLayer(local_dir, call_endpoint=SIGNATURE, name=SAVEDMODEL)
    scores = signature(normalised)[output_key]
    if activation:
        scores = keras.layers.Activation(activation, name="probabilities")(scores)
    return keras.Model(images, scores, name=SAVEDMODEL)


def probed_output_kind(scores) -> str:
    """softmax (rows in [0, 1] summing to 1), sigmoid (in [0, 1], other sums) or logits, from a probe."""
    import numpy as np

    scores = np.asarray(scores, np.float64)
    if scores.min() < -1e-6 or scores.max() > 1 + 1e-6:
        return "logits"
    return "softmax" if np.allclose(scores.sum(axis=1), 1.0, atol=1e-3) else "sigmoid"


def output_head(output: str, multi_label: bool) -> tuple[bool, str | None]:
    """(whether the model is multi-label, the activation to add to its output: None for probabilities).

    A sigmoid output is multi-label whatever ``multi_label`` (``import --multi_label``) says;
    logits get a sigmoid with it, a softmax without; a softmax output cannot be multi-label.

    Raises:
        ModelError: ``multi_label`` for a softmax output.
    """
    from beamvision.models.registry import head_activation

    if output == "softmax" and multi_label:
        raise ModelError("its output is a softmax, one label an image: drop --multi_label")
    multi_label = multi_label or output == "sigmoid"
    return multi_label, head_activation(multi_label) if output == "logits" else None
