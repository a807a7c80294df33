"""AlexNet, single-tower, layer for layer as torchvision's ``alexnet``.

Not in keras.applications. Five convolutions and three dense layers; an
adaptive average pool to 6x6 before the classifier (as torchvision) lets the
network take inputs from 63 px up with the same 61,100,840 parameters.
Keras's own ``AdaptiveAveragePooling2D`` cannot enlarge a feature map, which
every input under 223 px needs, so ``AdaptivePool`` does torchvision's binning
for any size.
No ImageNet weights are published for Keras.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from beamvision.models.registry import ArchitectureSpec, register


def _bin_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Row i averages input cells [floor(i*n/m), ceil((i+1)*n/m)), as torch's adaptive pool."""
    matrix = np.zeros((size_out, size_in), dtype="float32")
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = math.ceil((i + 1) * size_in / size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


@functools.cache
def adaptive_pool_class():
    """The ``AdaptivePool`` layer class, defined (and registered with Keras) on first use.

    Keras is imported only when a model is built or loaded, so commands that
    only read the registry (``beamvision models``, ``--help``) start fast.
    """
    import keras
    from keras import layers, ops

    @keras.saving.register_keras_serializable(package="beamvision")
    class AdaptivePool(layers.Layer):
        """Adaptive average pooling to a fixed square output, for any input size."""

        def __init__(self, output_size: int, **kwargs):
            super().__init__(**kwargs)
            self.output_size = output_size

        def call(self, x):
            rows = ops.convert_to_tensor(_bin_matrix(x.shape[1], self.output_size))
            cols = ops.convert_to_tensor(_bin_matrix(x.shape[2], self.output_size))
            return ops.einsum("ih,bhwc,jw->bijc", rows, x, cols)

        def compute_output_shape(self, input_shape):
            return (input_shape[0], self.output_size, self.output_size, input_shape[3])

        def get_config(self):
            return {**super().get_config(), "output_size": self.output_size}

    return AdaptivePool


def __getattr__(name: str):
    if name == "AdaptivePool":  # beamvision.models.alexnet.AdaptivePool, defined on first use
        return adaptive_pool_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def alexnet(inputs, num_classes: int, weights: str | None = None):
    """Builds AlexNet on a normalised float input tensor (a keras.Model)."""
    import keras
    from keras import layers

    if weights is not None:
        raise ValueError(f"AlexNet has no published Keras weights. Received: weights={weights!r}")
    x = layers.ZeroPadding2D(2, name="conv1_pad")(inputs)
    x = layers.Conv2D(64, 11, strides=4, activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    x = layers.Conv2D(192, 5, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool2")(x)
    x = layers.Conv2D(384, 3, padding="same", activation="relu", name="conv3")(x)
    x = layers.Conv2D(256, 3, padding="same", activation="relu", name="conv4")(x)
    x = layers.Conv2D(256, 3, padding="same", activation="relu", name="conv5")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool5")(x)
    x = adaptive_pool_class()(6, name="avg_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(0.5, name="drop6")(x)
    x = layers.Dense(4096, activation="relu", name="fc6")(x)
    x = layers.Dropout(0.5, name="drop7")(x)
    x = layers.Dense(4096, activation="relu", name="fc7")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(keras.utils.get_source_inputs(inputs), outputs, name="alexnet")


register(
    ArchitectureSpec(
        name="alexnet",
        builder=alexnet,
        default_input_size=224,
        min_input_size=63,
        preprocessing="torch",
        imagenet_weights=False,
        params=61_100_840,
        classifier_layer="predictions",
    )
)
