"""Architecture registry: one ``ArchitectureSpec`` per CNN, and ``create_model``.

An architecture is data. Each family module registers its specs with
``register``; ``create_model`` builds any of them the same way: a uint8 image
input, the architecture's normalisation as the first layer (see
``beamvision.models.preprocessing``), then the network, ending in class probabilities.

    >>> from beamvision.models import create_model, list_models
    >>> list_models()
    ['alexnet', 'densenet121', ...]
    >>> model = create_model("mobilenet_v2", num_classes=10, input_size=64)
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Keras is imported where a model is built or loaded
    import keras

from beamvision import storage
from beamvision.models.errors import ModelArgumentError, ModelError, one_line
from beamvision.models.preprocessing import PREPROCESSING_MODES, preprocess_class
from beamvision.models.small_inputs import keep_resolution

# builder(inputs, num_classes, weights) -> keras.Model whose inputs are the
# source inputs of ``inputs`` and whose output is class probabilities. Keras
# is imported by builders, never at import time: reading the registry is fast.
Builder = Callable[[Any, int, "str | None"], Any]

IMAGENET_CLASSES = 1000


@dataclasses.dataclass(frozen=True)
class ArchitectureSpec:
    """What beamvision needs to know about one architecture.

    Attributes:
        name: registry key, e.g. ``"mobilenet_v2"``.
        builder: builds the network on a float input tensor (see ``Builder``).
        default_input_size: the side, in pixels, the architecture was designed for.
        min_input_size: the smallest side the network accepts.
        preprocessing: normalisation mode, one of ``PREPROCESSING_MODES``.
        imagenet_weights: whether Keras publishes ImageNet weights for it.
        params: parameter count at the default size with 1,000 classes (the
            published reference figure; the test suite checks every build
            against it).
        classifier_layer: the final classifying layer; its input, globally
            average-pooled where it is still a feature map, is the image
            embedding (the pooled features before the classifier).
        imagenet_file: the ImageNet weight file's name in Keras's cache dir
            (``keras_cache_dir``), where Keras loads it from before any download.
    """

    name: str
    builder: Builder
    default_input_size: int
    min_input_size: int
    preprocessing: str
    imagenet_weights: bool
    params: int
    classifier_layer: str
    imagenet_file: str | None = None

    def __post_init__(self):
        if self.preprocessing not in PREPROCESSING_MODES:
            raise ValueError(
                f"preprocessing must be one of {tuple(PREPROCESSING_MODES)}. "
                f"Received: preprocessing={self.preprocessing!r}"
            )
        if not 0 < self.min_input_size <= self.default_input_size:
            raise ValueError(
                "min_input_size must be positive and at most default_input_size. "
                f"Received: min_input_size={self.min_input_size}, "
                f"default_input_size={self.default_input_size}"
            )

    def check_arguments(
        self, num_classes: int | None = None, input_size: int | None = None, weights: str | None = None
    ) -> None:
        """Refuses arguments this architecture cannot take; None means "not given".

        The one home of these rules: ``create_model`` calls it, and so do the
        ``export`` and ``train`` flags, before any work starts.

        Raises:
            ModelArgumentError: naming the argument, the value received and why.
        """
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ModelArgumentError("num_classes", num_classes, "must be a positive integer")
        if input_size is not None and (not isinstance(input_size, int) or input_size < self.min_input_size):
            raise ModelArgumentError(
                "input_size", input_size, f"{self.name} needs at least {self.min_input_size}"
            )
        if weights != "imagenet":
            return
        if not self.imagenet_weights:
            raise ModelArgumentError("weights", weights, f"no ImageNet weights are published for {self.name}")
        if num_classes is not None and num_classes != IMAGENET_CLASSES:
            raise ModelArgumentError(
                "num_classes",
                num_classes,
                f"ImageNet weights for {self.name} have {IMAGENET_CLASSES} classes",
            )
        if input_size is not None and input_size != self.default_input_size:
            raise ModelArgumentError(
                "input_size", input_size, f"ImageNet weights for {self.name} need {self.default_input_size}"
            )


_REGISTRY: dict[str, ArchitectureSpec] = {}


def register(spec: ArchitectureSpec) -> ArchitectureSpec:
    """Adds ``spec`` to the registry; a name can be registered once."""
    if spec.name in _REGISTRY:
        raise ValueError(f"Architecture {spec.name!r} is already registered.")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    """Names of all registered architectures, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ArchitectureSpec:
    """The spec registered under ``name``.

    Raises:
        ModelError: for an unknown name; the message lists the known ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown architecture {name!r}; known: {', '.join(list_models())}") from None


def head_activation(multi_label: bool = False) -> str:
    """The activation of a classifier head: softmax for one label per image, sigmoid for several."""
    return "sigmoid" if multi_label else "softmax"


def create_model(
    name: str,
    num_classes: int = IMAGENET_CLASSES,
    input_size: int | None = None,
    weights: str | None = None,
) -> keras.Model:
    """Builds a registered architecture with uint8 input and probability output.

    Args:
        name: a name from ``list_models()``.
        num_classes: size of the probability output.
        input_size: square input side in pixels; the architecture's default if None.
        weights: None (random initialisation), ``"imagenet"`` (Keras's published
            weights, from its cache dir or downloaded by Keras), or the path or
            URI of a weights file (``.weights.h5`` or legacy ``.h5``) for exactly
            this architecture, class count and input size.

    Returns:
        A functional Keras model: ``[batch, size, size, 3]`` uint8 in,
        ``[batch, num_classes]`` float32 probabilities out. Without ImageNet
        weights, a network whose last feature map would be under 4x4 at this
        size has its first strides halved (``small_inputs.keep_resolution``).

    Raises:
        ModelError: for an unknown name; ModelArgumentError for arguments the
            architecture cannot take.
    """
    import keras

    spec = get_spec(name)
    size = spec.default_input_size if input_size is None else input_size
    spec.check_arguments(num_classes, size, weights)
    inputs = keras.Input((size, size, 3), dtype="uint8", name="image")
    normalised = preprocess_class()(spec.preprocessing, name="preprocess")(inputs)
    if weights == "imagenet":
        model = _build_with_imagenet_weights(spec, normalised, num_classes)
    else:  # a small input keeps a feature map worth pooling (beamvision.models.small_inputs)
        model = keep_resolution(spec.builder(normalised, num_classes, None))
    if weights not in (None, "imagenet"):
        _load_weights_file(model, weights)
    return model


def keras_cache_dir() -> str:
    """Where Keras looks for weight files before downloading: ``$KERAS_HOME/models`` (``~/.keras/models``)."""
    return os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "models")


def imagenet_weights_cached(spec: ArchitectureSpec) -> bool:
    """Whether ``--weights imagenet`` can build ``spec`` without a download: its file is in Keras's cache."""
    return bool(spec.imagenet_file) and os.path.isfile(os.path.join(keras_cache_dir(), spec.imagenet_file))


def _build_with_imagenet_weights(spec: ArchitectureSpec, inputs, num_classes: int) -> keras.Model:
    try:
        return spec.builder(inputs, num_classes, "imagenet")
    except Exception as exc:  # Keras's get_file raises a bare Exception when offline.
        cache = keras_cache_dir()
        reason = one_line(exc, 200)
        raise ModelError(
            f"ImageNet weights for {spec.name} are not in Keras's cache ({cache}) and could not be "
            f"downloaded: {reason}"
        ) from exc


def _load_weights_file(model: keras.Model, uri: str) -> None:
    """Loads a weights file from a local path or any Beam filesystem URI."""
    if not storage.exists(uri):
        raise ModelError(f"weights file not found: {uri}")
    suffix = ".weights.h5" if uri.endswith(".weights.h5") else os.path.splitext(uri)[1]
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "weights" + suffix)
        storage.download(uri, local)
        try:
            model.load_weights(local)
        except Exception as exc:  # Keras raises several types for a mismatched file.
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot load weights from {uri} into {model.name}: {first_line}") from exc
