"""Training data: labels, deterministic splits and the TFRecord example format.

``prepare`` writes, and ``train`` reads, one format defined here:

    PREFIX/train-SSSSS-of-NNNNN.tfrecord   tf.train.Example per image:
    PREFIX/val-...   PREFIX/test-...         image  bytes  raw uint8 pixels, image_size x image_size x 3
                                             label  int64  index into labels.json
                                             uri    bytes  the source file
    PREFIX/labels.json                       class names; index i is label i
    PREFIX/stats.json                        counts per class and split, errors, settings
    PREFIX/errors-SSSSS-of-NNNNN.parquet     inputs that could not be used

Pixels come from ``decode_image``, the same function ``classify`` uses, so a
model trains on exactly the pixels it will later be shown.
"""

from __future__ import annotations

import hashlib

from beamvision import storage

SPLITS = ("train", "val", "test")
LABELS_FILE = "labels.json"
STATS_FILE = "stats.json"


def relative_key(uri: str, root: str | None) -> str:
    """The URI relative to the dataset root (so splits survive moving the dataset)."""
    if root:
        for base in (root.rstrip("/") + "/", root + "!/"):  # a file under ROOT, a member of ROOT (an archive)
            if uri.startswith(base):
                return uri[len(base) :]
    return uri


def assign_split(key: str, val_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """``train``, ``val`` or ``test`` for a file, from a hash of its key and the seed.

    Deterministic across reruns, runners and machines: it depends on nothing
    but the key, the fractions and the seed.
    """
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < test_fraction:
        return "test"
    if position < test_fraction + val_fraction:
        return "val"
    return "train"


def folder_label(uri: str, root: str) -> str | None:
    """The class of ``ROOT/<class>/.../file``: the first folder under the root; None for files at the root."""
    parts = relative_key(uri, root).split("/")
    return parts[0] if len(parts) > 1 and parts[0] else None


def serialize_example(pixels, label: int, uri: str) -> bytes:
    """One tf.train.Example with raw uint8 pixels, the label index and the source URI."""
    import tensorflow as tf

    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[pixels.tobytes()])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "uri": tf.train.Feature(bytes_list=tf.train.BytesList(value=[uri.encode("utf-8")])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_example(serialized, image_size: int):
    """tf.data map function: a serialized Example to (uint8 image [size, size, 3], int64 label)."""
    import tensorflow as tf

    features = tf.io.parse_single_example(
        serialized,
        {
            "image": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.int64),
        },
    )
    image = tf.reshape(tf.io.decode_raw(features["image"], tf.uint8), [image_size, image_size, 3])
    return image, features["label"]


def shard_prefix(prefix: str, split: str) -> str:
    """Where a split's shards go: ``PREFIX/<split>``, completed by ``-SSSSS-of-NNNNN.tfrecord``."""
    return storage.join(prefix, split)
