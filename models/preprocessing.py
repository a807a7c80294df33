"""In-graph image normalisation: uint8 RGB pixels to each architecture's float input.

``PREPROCESSING_MODES`` names each mode with a description: the three of
``keras.applications.imagenet_utils.preprocess_input`` (``tf``, ``caffe``,
``torch``) and two for imported models (``unit``, ``none``).

The layer lives inside every model artifact, so callers feed raw uint8 images
and training and inference can never disagree about normalisation.
"""

from __future__ import annotations

import functools

PREPROCESSING_MODES = {
    "tf": "scale to [-1, 1] (Inception, Xception, MobileNet)",
    "caffe": "RGB to BGR, subtract the ImageNet channel means (VGG, ResNet)",
    "torch": "scale to [0, 1], then normalise by the ImageNet mean and std (DenseNet, AlexNet, SqueezeNet)",
    "unit": "scale to [0, 1]",
    "none": "float pixels 0..255 as they are (the model normalises them itself)",
}

_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@functools.cache
def preprocess_class():
    """The ``Preprocess`` layer class, defined (and registered with Keras) on first use.

    Keras is imported only when a model is built or loaded, so commands that
    only read the registry start fast.
    """
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="beamvision")
    class Preprocess(keras.layers.Layer):
        """Casts uint8 RGB images to float32 and normalises them for one mode."""

        def __init__(self, mode: str, **kwargs):
            super().__init__(**kwargs)
            if mode not in PREPROCESSING_MODES:
                raise ValueError(
                    f"Preprocess mode must be one of {tuple(PREPROCESSING_MODES)}. Received: mode={mode!r}"
                )
            self.mode = mode

        def call(self, images):
            x = ops.cast(images, "float32")
            if self.mode == "none":
                return x
            if self.mode == "unit":
                return x / 255.0
            if self.mode == "tf":
                return x / 127.5 - 1.0
            if self.mode == "caffe":
                return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_BGR_MEAN, "float32")
            mean = ops.convert_to_tensor(_TORCH_MEAN, "float32")
            std = ops.convert_to_tensor(_TORCH_STD, "float32")
            return (x / 255.0 - mean) / std

        def compute_output_shape(self, input_shape):
            return input_shape

        def compute_output_spec(self, images):
            return keras.KerasTensor(images.shape, dtype="float32")

        def get_config(self):
            return {**super().get_config(), "mode": self.mode}

    return Preprocess


def __getattr__(name: str):
    if name == "Preprocess":  # beamvision.models.preprocessing.Preprocess, defined on first use
        return preprocess_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
