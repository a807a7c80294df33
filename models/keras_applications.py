"""Architectures that keras.applications provides: VGG16, ResNet50, InceptionV3,
DenseNet121, Xception, MobileNet v1 and MobileNet v2.

Each builder passes beamvision's normalised input tensor to the Keras
constructor, so ImageNet weights load through Keras's own mechanism (its cache
dir, ``$KERAS_HOME/models``, or a download on a connected machine).
"""

from __future__ import annotations

import keras

from beamvision.models.registry import ArchitectureSpec, register


def _keras_builder(constructor):
    def build(inputs, num_classes: int, weights: str | None) -> keras.Model:
        return constructor(
            include_top=True,
            weights=weights,
            input_tensor=inputs,
            input_shape=tuple(inputs.shape[1:]),
            classes=num_classes,
            classifier_activation="softmax",
        )

    return build


def _register(name, constructor, size, min_size, preprocessing, params, classifier="predictions"):
    register(
        ArchitectureSpec(
            name=name,
            builder=_keras_builder(constructor),
            default_input_size=size,
            min_input_size=min_size,
            preprocessing=preprocessing,
            imagenet_weights=True,
            params=params,
            classifier_layer=classifier,
        )
    )


_apps = keras.applications
_register("vgg16", _apps.VGG16, 224, 32, "caffe", 138_357_544)
_register("resnet50", _apps.ResNet50, 224, 32, "caffe", 25_636_712)
_register("inception_v3", _apps.InceptionV3, 299, 75, "tf", 23_851_784)
_register("densenet121", _apps.DenseNet121, 224, 32, "torch", 8_062_504)
_register("xception", _apps.Xception, 299, 71, "tf", 22_910_480)
_register("mobilenet_v1", _apps.MobileNet, 224, 32, "tf", 4_253_864, classifier="conv_preds")
_register("mobilenet_v2", _apps.MobileNetV2, 224, 32, "tf", 3_538_984)
