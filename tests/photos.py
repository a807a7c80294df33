"""Real photographs that ship inside scikit-image and scikit-learn, as a small labelled image set.

Each class is one photograph (astronaut, cat, coffee, rocket, ...); its images
are random crops of it, flipped and re-lit at random, saved as JPEG. Telling
the crops apart needs colour and texture, as real photo classification does,
and works offline on any machine (no download).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageEnhance

CLASSES = ("astronaut", "cat", "coffee", "rocket", "china", "flower", "hubble")


def photo(name: str) -> Image.Image:
    import skimage.data
    from sklearn.datasets import load_sample_image

    shipped = {
        "astronaut": skimage.data.astronaut,
        "cat": skimage.data.chelsea,
        "coffee": skimage.data.coffee,
        "rocket": skimage.data.rocket,
        "hubble": skimage.data.hubble_deep_field,
        "china": lambda: load_sample_image("china.jpg"),
        "flower": lambda: load_sample_image("flower.jpg"),
    }
    return Image.fromarray(shipped[name]()).convert("RGB")


def write_photo_classes(root: str, per_class: int, size: tuple[int, int] = (160, 120), seed: int = 0) -> dict:
    """Writes ROOT/<class>/<i>.jpg, ``per_class`` crops of each photo; returns {class: [paths]}."""
    rng = np.random.default_rng(seed)
    written = {}
    for name in CLASSES:
        source = photo(name)
        width, height = source.size
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        written[name] = []
        for i in range(per_class):
            scale = rng.uniform(0.35, 0.8)
            w, h = int(width * scale), int(height * scale)
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            crop = source.crop((x, y, x + w, y + h)).resize(size, Image.Resampling.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.75, 1.25))
            path = os.path.join(folder, f"{i:04d}.jpg")
            crop.save(path, "JPEG", quality=90)
            written[name].append(path)
    return written


def write_photo_tiles(
    root: str, count: int, classes: tuple[str, ...], size: int = 64, seed: int = 0
) -> list[tuple[str, tuple[str, ...]]]:
    """Writes ROOT/<i>.jpg, ``count`` multi-label tiles; returns (path, its label set) per tile.

    A tile's left and right halves are random crops of one photo of
    ``classes`` each: of the same photo (a set of one label) or, for about
    half the tiles, of two (a set of two).
    """
    rng = np.random.default_rng(seed)
    sources = {name: photo(name) for name in classes}
    os.makedirs(root, exist_ok=True)
    written = []
    for i in range(count):
        first = str(rng.choice(classes))
        second = str(rng.choice([c for c in classes if c != first])) if rng.random() < 0.5 else first
        tile = Image.new("RGB", (size, size))
        for left, name in ((0, first), (size // 2, second)):
            source = sources[name]
            width, height = source.size
            scale = rng.uniform(0.3, 0.7)
            w, h = int(width * scale / 2), int(height * scale)
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            tile.paste(source.crop((x, y, x + w, y + h)).resize((size // 2, size)), (left, 0))
        path = os.path.join(root, f"{i:04d}.jpg")
        tile.save(path, "JPEG", quality=90)
        written.append((path, tuple(sorted({first, second}))))
    return written
