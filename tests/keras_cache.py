"""Places ImageNet weight files where Keras looks for them, so the ImageNet code path runs offline.

Keras's applications load ``$KERAS_HOME/models/<file name>`` before trying to
download; MobileNetV2's loader checks no hash, so a file written here under
its official name is what Keras loads.
"""

from __future__ import annotations

import os

import h5py
import keras
import numpy as np

from beamvision.models.registry import get_spec

MOBILENET_V2_FILE = get_spec("mobilenet_v2").imagenet_file


def write_mobilenet_v2_weights(keras_home: str, seed: int = 0) -> keras.Model:
    """Writes distinct (not random-init) MobileNetV2 weights into ``keras_home``; returns the model."""
    from keras.src.legacy.saving import legacy_h5_format

    reference = keras.applications.MobileNetV2(weights=None)
    rng = np.random.default_rng(seed)
    reference.set_weights([w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in reference.get_weights()])
    cache = os.path.join(keras_home, "models")
    os.makedirs(cache, exist_ok=True)
    with h5py.File(os.path.join(cache, MOBILENET_V2_FILE), "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, reference)
    return reference
