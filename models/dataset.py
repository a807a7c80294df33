"""Training data: labels, deterministic splits and the TFRecord example format.

``prepare`` writes, and ``train`` reads, one format defined here:

    PREFIX/train-SSSSS-of-NNNNN.tfrecord   tf.train.Example per image:
    PREFIX/val-...   PREFIX/test-...         image  bytes  raw uint8 pixels, image_size x image_size x 3
                                             label  int64  index into labels.json (a
                                                           multi-label set: one index per label)
                                             uri    bytes  the source file
    PREFIX/labels.json                       class names; index i is label i
    PREFIX/stats.json                        counts per class and split, errors, settings
    PREFIX/errors-SSSSS-of-NNNNN.parquet     inputs that could not be used

Pixels come from ``decode_image``, the same function ``classify`` uses, so a
model trains on exactly the pixels it will later be shown.
"""

from __future__ import annotations

import hashlib

import numpy as np

from beamvision import storage
from beamvision.console import counted

SPLITS = ("train", "val", "test")
LABELS_FILE = "labels.json"
STATS_FILE = "stats.json"


def relative_key(uri: str, root: str | None) -> str:
    """The URI relative to the dataset root (so splits survive moving the dataset).

    Local paths are compared absolute, so a file named by its absolute path
    (a Label Studio task's ``source_uri``) has the same key under a relative
    ROOT as when prepare listed it.
    """
    if root:
        if storage.is_local(root) and storage.is_local(uri):
            root, uri = storage.canonical(root), storage.canonical(uri)
        for base in (root.rstrip("/") + "/", root + "!/"):  # a file under ROOT, a member of ROOT (an archive)
            if uri.startswith(base):
                return uri[len(base) :]
    return uri


def split_position(key: str, seed: int = 0) -> float:
    """Where a file falls in [0, 1), from a hash of its key and the seed: the order splits are cut in."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(key: str, val_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """``train``, ``val`` or ``test`` for a file, from a hash of its key and the seed.

    Deterministic across reruns, runners and machines: it depends on nothing
    but the key, the fractions and the seed. ``split_overrides`` moves the
    few files a small class needs moved so that every split holds it.
    """
    return split_at(split_position(key, seed), val_fraction, test_fraction)


def split_at(position: float, val_fraction: float, test_fraction: float) -> str:
    """The split of a place in [0, 1): test below ``test_fraction``, then val, then train."""
    if position < test_fraction:
        return "test"
    if position < test_fraction + val_fraction:
        return "val"
    return "train"


# A class's files, summarised for split_overrides: per split as the hash assigns them, how many,
# and the (position, key) pairs of the lowest and of the highest few (never the whole list).
SplitSummary = dict[str, dict]
KEPT_AT_EACH_END = 2
MIN_FOR_EVERY_SPLIT = 3  # a class with this many files has at least one in each split


def summarise_split(entries: list[tuple[float, str]], fractions: tuple[float, float]) -> SplitSummary:
    """The summary of (position, key) pairs of one class (``fractions``: val, test)."""
    summary = empty_split_summary()
    for entry in entries:
        summary = add_to_split_summary(summary, entry, fractions)
    return summary


def empty_split_summary() -> SplitSummary:
    return {split: {"count": 0, "low": [], "high": []} for split in SPLITS}


def add_to_split_summary(
    summary: SplitSummary, entry: tuple[float, str], fractions: tuple[float, float]
) -> SplitSummary:
    """``summary``, updated in place, with one more (position, key) of the class."""
    part = summary[split_at(entry[0], *fractions)]
    part["count"] += 1
    part["low"] = sorted([*map(tuple, part["low"]), tuple(entry)])[:KEPT_AT_EACH_END]
    part["high"] = sorted([*map(tuple, part["high"]), tuple(entry)])[-KEPT_AT_EACH_END:]
    return summary


def merge_split_summaries(summaries) -> SplitSummary:
    """One summary of the union of the classes' files that ``summaries`` describe."""
    merged = empty_split_summary()
    for summary in summaries:
        for split in SPLITS:
            part, into = summary[split], merged[split]
            into["count"] += part["count"]
            into["low"] = sorted(map(tuple, into["low"] + part["low"]))[:KEPT_AT_EACH_END]
            into["high"] = sorted(map(tuple, into["high"] + part["high"]))[-KEPT_AT_EACH_END:]
    return merged


def split_overrides(summary: SplitSummary, fractions: tuple[float, float]) -> dict[str, str]:
    """The files of one class to move out of their hashed split (key -> split), so that every split holds it.

    ``fractions`` (val, test): a split asked for at 0 is never filled.

    A class of at least ``MIN_FOR_EVERY_SPLIT`` files keeps one in each
    split: an empty test split takes the class's lowest-placed file, then an
    empty validation split the lowest-placed training file (the highest test
    file if training holds none), then an empty training split the highest
    validation file (or test file, where validation has only one). A smaller
    class goes to training whole: it cannot be both learned and measured.
    Every other file keeps the split its own hash gives it, so adding files
    moves none of them; only a moved file may move back once its class has
    a file of its own in that split.
    """
    counts = {split: summary[split]["count"] for split in SPLITS}
    if sum(counts.values()) < MIN_FOR_EVERY_SPLIT:
        return {key: "train" for split in ("val", "test") for _, key in summary[split]["low"]}
    low = {split: [key for _, key in summary[split]["low"]] for split in SPLITS}
    high = {split: [key for _, key in reversed(summary[split]["high"])] for split in SPLITS}
    moved: dict[str, str] = {}

    def move(source: str, ends: dict[str, list[str]], target: str) -> None:
        key = next(k for k in ends[source] if k not in moved)
        moved[key] = target
        counts[source] -= 1
        counts[target] += 1

    val_wanted, test_wanted = (fraction > 0 for fraction in fractions)
    if test_wanted and not counts["test"]:
        move("val" if counts["val"] else "train", low, "test")
    if val_wanted and not counts["val"]:
        if counts["train"]:
            move("train", low, "val")
        else:
            move("test", high, "val")
    if not counts["train"]:
        move("val" if counts["val"] > 1 or not counts["test"] else "test", high, "train")
    return moved


# What a class with images but none in a split costs, and what can be done about it.
SPLIT_CONSEQUENCES = {
    "train": "the model will never predict them; add images of them",
    "val": "early stopping never sees them; a class needs 3 images to be in every split",
    "test": "their accuracy is not measured; a class needs 3 images to be in every split",
}


def classes_missing_from_splits(
    labels: list[str], counts: dict[str, dict[str, int]], splits=SPLITS
) -> dict[str, list[str]]:
    """Per split, the classes with examples in some split but none in this one (``counts``: stats.json's).

    Only ``splits`` are looked at (the others get no class): a split asked for at 0 lacks every class.
    """
    present = [name for name in labels if any(counts[split].get(name) for split in SPLITS)]
    return {
        split: [name for name in present if not counts[split].get(name)] if split in splits else []
        for split in SPLITS
    }


def missing_split_warnings(missing: dict[str, list[str]], splits=SPLITS) -> list[str]:
    """One warning line per split of ``splits`` that some classes are missing from (``missing``: as above)."""
    return [
        f"WARNING: {counted(len(missing[split]), 'class', 'classes')} "
        f"{'has' if len(missing[split]) == 1 else 'have'} no {split} image: {', '.join(missing[split][:10])} "
        f"({SPLIT_CONSEQUENCES[split]})"
        for split in splits
        if missing.get(split)
    ]


def folder_label(uri: str, root: str) -> str | None:
    """The class of ``ROOT/<class>/.../file``: the first folder under the root; None for files at the root."""
    parts = relative_key(uri, root).split("/")
    return parts[0] if len(parts) > 1 and parts[0] else None


def serialize_example(pixels, label: int | list[int], uri: str) -> bytes:
    """One tf.train.Example with raw uint8 pixels, the label index (or a label set's indices) and the URI."""
    import tensorflow as tf

    indices = [label] if isinstance(label, int) else sorted(set(label))
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[pixels.tobytes()])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=indices)),
        "uri": tf.train.Feature(bytes_list=tf.train.BytesList(value=[uri.encode("utf-8")])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_example(serialized, image_size: int, multi_hot_classes: int | None = None):
    """tf.data map function: a serialized Example to (uint8 image [size, size, 3], label).

    The label is the int64 index; with ``multi_hot_classes``, the label set as a
    float32 multi-hot vector of that length (a single-label file reads as one-hot).
    """
    import tensorflow as tf

    label_feature = (
        tf.io.VarLenFeature(tf.int64) if multi_hot_classes else tf.io.FixedLenFeature([], tf.int64)
    )
    features = tf.io.parse_single_example(
        serialized, {"image": tf.io.FixedLenFeature([], tf.string), "label": label_feature}
    )
    image = tf.reshape(tf.io.decode_raw(features["image"], tf.uint8), [image_size, image_size, 3])
    if not multi_hot_classes:
        return image, features["label"]
    indices = features["label"].values
    hot = tf.reduce_max(tf.one_hot(indices, multi_hot_classes, dtype=tf.float32), axis=0)
    return image, tf.ensure_shape(tf.reshape(hot, [multi_hot_classes]), [multi_hot_classes])


def shard_prefix(prefix: str, split: str) -> str:
    """Where a split's shards go: ``PREFIX/<split>``, completed by ``-SSSSS-of-NNNNN.tfrecord``."""
    return storage.join(prefix, split)


def calibration_sample(shards: list[str], image_size: int, total: int, size: int, seed: int) -> np.ndarray:
    """``size`` images of a split (all of them if it has fewer), drawn by ``seed`` (``split_sample``)."""
    return split_sample(shards, image_size, total, size, seed)[0]


def split_sample(
    shards: list[str], image_size: int, total: int, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``size`` images of a split (all of them if it has fewer) and their labels, drawn by ``seed``.

    The draw depends on nothing but the seed, the split's size and its record
    order (shards sorted by name, records in file order), so a rerun with the
    same seed draws the same images; only the chosen ones are decoded.

    Args:
        shards: local paths of the split's TFRecord shards (single-label).
        image_size: the prepared image side.
        total: the number of records in ``shards`` (stats.json's count).
        size: how many to draw.
        seed: seed of the draw.

    Returns:
        uint8 images [n, image_size, image_size, 3], exactly as classify feeds the model, and the index
        of each one's label among the data's labels [n], in record order.
    """
    import tensorflow as tf

    wanted = set(np.random.default_rng(seed).choice(total, size=min(size, total), replace=False).tolist())
    images, labels = [], []
    for index, record in enumerate(tf.data.TFRecordDataset(sorted(shards))):  # one reader: a fixed order
        if index in wanted:
            image, label = parse_example(record, image_size)
            images.append(image.numpy())
            labels.append(int(label))
            if len(images) == len(wanted):
                break
    return np.stack(images), np.asarray(labels, dtype=np.int64)
