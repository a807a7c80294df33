"""The Keras callbacks of a training run: progress lines, precise BatchNorm, resumable early stopping.

``EpochProgress`` prints one line per epoch; ``CalibrateBatchNorm``
re-estimates BatchNorm statistics before each validation;
``ResumableEarlyStopping`` and ``KeepCheckpoint`` carry early stopping and the
checkpoint across interrupted runs and tune's rungs (``checkpoints``). The
classes subclass Keras's, so this module imports Keras when it loads: only
the training step (``trainer``) imports it, once a run starts.
"""

from __future__ import annotations

import json
import os
import time

import keras
import numpy as np

from beamvision import console, storage
from beamvision.models.checkpoints import BEST_WEIGHTS_FILE, HISTORY_FILE, KERAS_METADATA
from beamvision.models.training import epoch_line


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
