"""A small trained multi-label model and real tiles to classify, built once for the tests that read them.

A squeezenet at 32 px (no batch normalisation: a few steps from scratch
learn something) gets a sigmoid head (``with_new_head(...,
multi_label=True)``, three classes) and a few fit steps on tiles that show
one or two of three shipped photos side by side (its label sets are
right for some tiles and not others, as a real model's); it is saved as an artifact
with ``multi_label`` and per-class thresholds. ``images/`` holds 12 more
tiles (each label set twice, named by it), and ``results/`` is one classify
run of the model over them (tensorflow engine).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from photos import photo
from PIL import Image

CLASSES = ["cat", "coffee", "rocket"]
THRESHOLDS = {"cat": 0.5, "coffee": 0.4, "rocket": 0.6}
SETS = [["cat"], ["coffee"], ["rocket"], ["cat", "coffee"], ["coffee", "rocket"], ["cat", "rocket"]]
SIZE = 32


def tile(names: list[str], rng) -> np.ndarray:
    """A SIZE px tile: one photo whole, or two side by side, re-lit at random."""
    width = SIZE // len(names)
    parts = [np.asarray(photo(n).resize((width, SIZE), Image.Resampling.BILINEAR)) for n in names]
    tiled = np.concatenate(parts, axis=1)
    if tiled.shape[1] < SIZE:
        tiled = np.pad(tiled, ((0, 0), (0, SIZE - tiled.shape[1]), (0, 0)), mode="edge")
    return np.clip(tiled * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)


def image_sets(images: str) -> dict[str, list[str]]:
    """uri -> its true label set, for the tiles under ``images`` (named NN-label+label.png)."""
    return {os.path.join(images, name): name[3:-4].split("+") for name in sorted(os.listdir(images))}


def build(folder) -> None:
    """Fills ``folder``: ``model/`` (multi-label), ``single/`` (the same network, single-label),
    ``images/`` and ``results/``."""
    import keras

    from beamvision.models import create_model, get_spec
    from beamvision.models.artifact import new_manifest, save_artifact
    from beamvision.models.training import with_new_head
    from beamvision.pipelines import classify

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    spec = get_spec("squeezenet")
    model = with_new_head(
        create_model(spec.name, len(CLASSES), SIZE), spec.classifier_layer, len(CLASSES), multi_label=True
    )
    sets = [SETS[i % len(SETS)] for i in range(48)]
    x = np.stack([tile(s, rng) for s in sets])
    y = np.asarray([[float(c in s) for c in CLASSES] for s in sets], dtype=np.float32)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    model.fit(x, y, batch_size=16, epochs=10, verbose=0)
    single = new_manifest(model, spec.name, CLASSES, "trained", name="multi", version="1")
    save_artifact(model, single, str(folder / "single"))
    manifest = dataclasses.replace(single, multi_label=True, thresholds=THRESHOLDS)
    save_artifact(model, manifest, str(folder / "model"))
    images = folder / "images"
    images.mkdir()
    for i, names in enumerate(SETS * 2):
        Image.fromarray(tile(names, rng)).save(images / f"{i:02d}-{'+'.join(names)}.png")
    argv = ["--input", str(images), "--model", str(folder / "model"), "--output", str(folder / "results")]
    classify.run(argv)
