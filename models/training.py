"""Keras training of a registered architecture on ``prepare`` output: the plain functions.

What the training step (``trainer``) is made of: reading a prepared dataset
(its labels and stats, its shards, a fingerprint) and its tf.data pipeline,
model construction for each starting point (random, ImageNet, an existing
artifact, a weights file), compiling with a warm-up + cosine learning rate,
the per-epoch line, and evaluation on the test split. The callbacks of the
fit are in ``callbacks``, the checkpoints in ``checkpoints``.

Keras and TensorFlow are imported inside the functions that use them, so
that commands importing this module (``beamvision train --help``) start
without them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from beamvision import storage
from beamvision.models.artifact import artifact_exists, load_artifact
from beamvision.models.dataset import LABELS_FILE, STATS_FILE, parse_example
from beamvision.models.errors import ModelError
from beamvision.models.metrics import DEFAULT_THRESHOLD, classification_metrics, multilabel_metrics
from beamvision.models.registry import (
    IMAGENET_CLASSES,
    create_model,
    get_spec,
    head_activation,
)

if TYPE_CHECKING:  # Keras is imported where a model is built, compiled or scored
    import keras

# Keras applications use BatchNorm momentum up to 0.999: on a small dataset
# (a few hundred steps) the moving statistics never catch up with the weights
# and inference-mode accuracy collapses. 0.9 tracks them within ~20 steps.
BATCHNORM_MOMENTUM = 0.9


def evaluation_split(totals: dict[str, int]) -> str:
    """The split a trained model is scored on: test, else val, else train (for tiny datasets)."""
    return next((split for split in ("test", "val") if totals[split]), "train")


def read_dataset_info(prefix: str) -> tuple[list[str], dict[str, Any]]:
    """labels.json and stats.json of a prepared dataset (what train, tune and optimize take as ``--data``).

    Raises:
        ModelError: when ``prefix`` holds no prepared dataset, naming ``--data``.
    """
    labels_uri, stats_uri = storage.join(prefix, LABELS_FILE), storage.join(prefix, STATS_FILE)
    if not storage.exists(labels_uri) or not storage.exists(stats_uri):
        raise ModelError(
            f"--data {prefix}: no prepared dataset there ({LABELS_FILE} and {STATS_FILE} not found; "
            "beamvision prepare writes them)"
        )
    labels = json.loads(storage.read_text(labels_uri))
    stats = json.loads(storage.read_text(stats_uri))
    if len(labels) < 2:
        raise ModelError(f"the dataset at {prefix} has {len(labels)} class; training needs at least 2")
    return labels, stats


def local_shards(prefix: str, split: str, cache_dir: str) -> list[str]:
    """Local paths of a split's TFRecord shards, copied from remote storage if needed."""
    paths = [path for path, _ in storage.match_sizes(storage.join(prefix, f"{split}-*.tfrecord"))]
    if storage.is_local(prefix):
        return paths
    os.makedirs(cache_dir, exist_ok=True)
    local = []
    for uri in paths:
        target = os.path.join(cache_dir, f"{split}-{os.path.basename(uri)}")
        storage.download(uri, target)
        local.append(target)
    return local


def dataset_fingerprint(prefix: str, labels: list[str], stats: dict[str, Any]) -> str:
    """SHA-256 over the labels, the stats and the names and sizes of every shard."""
    shards = sorted(
        (os.path.basename(path), size)
        for path, size in storage.match_sizes(storage.join(prefix, "*.tfrecord"))
    )
    payload = json.dumps({"labels": labels, "stats": stats, "shards": shards}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def make_dataset(
    files,
    image_size,
    input_size,
    num_classes,
    batch_size,
    training,
    augment=(),
    seed=0,
    count=None,
    shuffle_buffer=10_000,
    multi_label=False,
):
    """tf.data pipeline: parallel reads and parsing, shuffling, augmentation, batching, prefetch.

    Yields (uint8 images [b, input_size, input_size, 3], one-hot float labels [b, classes],
    multi-hot with ``multi_label``); for training, endlessly. ``count``: the number of
    examples in ``files``, when known.
    """
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=autotune)
    if count is not None:  # known length: Keras ends each pass cleanly instead of running out of data
        ds = ds.apply(tf.data.experimental.assert_cardinality(count))
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    multi_hot = num_classes if multi_label else None
    ds = ds.map(lambda s: parse_example(s, image_size, multi_hot), num_parallel_calls=autotune)
    if input_size != image_size:
        ds = ds.map(
            lambda x, y: (
                tf.cast(tf.round(tf.image.resize(x, [input_size] * 2, antialias=True)), tf.uint8),
                y,
            ),
            num_parallel_calls=autotune,
        )
    ds = ds.batch(batch_size)
    if training and augment:
        augmenter = _augmenter(augment, seed)
        ds = ds.map(
            lambda x, y: (
                tf.cast(
                    tf.clip_by_value(tf.round(augmenter(tf.cast(x, tf.float32), training=True)), 0, 255),
                    tf.uint8,
                ),
                y,
            ),
            num_parallel_calls=autotune,
        )
    if not multi_label:  # (a multi-label set is parsed multi-hot)
        ds = ds.map(lambda x, y: (x, tf.one_hot(y, num_classes)), num_parallel_calls=autotune)
    return ds.prefetch(autotune)


def _augmenter(names, seed: int) -> keras.Sequential:
    import keras

    layers = {
        "flip": lambda: keras.layers.RandomFlip("horizontal", seed=seed),
        "rotate": lambda: keras.layers.RandomRotation(0.08, fill_mode="nearest", seed=seed),
        "zoom": lambda: keras.layers.RandomZoom(0.1, fill_mode="nearest", seed=seed),
        "contrast": lambda: keras.layers.RandomContrast(0.2, value_range=(0, 255), seed=seed),
    }
    return keras.Sequential([layers[name]() for name in names], name="augment")


# The layers with_new_head adds before the classifier (train's --freeze_base trains them with it).
HEAD_POOL, HEAD_DROPOUT = "head_pool", "head_dropout"


def with_new_head(
    model: keras.Model, classifier_layer: str, num_classes: int, multi_label: bool = False
) -> keras.Model:
    """The network up to its classifier's input, then a new classifier for ``num_classes``.

    The head ends in ``head_activation(multi_label)``: sigmoid scores each
    class on its own for a multi-label model.

    The new classifier keeps the name of the classifier it replaces
    (``classifier_layer``), so the embedding rule (the classifier's input)
    still holds for the result.
    """
    import keras

    features = model.get_layer(classifier_layer).input
    earlier = features._keras_history.operation  # a head this function put on before: replaced whole
    if earlier.name == HEAD_DROPOUT:
        features = earlier.input
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D(name=HEAD_POOL)(features)
    features = keras.layers.Dropout(0.2, name=HEAD_DROPOUT)(features)
    activation = head_activation(multi_label)
    outputs = keras.layers.Dense(num_classes, activation=activation, name=classifier_layer)(features)
    return keras.Model(model.inputs, outputs, name=model.name)


def build_model(
    config, num_classes: int, input_size: int, multi_label: bool = False
) -> tuple[keras.Model, list[str]]:
    """The model to train and the names of its new (head) layers, per ``config.weights``.

    A multi-label model ends in a new sigmoid head (``with_new_head``) whatever it starts from.
    """
    weights = config.weights
    if weights not in ("none", "imagenet") and artifact_exists(weights):
        artifact = load_artifact(weights)
        manifest = artifact.manifest
        if manifest.architecture != config.architecture or manifest.input_size != input_size:
            raise ModelError(
                f"--weights {weights}: that artifact is {manifest.architecture} at "
                f"{manifest.input_size}px; this run trains {config.architecture} at {input_size}px"
            )
        if manifest.classifier_layer is None:
            raise ModelError(
                f"--weights {weights}: an imported {manifest.origin.get('format')} hides its layers "
                "behind its signature, so no new head can go on it"
            )
        head = [manifest.classifier_layer, HEAD_POOL, HEAD_DROPOUT]
        # load_artifact builds a new model; a single-label artifact warm-starts a multi-label one too
        return with_new_head(artifact.model, manifest.classifier_layer, num_classes, multi_label), head
    spec = get_spec(config.architecture)
    classifier = spec.classifier_layer
    head = [classifier, HEAD_POOL, HEAD_DROPOUT]
    if weights == "none":
        model = create_model(spec.name, num_classes, input_size)
        return (with_new_head(model, classifier, num_classes, multi_label=True) if multi_label else model), []
    if weights == "imagenet":
        base = create_model(spec.name, IMAGENET_CLASSES, input_size, "imagenet")
        return with_new_head(base, classifier, num_classes, multi_label), head
    model = create_model(spec.name, num_classes, input_size, weights)
    if multi_label:
        return with_new_head(model, classifier, num_classes, multi_label=True), head
    return model, []


def prepare_for_training(model: keras.Model, head_layers: list[str], freeze_base: bool) -> None:
    """Freezes all but the head if asked; sets BatchNorm momentum for small data."""
    import keras

    for layer in model.layers:
        if freeze_base and head_layers:
            layer.trainable = layer.name in head_layers
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = min(layer.momentum, BATCHNORM_MOMENTUM)


def compile_model(
    model: keras.Model,
    config,
    num_classes: int,
    total_steps: int,
    warmup_steps: int,
    multi_label: bool = False,
) -> None:
    """Compiles ``model`` for ``config``'s optimizer, label smoothing and weight average.

    The learning rate follows a warm-up + cosine schedule.

    One label per image: categorical cross-entropy, accuracy (and top-5 beyond 5 classes).
    Multi-label: binary cross-entropy, micro F1 at 0.5 (``f1``), ROC AUC and binary accuracy.
    """
    import keras

    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=config.learning_rate,
        warmup_steps=warmup_steps,
    )
    # Keras keeps the weights' exponential moving average in the optimizer (Polyak averaging).
    average = {"use_ema": True, "ema_momentum": config.ema_momentum} if config.ema_momentum else {}
    optimizer = {
        "adam": lambda: keras.optimizers.Adam(schedule, **average),
        "sgd": lambda: keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True, **average),
        "rmsprop": lambda: keras.optimizers.RMSprop(schedule, **average),
    }[config.optimizer]()
    if multi_label:
        loss = keras.losses.BinaryCrossentropy(label_smoothing=config.label_smoothing)
        metrics = [
            keras.metrics.F1Score(average="micro", threshold=DEFAULT_THRESHOLD, name="f1"),
            keras.metrics.AUC(multi_label=True, num_labels=num_classes, name="auc"),
            keras.metrics.BinaryAccuracy(name="binary_accuracy"),
        ]
    else:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
        metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
        if num_classes > 5:
            metrics.append(keras.metrics.TopKCategoricalAccuracy(5, name="top5_accuracy"))
    model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=metrics,
        jit_compile=False,  # XLA is slower than the default kernels on CPU hosts
    )
    # The optimizer's slots (SGD's momenta, Adam's moments) now, as BackupAndRestore does on a
    # resume: Keras would otherwise create them while tracing the train step, and a tf.function
    # that creates variables on its first trace traces again without them (two traces of the
    # whole forward and backward pass). The same variables, in the same order, zero either way.
    model.optimizer.build(model.trainable_variables)


def epoch_line(
    title: str, epoch: int, epochs: int, logs: dict[str, float], seconds: float, left: float
) -> str:
    """``train epoch 3/20: loss 0.4123, accuracy 0.8810, val_loss ..., val_accuracy ... (12.3s, 03:27 left)``.

    Training metrics come first, then validation ones, each in Keras's name.
    ``left``: seconds that the epochs still to run would take at this pace (none shown at 0).
    """
    from tqdm import tqdm

    def order(name: str) -> tuple:
        return name.startswith("val_"), name.removeprefix("val_") != "loss", name

    names = sorted(logs, key=order)
    metrics = ", ".join(f"{name} {logs[name]:.4f}" for name in names if name != "learning_rate")
    pace = f"{seconds:.1f}s" + (f", {tqdm.format_interval(left)} left" if left > 0 else "")
    return f"{title} epoch {epoch + 1}/{epochs}: {metrics} ({pace})"


def chance_accuracy(labels: list[str], support: dict[str, int]) -> float:
    """The accuracy of the best constant guess: the most frequent class's share (at least 1/classes)."""
    total = sum(support.values())
    if not total:
        return 1.0 / len(labels)
    return max(1.0 / len(labels), max(support.values()) / total)


def evaluate(model: keras.Model, dataset, labels: list[str]) -> dict[str, Any]:
    """Metrics of ``model`` on a (non-repeating) dataset of (images, one-hot labels)."""
    y_true, ranked = [], []
    k = min(5, len(labels))
    for images, onehot in dataset:
        probabilities = model.predict_on_batch(images)
        ranked.append(np.argsort(-probabilities, axis=1, kind="stable")[:, :k])
        y_true.append(np.argmax(onehot.numpy(), axis=1))
    if not y_true:
        return classification_metrics(np.zeros(0), np.zeros((0, k)), labels)
    return classification_metrics(np.concatenate(y_true), np.concatenate(ranked), labels)


def predict_scores(model: keras.Model, dataset, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(truth [n, classes], scores [n, classes]) of ``model`` on a (non-repeating) dataset."""
    truth, scores = [np.zeros((0, num_classes))], [np.zeros((0, num_classes))]
    for images, hot in dataset:
        scores.append(np.asarray(model.predict_on_batch(images)))
        truth.append(hot.numpy())
    return np.concatenate(truth), np.concatenate(scores)


def evaluate_multilabel(
    model: keras.Model, dataset, labels: list[str], thresholds: dict[str, float]
) -> dict[str, Any]:
    """Multi-label metrics of ``model`` on a dataset of (images, multi-hot labels), at ``thresholds``.

    Adds ``chance_micro_f1``: the micro F1 of predicting every label for every image.
    """
    truth, scores = predict_scores(model, dataset, len(labels))
    cut = np.array([thresholds[label] for label in labels])
    metrics = multilabel_metrics(truth, scores >= cut, scores, labels)
    everything = multilabel_metrics(truth, np.ones_like(truth), None, labels)["micro_f1"]
    return {"chance_micro_f1": everything, **metrics}


def class_weights(mode: str, labels: list[str], counts: dict[str, int]) -> dict[int, float] | None:
    """Keras's ``class_weight`` for ``mode``: None for none; balanced, scikit-learn's n / (k * count_c).

    ``counts``: training images per class name. Classes with no training image get weight 1
    (no example carries it). Balanced weights make each class weigh the same in the loss,
    so that a rare class is not traded away for the frequent ones.
    """
    if mode == "none":
        return None
    present = [counts.get(name, 0) for name in labels]
    total, classes = sum(present), sum(1 for count in present if count)
    return {i: total / (classes * count) if count else 1.0 for i, count in enumerate(present)}


# Default batch size: the largest power of two giving an epoch at least this many steps, in these bounds.
STEPS_PER_EPOCH_AT_LEAST, BATCH_SIZES = 16, (16, 64)


def batch_size_for(train_images: int) -> int:
    """train's default batch size for a training split of ``train_images``: 16 up to 511, then 32, then 64.

    At 64 a few hundred images make 3 steps an epoch: 60 updates in 20 epochs
    left mobilenet_v2 from scratch at 32% on 7 photo classes (benchmarks/small_data.py).
    From 1,024 images on it is 64, as before.
    """
    low, high = BATCH_SIZES
    fitting = 2 ** max(0, math.floor(math.log2(max(train_images, 1) / STEPS_PER_EPOCH_AT_LEAST)))
    return int(min(high, max(low, fitting)))


def steps_for(count: int, batch_size: int) -> int:
    return max(1, math.ceil(count / batch_size))
