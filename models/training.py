"""Keras training of a registered architecture on ``prepare`` output.

Plain functions used by ``beamvision train``: dataset loading with tf.data,
model construction for each starting point (random, ImageNet, an existing
artifact, a weights file), the fit itself (warm-up + cosine learning rate,
early stopping with the best weights restored, checkpoints that let an
interrupted run resume), and evaluation on the test split.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from typing import Any

import keras
import numpy as np

from beamvision import console, storage
from beamvision.models.artifact import MANIFEST_FILE, load_artifact
from beamvision.models.dataset import LABELS_FILE, STATS_FILE, parse_example
from beamvision.models.errors import ModelError
from beamvision.models.metrics import classification_metrics
from beamvision.models.registry import IMAGENET_CLASSES, ArchitectureSpec, create_model, get_spec

# Keras applications use BatchNorm momentum up to 0.999: on a small dataset
# (a few hundred steps) the moving statistics never catch up with the weights
# and inference-mode accuracy collapses. 0.9 tracks them within ~20 steps.
BATCHNORM_MOMENTUM = 0.9
HISTORY_FILE = "history.json"  # beside a checkpoint: the metrics of the epochs it has done
BEST_WEIGHTS_FILE = "best.weights.npz"  # beside a checkpoint: the weights of the best epoch so far
# What keras.callbacks.BackupAndRestore writes: the epoch's weights, then the epochs done.
KERAS_WEIGHTS, KERAS_METADATA = "latest.weights.h5", "training_metadata.json"


def evaluation_split(totals: dict[str, int]) -> str:
    """The split a trained model is scored on: test, else val, else train (for tiny datasets)."""
    return next((split for split in ("test", "val") if totals[split]), "train")


def read_dataset_info(prefix: str) -> tuple[list[str], dict[str, Any]]:
    """labels.json and stats.json of a prepared dataset.

    Raises:
        ModelError: when ``prefix`` holds no prepared dataset.
    """
    labels_uri, stats_uri = storage.join(prefix, LABELS_FILE), storage.join(prefix, STATS_FILE)
    if not storage.exists(labels_uri) or not storage.exists(stats_uri):
        raise ModelError(f"no prepared dataset at {prefix} (labels.json and stats.json not found)")
    labels = json.loads(storage.read_text(labels_uri))
    stats = json.loads(storage.read_text(stats_uri))
    if len(labels) < 2:
        raise ModelError(f"the dataset at {prefix} has {len(labels)} class; training needs at least 2")
    return labels, stats


def local_shards(prefix: str, split: str, cache_dir: str) -> list[str]:
    """Local paths of a split's TFRecord shards, copied from remote storage if needed."""
    from apache_beam.io.filesystems import FileSystems

    matches = FileSystems.match([storage.join(prefix, f"{split}-*.tfrecord")])[0].metadata_list
    paths = sorted(m.path for m in matches)
    if FileSystems.get_scheme(prefix) is None:
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
    from apache_beam.io.filesystems import FileSystems

    matches = FileSystems.match([storage.join(prefix, "*.tfrecord")])[0].metadata_list
    shards = sorted((os.path.basename(m.path), m.size_in_bytes) for m in matches)
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
):
    """tf.data pipeline: parallel reads and parsing, shuffling, augmentation, batching, prefetch.

    Yields (uint8 images [b, input_size, input_size, 3], one-hot float labels [b, classes]);
    for training, endlessly. ``count``: the number of examples in ``files``, when known.
    """
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=autotune)
    if count is not None:  # known length: Keras ends each pass cleanly instead of running out of data
        ds = ds.apply(tf.data.experimental.assert_cardinality(count))
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.map(lambda s: parse_example(s, image_size), num_parallel_calls=autotune)
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
    ds = ds.map(lambda x, y: (x, tf.one_hot(y, num_classes)), num_parallel_calls=autotune)
    return ds.prefetch(autotune)


def _augmenter(names, seed: int) -> keras.Sequential:
    layers = {
        "flip": lambda: keras.layers.RandomFlip("horizontal", seed=seed),
        "rotate": lambda: keras.layers.RandomRotation(0.08, fill_mode="nearest", seed=seed),
        "zoom": lambda: keras.layers.RandomZoom(0.1, fill_mode="nearest", seed=seed),
        "contrast": lambda: keras.layers.RandomContrast(0.2, value_range=(0, 255), seed=seed),
    }
    return keras.Sequential([layers[name]() for name in names], name="augment")


def with_new_head(model: keras.Model, spec: ArchitectureSpec, num_classes: int) -> keras.Model:
    """The network up to its classifier's input, then a new classifier for ``num_classes``.

    The new classifier keeps the architecture's classifier layer name, so the
    embedding rule (the classifier's input) still holds for the result.
    """
    features = model.get_layer(spec.classifier_layer).input
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D(name="head_pool")(features)
    features = keras.layers.Dropout(0.2, name="head_dropout")(features)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name=spec.classifier_layer)(features)
    return keras.Model(model.inputs, outputs, name=model.name)


def build_model(config, num_classes: int, input_size: int) -> tuple[keras.Model, list[str]]:
    """The model to train and the names of its new (head) layers, per ``config.weights``."""
    spec = get_spec(config.architecture)
    weights = config.weights
    head = [spec.classifier_layer, "head_pool", "head_dropout"]
    if weights == "none":
        return create_model(spec.name, num_classes, input_size), []
    if weights == "imagenet":
        base = create_model(spec.name, IMAGENET_CLASSES, input_size, "imagenet")
        return with_new_head(base, spec, num_classes), head
    if storage.exists(storage.join(weights, MANIFEST_FILE)):
        artifact = load_artifact(weights)
        if artifact.manifest.architecture != spec.name or artifact.manifest.input_size != input_size:
            raise ModelError(
                f"--weights {weights}: that artifact is {artifact.manifest.architecture} at "
                f"{artifact.manifest.input_size}px; this run trains {spec.name} at {input_size}px"
            )
        return with_new_head(artifact.model, spec, num_classes), head  # load_artifact builds a new model
    return create_model(spec.name, num_classes, input_size, weights), []


def prepare_for_training(model: keras.Model, head_layers: list[str], freeze_base: bool) -> None:
    """Freezes all but the head if asked; sets BatchNorm momentum for small data."""
    for layer in model.layers:
        if freeze_base and head_layers:
            layer.trainable = layer.name in head_layers
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = min(layer.momentum, BATCHNORM_MOMENTUM)


def compile_model(model: keras.Model, config, num_classes: int, total_steps: int, warmup_steps: int) -> None:
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=config.learning_rate,
        warmup_steps=warmup_steps,
    )
    optimizer = {
        "adam": lambda: keras.optimizers.Adam(schedule),
        "sgd": lambda: keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True),
        "rmsprop": lambda: keras.optimizers.RMSprop(schedule),
    }[config.optimizer]()
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(5, name="top5_accuracy"))
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=metrics,
        jit_compile=False,  # XLA is slower than the default kernels on CPU hosts
    )


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


class EpochProgress(keras.callbacks.Callback):
    """One line per epoch on stdout (``epoch_line``), printed once the epoch's checkpoint is kept.

    On a terminal, a bar of the epoch's steps shows on stderr meanwhile and
    is cleared when the epoch ends; a log file gets only the lines. The time
    left is for the planned ``epochs``, at the pace of the epochs after the
    first (which also traces the model): early stopping may end sooner.
    """

    def __init__(self, title: str, epochs: int, steps: int, bar: bool, until: int | None = None):
        super().__init__()
        self._title, self._epochs, self._steps, self._show_bar = title, epochs, steps, bar
        self._until = until or epochs  # a paused run (a tune rung) stops there: its time left is to there
        self._seconds: list[float] = []
        self._bar = None

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.monotonic()
        if self._show_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self._steps,
                desc=f"{self._title} epoch {epoch + 1}/{self._epochs}",
                unit=" steps",
                leave=False,
                file=console.terminal(),
            )

    def on_train_batch_end(self, batch, logs=None):
        if self._bar is not None:
            if logs and "loss" in logs:
                self._bar.set_postfix_str(f"loss {float(logs['loss']):.4f}", refresh=False)
            self._bar.update(1)

    def on_epoch_end(self, epoch, logs=None):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._seconds.append(time.monotonic() - self._started)
        paced = self._seconds[1:] or self._seconds  # the first epoch also builds and traces the model
        left = sum(paced) / len(paced) * max(self._until - epoch - 1, 0)
        values = {name: float(value) for name, value in (logs or {}).items()}
        print(epoch_line(self._title, epoch, self._epochs, values, self._seconds[-1], left), flush=True)


class CalibrateBatchNorm(keras.callbacks.Callback):
    """Re-estimates BatchNorm statistics on training batches before each validation and at the end.

    Trained from scratch on a small set, the weights move faster than the
    moving averages follow them: inference-mode outputs lag training-mode
    ones by epochs, validation accuracy sits at chance while training
    accuracy climbs, and early stopping picks the wrong epoch. Averaging the
    batch statistics of ``batches`` forward passes with the current weights
    ("precise BN") makes inference mode see what training sees. BatchNorm
    layers that are frozen keep their statistics.
    """

    def __init__(self, dataset, batches: int):
        super().__init__()
        self._dataset = dataset
        self._batches = batches
        self._forwards = {}  # one traced forward pass per set of layers calibrated

    def on_test_begin(self, logs=None):
        self.calibrate()

    def on_train_end(self, logs=None):
        self.calibrate()

    def calibrate(self) -> None:
        import tensorflow as tf

        layers = [
            layer
            for layer in self.model._flatten_layers()
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
        ]
        if not layers:
            return
        momenta = [layer.momentum for layer in layers]
        try:
            for layer in layers:  # each forward pass leaves exactly its batch's statistics
                layer.momentum = 0.0
            key = tuple(id(layer) for layer in layers)  # traced with these layers trainable, momentum 0
            if key not in self._forwards:  # (the train step was traced before, with its own momentum)
                self._forwards[key] = tf.function(lambda images: self.model(images, training=True))
            forward = self._forwards[key]
            sums = [
                [np.zeros(layer.moving_mean.shape), np.zeros(layer.moving_variance.shape)] for layer in layers
            ]
            batches = 0
            for images, _ in self._dataset.take(self._batches):
                forward(images)
                for total, layer in zip(sums, layers, strict=True):
                    total[0] += keras.ops.convert_to_numpy(layer.moving_mean)
                    total[1] += keras.ops.convert_to_numpy(layer.moving_variance)
                batches += 1
            if not batches:
                return  # no training batch: the statistics stay as they were
            for (mean, variance), layer in zip(sums, layers, strict=True):
                layer.moving_mean.assign(mean / batches)
                layer.moving_variance.assign(variance / batches)
        finally:
            for layer, momentum in zip(layers, momenta, strict=True):
                layer.momentum = momentum


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras's early stopping, which a resumed run continues instead of starting over.

    Keras forgets its best value, its patience count and its best weights at
    each ``fit``; a resumed run (after a kill, or at tune's next rung) would
    then restore only the best of its own epochs. This one takes them from
    the epochs the checkpoint has done (``history``) and keeps the best
    weights beside the checkpoint, in ``directory``, whenever they improve.
    """

    def __init__(self, directory: str, history: dict[str, list[float]], monitor: str, **kwargs):
        mode = "min" if monitor.endswith("loss") else "max"  # explicit: resuming needs the direction
        super().__init__(monitor=monitor, mode=mode, **kwargs)
        self._path = os.path.join(directory, BEST_WEIGHTS_FILE)
        self._history = history

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        values = self._history.get(self.monitor, [])
        if not values:
            return
        self.best = (max if self.mode == "max" else min)(values)
        self.best_epoch = values.index(self.best)  # Keras counts only strict improvements
        self.wait = len(values) - 1 - self.best_epoch
        if self.restore_best_weights and os.path.exists(self._path):
            with np.load(self._path) as saved:
                self.best_weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.restore_best_weights and self.best_epoch == epoch and self.best_weights is not None:
            with open(self._path + ".tmp", "wb") as f:
                np.savez(f, *self.best_weights)
            os.replace(self._path + ".tmp", self._path)


def chance_accuracy(labels: list[str], support: dict[str, int]) -> float:
    """The accuracy of the best constant guess: the most frequent class's share (at least 1/classes)."""
    total = sum(support.values())
    if not total:
        return 1.0 / len(labels)
    return max(1.0 / len(labels), max(support.values()) / total)


def checkpoint_root(output: str) -> str:
    """Where resumable checkpoints of runs writing ``output`` are kept: beside it, in its storage.

    A local output's is absolute (a relative one would move with the working
    directory); an output at a bucket's root keeps them inside it.
    """
    from apache_beam.io.filesystems import FileSystems

    output = output.rstrip("/")
    if FileSystems.get_scheme(output) is None:
        return os.path.abspath(output) + ".checkpoints"
    if output.split("://", 1)[1].count("/") == 0:  # gs://bucket: not gs://bucket.checkpoints
        return storage.join(output, ".checkpoints")
    return output + ".checkpoints"


def checkpoint_dir(output: str, config: dict[str, Any]) -> str:
    """Checkpoints of the run that writes ``output`` with exactly ``config``.

    ``config`` is whatever shapes the weights (flags, input size, a dataset
    fingerprint). A rerun with the same one resumes where the interrupted run
    stopped; a run with another starts afresh in a directory of its own,
    never from the other run's weights.
    """
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return storage.join(checkpoint_root(output), key)


def local_checkpoint_dir(checkpoint: str) -> str:
    """The local directory Keras writes ``checkpoint`` in: itself, or a working copy of a remote one."""
    from apache_beam.io.filesystems import FileSystems

    if FileSystems.get_scheme(checkpoint) is None:
        return checkpoint
    key = hashlib.sha256(checkpoint.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "beamvision-checkpoints", key)


def restore_checkpoint(checkpoint: str) -> tuple[str, dict[str, list[float]]]:
    """The local directory of ``checkpoint`` (fetched first when remote) and the history it holds.

    The history is that of the epochs the checkpoint has done (empty for a
    new run), so a resumed run reports every epoch, not only those after it.
    """
    local = local_checkpoint_dir(checkpoint)
    if local != checkpoint:  # the working copy mirrors the remote one exactly, even when it has none
        shutil.rmtree(local, ignore_errors=True)
        for uri in storage.list_files(checkpoint):
            target = os.path.join(local, uri[len(checkpoint.rstrip("/")) + 1 :])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            storage.download(uri, target)
    paths = {name: os.path.join(local, name) for name in (HISTORY_FILE, KERAS_METADATA, KERAS_WEIGHTS)}
    if not all(os.path.exists(path) for path in paths.values()):
        # Keras would resume at the metadata's epoch even without weights: start afresh instead.
        shutil.rmtree(local, ignore_errors=True)
        return local, {}
    with open(paths[KERAS_METADATA]) as f:
        epochs_done = int(json.load(f)["epoch"])  # Keras records the number of epochs done
    with open(paths[HISTORY_FILE]) as f:
        return local, {k: v[:epochs_done] for k, v in json.load(f).items()}


class KeepCheckpoint(keras.callbacks.Callback):
    """After ``BackupAndRestore`` saves an epoch: the history so far beside it, and a copy in remote storage.

    Keras checkpoints to a local directory; when the run's output is remote
    (``gs://``), each epoch's checkpoint is copied there too, so a run resumes
    on any machine (a preempted worker, the next rung of a tune).
    """

    def __init__(self, checkpoint: str, local: str, history: dict[str, list[float]]):
        super().__init__()
        self._remote = None if checkpoint == local else checkpoint
        self._local = local
        self.history = {k: list(v) for k, v in history.items()}

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(round(float(value), 5))
        path = os.path.join(self._local, HISTORY_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(self.history, f)
        os.replace(path + ".tmp", path)
        if self._remote:  # the epochs-done record last: a copy cut short is not taken for a checkpoint
            names = sorted(n for n in os.listdir(self._local) if not n.endswith((".tmp", ".bkp")))
            for name in sorted(names, key=lambda n: n == KERAS_METADATA):
                path = os.path.join(self._local, name)
                storage.write_atomic(storage.join(self._remote, name), local_path=path)


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


def steps_for(count: int, batch_size: int) -> int:
    return max(1, math.ceil(count / batch_size))
