"""Small inputs: a network built for 224 px keeps a feature map worth pooling at 32 px.

The ImageNet architectures halve their input five times: at 224 px the last
feature map is 7x7, at 32 px it is 1x1, and a network trained from scratch on
tiny images learns from a single spatial position. The fix the CIFAR
literature uses (the CIFAR ResNets, MobileNet v2's CIFAR variant) is to keep
the first downsampling stages at stride 1. ``keep_resolution`` does that to
any built network, earliest stage first, until its last feature map is at
least ``MIN_FEATURE_SIDE`` pixels a side:

    >>> stock = get_spec("mobilenet_v2").builder(keras.Input((32, 32, 3)), 10, None)  # doctest: +SKIP
    >>> final_side(stock), final_side(keep_resolution(stock))                      # doctest: +SKIP
    (1, 4)

Strides hold no weights, so the result has the same layers, names and weight
shapes as the stock network (a weights file for one fits the other only if
both were built at the same size, which ``create_model`` guarantees by
applying this rule to every build). A stage at stride 1 costs what the stock
network costs at twice the input side. ``create_model`` applies it to every
build without ImageNet weights (those need the architecture's own size,
where nothing changes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

# The smallest side of the last feature map: 4x4, as MobileNet v2's CIFAR variant keeps at 32 px.
# docs/training.md ("Training on small data") has the digits figures for 1x1, 2x2 and 4x4.
MIN_FEATURE_SIDE = 4


def final_side(model: keras.Model) -> int:
    """The side of ``model``'s last feature map: its last strided layer's output (the input without one).

    Not the smallest 4-D output: MobileNet v1 reshapes its pooled features to 1x1 for its classifier.
    """
    strided = [layer for layer in model.layers if _strided(layer)]
    return _side(strided[-1].output) if strided else _side(model.inputs[0])


def downsampling_stages(model: keras.Model) -> list[list[str]]:
    """The names of the layers that reduce resolution, grouped by the side they reduce, earliest first.

    A stage is every strided layer reading one resolution: ResNet's main path
    and its shortcut convolution fall in one stage, and keep stride 1 together.
    """
    stages: dict[int, list[str]] = {}
    for layer in model.layers:
        if _strided(layer):
            stages.setdefault(_side(layer.input), []).append(layer.name)
    return [stages[side] for side in sorted(stages, reverse=True)]


def keep_resolution(model: keras.Model, min_side: int = MIN_FEATURE_SIDE) -> keras.Model:
    """``model`` with its earliest downsampling stages' strides halved until its last map is ``min_side``.

    Returns ``model`` itself when it already keeps that side, or has no
    strided layer left to change. Other models are new ones (fresh weights),
    built with ``keras.models.clone_model``.
    """
    while final_side(model) < min_side:
        stages = downsampling_stages(model)
        if not stages:
            break
        model = _halve_strides(model, set(stages[0]))
    return model


def _halve_strides(model: keras.Model, names: set[str]) -> keras.Model:
    """A clone of ``model`` whose layers ``names`` have half their stride (AlexNet's 4 becomes 2; 2, 1).

    A layer at stride 1 keeps its input's side: "valid" padding becomes
    "same", and an explicit ZeroPadding2D that only fed such layers (the
    Keras applications pad before a strided convolution) pads nothing, so
    each layer keeps its name.
    """
    import keras

    consumers: dict[str, set[str]] = {}
    for layer in model.layers:
        for node in layer._inbound_nodes:
            for parent in node.parent_nodes:
                consumers.setdefault(parent.operation.name, set()).add(layer.name)
    unstrided = {name for name in names if max(model.get_layer(name).strides) <= 2}
    unpadded = {
        layer.name
        for layer in model.layers
        if isinstance(layer, keras.layers.ZeroPadding2D) and consumers.get(layer.name, set()) <= unstrided
    }

    def clone(layer):
        config = layer.get_config()
        if layer.name in names:
            config["strides"] = tuple(max(stride // 2, 1) for stride in layer.strides)
            if max(config["strides"]) == 1:
                config["padding"] = "same"
        elif layer.name in unpadded:
            config["padding"] = ((0, 0), (0, 0))
        return layer.__class__.from_config(config)

    return keras.models.clone_model(model, clone_function=clone)


def _strided(layer) -> bool:
    """Whether ``layer`` reduces a feature map's resolution (a convolution or pooling with stride > 1)."""
    return max(getattr(layer, "strides", None) or (1,)) > 1 and _side(layer.input) is not None


def _side(tensor) -> int | None:
    shape = getattr(tensor, "shape", None)
    return shape[1] if shape is not None and len(shape) == 4 else None
