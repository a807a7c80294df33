"""Architectures that keras.applications provides: VGG16, ResNet50, InceptionV3,
DenseNet121, Xception, MobileNet v1 and MobileNet v2.

Each builder passes beamvision's normalised input tensor to the Keras
constructor, so ImageNet weights load through Keras's own mechanism (its cache
dir, ``$KERAS_HOME/models``, or a download on a connected machine).
"""

from __future__ import annotations

from beamvision.models.registry import ArchitectureSpec, register


def _keras_builder(constructor_name: str):
    """A builder calling ``keras.applications.<constructor_name>`` (Keras is imported when it builds)."""

    def build(inputs, num_classes: int, weights: str | None):
        import keras

        constructor = getattr(keras.applications, constructor_name)
        return constructor(
            include_top=True,
            weights=weights,
            input_tensor=inputs,
            input_shape=tuple(inputs.shape[1:]),
            classes=num_classes,
            classifier_activation="softmax",
        )

    return build


def _register(
    name, constructor, size, min_size, preprocessing, params, weights_file, classifier="predictions"
):
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
            imagenet_file=weights_file,
        )
    )


_register("vgg16", "VGG16", 224, 32, "caffe", 138_357_544, "vgg16_weights_tf_dim_ordering_tf_kernels.h5")
_register(
    "resnet50", "ResNet50", 224, 32, "caffe", 25_636_712, "resnet50_weights_tf_dim_ordering_tf_kernels.h5"
)
_register(
    "inception_v3",
    "InceptionV3",
    299,
    75,
    "tf",
    23_851_784,
    "inception_v3_weights_tf_dim_ordering_tf_kernels.h5",
)
_register(
    "densenet121",
    "DenseNet121",
    224,
    32,
    "torch",
    8_062_504,
    "densenet121_weights_tf_dim_ordering_tf_kernels.h5",
)
_register("xception", "Xception", 299, 71, "tf", 22_910_480, "xception_weights_tf_dim_ordering_tf_kernels.h5")
_register(
    "mobilenet_v1", "MobileNet", 224, 32, "tf", 4_253_864, "mobilenet_1_0_224_tf.h5", classifier="conv_preds"
)
_register(
    "mobilenet_v2",
    "MobileNetV2",
    224,
    32,
    "tf",
    3_538_984,
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5",
)
