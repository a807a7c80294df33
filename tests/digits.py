"""Real handwritten digits (scikit-learn's ``load_digits``) as PNG files in a folder per class."""

from __future__ import annotations

import os

import numpy as np


def render_subset(root: str, classes: int, per_class: int) -> str:
    """The first ``per_class`` digits of each of the first ``classes`` classes, as PNG folders."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    seen: dict[int, int] = {}
    for index, (image, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        if target >= classes or seen.get(target, 0) >= per_class:
            continue
        seen[target] = seen.get(target, 0) + 1
        os.makedirs(os.path.join(root, str(target)), exist_ok=True)
        Image.fromarray(np.round(image * (255 / 16)).astype(np.uint8)).save(
            os.path.join(root, str(target), f"digit_{index:04d}.png")
        )
    return root
