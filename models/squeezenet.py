"""SqueezeNet 1.1, layer for layer as torchvision's ``squeezenet1_1``.

Not in keras.applications. Fire modules (1x1 squeeze, then parallel 1x1 and
3x3 expand, concatenated); the classifier is a 1x1 convolution followed by a
global average pool, so any input from 32 px up works. torchvision's
``ceil_mode`` max pools are reproduced exactly: they follow ReLUs, so padding
the bottom/right edge with zeros never changes a maximum.
No ImageNet weights are published for Keras.
"""

from __future__ import annotations

import math

from beamvision.models.registry import ArchitectureSpec, register

# (squeeze, expand) channels of fire modules 2..9; "pool" marks a max pool.
_LAYOUT = [
    (16, 64),
    (16, 64),
    "pool",
    (32, 128),
    (32, 128),
    "pool",
    (48, 192),
    (48, 192),
    (64, 256),
    (64, 256),
]


def _ceil_max_pool(x, name: str):
    """3x3/2 max pool with torchvision's ceil_mode=True output size."""
    from keras import layers

    height, width = x.shape[1], x.shape[2]
    pad_h = (math.ceil((height - 3) / 2) * 2 + 3) - height
    pad_w = (math.ceil((width - 3) / 2) * 2 + 3) - width
    if pad_h or pad_w:
        x = layers.ZeroPadding2D(((0, pad_h), (0, pad_w)), name=f"{name}_pad")(x)
    return layers.MaxPooling2D(3, strides=2, name=name)(x)


def _fire(x, squeeze: int, expand: int, name: str):
    from keras import layers

    s = layers.Conv2D(squeeze, 1, activation="relu", name=f"{name}_squeeze")(x)
    e1 = layers.Conv2D(expand, 1, activation="relu", name=f"{name}_expand1x1")(s)
    e3 = layers.Conv2D(expand, 3, padding="same", activation="relu", name=f"{name}_expand3x3")(s)
    return layers.Concatenate(name=f"{name}_concat")([e1, e3])


def squeezenet(inputs, num_classes: int, weights: str | None = None):
    """Builds SqueezeNet 1.1 on a normalised float input tensor (a keras.Model)."""
    import keras
    from keras import layers

    if weights is not None:
        raise ValueError(f"SqueezeNet has no published Keras weights. Received: weights={weights!r}")
    x = layers.Conv2D(64, 3, strides=2, activation="relu", name="conv1")(inputs)
    x = _ceil_max_pool(x, "pool1")
    fire, pool = 2, 2
    for item in _LAYOUT:
        if item == "pool":
            x = _ceil_max_pool(x, f"pool{pool}")
            pool += 1
        else:
            x = _fire(x, *item, name=f"fire{fire}")
            fire += 1
    x = layers.Dropout(0.5, name="drop9")(x)
    x = layers.Conv2D(num_classes, 1, activation="relu", name="conv10")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = layers.Softmax(name="predictions")(x)
    return keras.Model(keras.utils.get_source_inputs(inputs), outputs, name="squeezenet")


register(
    ArchitectureSpec(
        name="squeezenet",
        builder=squeezenet,
        default_input_size=224,
        min_input_size=32,
        preprocessing="torch",
        imagenet_weights=False,
        params=1_235_496,
        classifier_layer="conv10",
    )
)
