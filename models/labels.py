"""Class-name lists: the shipped ImageNet names and user label files.

A label file is UTF-8 text, one class name a line (blank lines ignored), local
or on any Beam filesystem; line i names model output i.
"""

from __future__ import annotations

import functools
import importlib.resources

from beamvision import storage
from beamvision.models.errors import ModelError


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names, in the order of Keras's ImageNet outputs."""
    text = importlib.resources.files("beamvision.models").joinpath("labels/imagenet.txt").read_text("utf-8")
    return tuple(line for line in text.splitlines() if line)


def read_labels_file(uri: str) -> list[str]:
    """Class names from a label file.

    Raises:
        ModelError: if the file is missing, not UTF-8, empty, or repeats a name.
    """
    if not storage.exists(uri):
        raise ModelError(f"label file not found: {uri}")
    try:
        text = storage.read_text(uri)
    except UnicodeDecodeError:
        raise ModelError(f"label file {uri} is not UTF-8 text") from None
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise ModelError(f"label file {uri} holds no labels")
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ModelError(f"label file {uri} repeats {', '.join(repeated[:5])}")
    return labels


def numbered_labels(num_classes: int) -> list[str]:
    """Placeholder names ``class_0`` .. ``class_{n-1}``."""
    return [f"class_{i}" for i in range(num_classes)]
