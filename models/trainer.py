"""One training run: ``train(config)`` for a ``TrainConfig`` (``beamvision.models.train_config``).

``train(config)`` reads the prepared data, builds and fits the model
(BatchNorm statistics re-estimated before each validation, checkpoints so an
interrupted run resumes, early stopping with the best weights restored),
evaluates it on the test split and exports the artifact, with the training
config, the dataset fingerprint and the metrics in its manifest and
metrics.json beside it. On multi-label data (stats.json's ``multi_label``,
from ``prepare --multi_label``) the model gets a sigmoid head and binary
cross-entropy, each class's threshold is chosen on the validation split
(``choose_thresholds``) and kept in the manifest, and the test split is scored
at those thresholds (``multilabel_metrics``: micro and macro F1, mAP, ...).
With ``pause_after`` it stops after that many epochs and keeps its checkpoint
instead (tune's rungs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from beamvision import console, exits, storage
from beamvision.console import counted
from beamvision.models.artifact import (
    IMPORTED,
    Manifest,
    load_manifest,
    new_manifest,
    save_artifact,
)
from beamvision.models.checkpoints import checkpoint_dir, checkpoint_root, restore_checkpoint
from beamvision.models.dataset import classes_missing_from_splits, missing_split_warnings
from beamvision.models.errors import ModelArgumentError, ModelError
from beamvision.models.metrics import DEFAULT_THRESHOLD, choose_thresholds, save_training_curves_png
from beamvision.models.registry import get_spec, head_activation, imagenet_weights_cached
from beamvision.models.small_inputs import final_side
from beamvision.models.train_config import TrainConfig, resolve_monitor
from beamvision.models.training import (
    batch_size_for,
    build_model,
    chance_accuracy,
    class_weights,
    compile_model,
    dataset_fingerprint,
    evaluate,
    evaluate_multilabel,
    evaluation_split,
    local_shards,
    make_dataset,
    predict_scores,
    prepare_for_training,
    read_dataset_info,
    steps_for,
)

if TYPE_CHECKING:  # Keras is imported once a run starts
    import keras

METRICS_FILE = "metrics.json"
CURVES_FILE = "training-curves.png"
# A final accuracy that closes at most this share of the gap from chance (the most
# frequent class's share) to 100% gets a warning, and near_chance in metrics.json.
NEAR_CHANCE = 0.25

# The files of engines to store beside a model: (model, manifest, engines, folder) -> name -> local path
# (``beamvision.transforms.engines.engine_files``, which the commands pass in).
EngineFiles = Callable[["keras.Model", Manifest, tuple[str, ...], str], dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one training run did.

    Attributes:
        history: every epoch's metrics (``loss``, ``val_accuracy``, ...), resumed epochs included.
        epochs_run: epochs done, resumed ones included.
        seconds: wall time of this call.
        manifest: the exported artifact's manifest; None when the run paused.
        paused: the run stopped at ``pause_after`` epochs, its checkpoint kept for a later call.
    """

    history: dict[str, list[float]]
    epochs_run: int
    seconds: float
    manifest: Manifest | None = None

    @property
    def paused(self) -> bool:
        return self.manifest is None


@dataclasses.dataclass(frozen=True)
class _Data:
    """The prepared dataset a run trains on."""

    labels: list[str]
    stats: dict[str, Any]
    input_size: int
    fingerprint: str

    @property
    def multi_label(self) -> bool:
        return bool(self.stats.get("multi_label"))

    @property
    def image_size(self) -> int:
        return self.stats["image_size"]

    @property
    def totals(self) -> dict[str, int]:
        return self.stats["totals"]


@dataclasses.dataclass(frozen=True)
class _Fitted:
    """What the fit left: its history, and where its checkpoint is (remote, and its local copy)."""

    history: dict[str, list[float]]
    paused: bool
    checkpoint: str
    local: str

    @property
    def epochs_run(self) -> int:
        return len(self.history.get("loss", []))


def train(
    config: TrainConfig,
    pause_after: int | None = None,
    extra: dict | None = None,
    title: str = "train",
    engine_files: EngineFiles | None = None,
) -> Outcome:
    """Trains ``config``, evaluates and exports its artifact; prints per-epoch progress and a summary.

    With ``pause_after``, the run stops after that many epochs (resumed ones
    included) unless early stopping ends it first, keeps its checkpoint and
    exports nothing: a later call with the same config goes on from there
    (``beamvision tune``'s rungs). ``extra`` joins the manifest's ``training``
    record; ``title`` begins each epoch's line (``train epoch 3/20: ...``);
    ``engine_files`` makes the files of ``config.engines`` to store beside the model.

    Raises:
        ModelError: the data cannot train this config.
    """
    import keras

    data = _read_data(config)
    config = dataclasses.replace(config, monitor=resolve_monitor(config.monitor, data.multi_label))
    if config.batch_size is None:
        config = dataclasses.replace(config, batch_size=batch_size_for(data.totals["train"]))
    started = time.monotonic()
    keras.utils.set_random_seed(config.seed)
    model, head = build_model(config, len(data.labels), data.input_size, data.multi_label)
    prepare_for_training(model, head, config.freeze_base)
    with tempfile.TemporaryDirectory() as cache:
        shards = {
            split: local_shards(config.data, split, os.path.join(cache, split)) for split in data.totals
        }
        fitted = _fit(model, config, data, shards, pause_after, title)
        if fitted.paused:
            return Outcome(fitted.history, fitted.epochs_run, time.monotonic() - started)
        evaluated_on = evaluation_split(data.totals)
        thresholds = _thresholds(model, config, data, shards) if data.multi_label else {}
        scored = _dataset(config, data, shards, evaluated_on, training=False)
        if data.multi_label:
            metrics = _multilabel_near_chance(evaluate_multilabel(model, scored, data.labels, thresholds))
            metrics = {"evaluated_on": evaluated_on, "thresholds": thresholds, **metrics}
        else:
            metrics = _with_chance(evaluate(model, scored, data.labels), data.labels, evaluated_on)
    seconds = time.monotonic() - started
    training = {
        "config": config.to_dict(),
        "input_size": data.input_size,
        "epochs_run": fitted.epochs_run,
        "history": fitted.history,
        "seconds": round(seconds, 1),
        "dataset": {
            "prefix": config.data,
            "fingerprint": data.fingerprint,
            "image_size": data.image_size,
            "totals": data.totals,
        },
        **(extra or {}),
    }
    manifest = _export(model, config, data.labels, training, metrics, engine_files, thresholds)
    # Only now: an export that fails leaves the checkpoint, and a rerun resumes from it.
    storage.delete_tree(checkpoint_root(config.output))
    exits.on_interrupt(lambda: f"the trained artifact is complete in {config.output}")
    if fitted.local != fitted.checkpoint:
        shutil.rmtree(fitted.local, ignore_errors=True)
    _print_trained(config, manifest, metrics, seconds, fitted.epochs_run, len(data.labels))
    return Outcome(fitted.history, fitted.epochs_run, seconds, manifest)


def _thresholds(model: keras.Model, config: TrainConfig, data: _Data, shards) -> dict[str, float]:
    """Each class's threshold, chosen on the validation split (``DEFAULT_THRESHOLD`` without one)."""
    if not data.totals["val"]:
        return {label: DEFAULT_THRESHOLD for label in data.labels}
    validation = _dataset(config, data, shards, "val", training=False)
    return choose_thresholds(*predict_scores(model, validation, len(data.labels)), data.labels)


def _read_data(config: TrainConfig) -> _Data:
    """The prepared dataset, checked against the config; warns of classes with no training image."""
    labels, stats = read_dataset_info(config.data)
    image_size = stats["image_size"]
    if stats.get("multi_label") and config.class_weight != "none":
        raise ModelError(
            f"--class_weight {config.class_weight}: not for multi-label data (--data {config.data}); "
            "an image with several labels has no one class to weigh it by"
        )
    if stats["totals"]["train"] == 0:
        raise ModelError(f"--data {config.data}: the training split is empty")
    if config.input_size is None and config.architecture != IMPORTED:  # the prepared size: same rules
        try:
            get_spec(config.architecture).check_arguments(input_size=image_size, weights=config.weights)
        except ModelArgumentError as exc:
            raise ModelError(
                f"--data {config.data}: its images are {image_size}px, and {exc.reason} "
                "(pass --input_size to resize them, or prepare with --image_size)"
            ) from None
    empty = [name for name in labels if not stats["counts"]["train"].get(name)]
    if empty:
        print(
            f"WARNING: --data {config.data}: {len(empty)} of {len(labels)} classes have no training "
            f"images ({', '.join(empty[:10])}); the model will never predict them",
            file=sys.stderr,
        )
    held_out = [split for split in ("val", "test") if stats["totals"].get(split)]  # (0: not asked for)
    for warning in missing_split_warnings(classes_missing_from_splits(labels, stats["counts"]), held_out):
        print(f"{warning.replace('WARNING: ', f'WARNING: --data {config.data}: ', 1)}", file=sys.stderr)
    fingerprint = dataset_fingerprint(config.data, labels, stats)
    return _Data(labels, stats, config.input_size or image_size, fingerprint)


def _dataset(config: TrainConfig, data: _Data, shards: dict[str, list[str]], split: str, training: bool):
    """A split's tf.data pipeline at the run's input size (augmented when training)."""
    return make_dataset(
        shards[split],
        data.image_size,
        data.input_size,
        len(data.labels),
        config.batch_size,
        training,
        config.augment if training else (),
        config.seed,
        count=data.totals[split],
        multi_label=data.multi_label,
    )


def _fit(
    model: keras.Model,
    config: TrainConfig,
    data: _Data,
    shards: dict[str, list[str]],
    pause_after: int | None,
    title: str,
) -> _Fitted:
    """Compiles and fits ``model``, resuming from its checkpoint; pauses after ``pause_after`` epochs."""
    import keras

    from beamvision.models.callbacks import KeepCheckpoint, ResumableEarlyStopping

    steps = config.steps_per_epoch or steps_for(data.totals["train"], config.batch_size)
    compile_model(model, config, len(data.labels), steps * config.epochs, min(steps, 100), data.multi_label)
    # What shapes the weights: the training flags, the input size and the data (never the
    # artifact's name, version or --overwrite). A rerun with all of these equal resumes.
    resumable = {k: v for k, v in config.to_dict().items() if k not in ("name", "version", "overwrite")}
    resumable.update(input_size=data.input_size, dataset=data.fingerprint)
    checkpoint = checkpoint_dir(config.output, resumable)
    local, history_before = restore_checkpoint(checkpoint)
    epochs_before = len(next(iter(history_before.values()), []))
    if epochs_before and pause_after is None:  # (tune's rungs resume by design, and say so themselves)
        print(
            f"{title}: resuming from epoch {epochs_before + 1} of {config.epochs}: "
            f"an interrupted run's checkpoint, in {checkpoint}",
            flush=True,
        )
    pausing = pause_after is not None and pause_after < config.epochs
    callbacks = [keras.callbacks.BackupAndRestore(local, delete_checkpoint=not pausing)]
    if model.optimizer.use_ema:
        # After the checkpoint (which keeps the trained weights and their average apart, so a
        # resumed run goes on as if never stopped) and before the rest: validation, precise
        # BatchNorm, early stopping's best weights and the artifact all take the average.
        # A run that stops before its last epoch ends with the trained weights (Keras swaps the
        # average back in only at the last one): early stopping then restores its best average,
        # and it is the only callback that stops a run.
        callbacks.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    validation = _dataset(config, data, shards, "val", training=False) if data.totals["val"] else None
    early = None
    if validation is not None:
        early = ResumableEarlyStopping(
            local,
            history_before,
            monitor=config.monitor,
            patience=config.early_stopping_patience,
            restore_best_weights=True,
            # Every validation is meaningful: the warm-up ends within the first epoch
            # and BatchNorm statistics are re-estimated before each validation. (The
            # weight average lags the trained weights: that delays a stop, never hastens it.)
            start_from_epoch=0,
        )
        callbacks.append(early)
    # After the checkpoint and the best weights are saved: copies them to remote storage.
    kept = KeepCheckpoint(checkpoint, local, history_before)
    callbacks.append(kept)
    exits.on_interrupt(lambda: _checkpoint_kept(kept, config.epochs, checkpoint))
    callbacks += _reporting_callbacks(config, data, shards, steps, pause_after if pausing else None, title)
    # A user's model is one nested layer; ours show the side create_model's small-input rule kept.
    side = "" if config.architecture == IMPORTED else " (last feature map {0}x{0})".format(final_side(model))
    print(
        f"training {config.architecture} at {data.input_size}px{side} on "
        f"{counted(data.totals['train'], 'image')}, "
        f"{counted(len(data.labels), 'class', 'classes')}, {counted(config.epochs, 'epoch')} of "
        f"{counted(steps, 'step')}, weights {config.weights}",
        flush=True,
    )
    model.fit(  # the schedule spans config.epochs; a pausing run stops at pause_after
        _dataset(config, data, shards, "train", training=True),
        validation_data=validation,
        epochs=pause_after if pausing else config.epochs,
        steps_per_epoch=steps,
        callbacks=callbacks,
        class_weight=class_weights(config.class_weight, data.labels, data.stats["counts"]["train"]),
        verbose=0,  # EpochProgress's lines instead
        shuffle=False,  # the tf.data pipeline shuffles
    )
    paused = pausing and not (early and early.stopped_epoch)  # paused, not ended by early stopping
    if paused and local != checkpoint:  # the remote copy is the checkpoint; the next call fetches it
        shutil.rmtree(local, ignore_errors=True)
    return _Fitted(kept.history, paused, checkpoint, local)


def _checkpoint_kept(kept, epochs: int, checkpoint: str) -> str:
    """What an interrupted train keeps: the checkpoint of its last finished epoch, and how to resume."""
    done = len(next(iter(kept.history.values()), []))
    if not done:
        return "no epoch had ended, so no checkpoint was kept; run the same command again"
    return (
        f"kept the checkpoint after epoch {done} of {epochs} in {checkpoint}; "
        f"run the same command again to resume from epoch {done + 1}"
    )


def _reporting_callbacks(
    config: TrainConfig,
    data: _Data,
    shards: dict[str, list[str]],
    steps: int,
    pause_after: int | None,
    title: str,
) -> list:
    """The callbacks after the checkpoint's: precise BatchNorm, then each epoch's line."""
    from beamvision.models.callbacks import CalibrateBatchNorm, EpochProgress

    # After EarlyStopping, so that the restored weights get their own statistics.
    calibration = make_dataset(
        shards["train"],
        data.image_size,
        data.input_size,
        len(data.labels),
        config.batch_size,
        True,
        seed=config.seed,
        count=data.totals["train"],
        shuffle_buffer=8 * config.batch_size,
        multi_label=data.multi_label,
    )  # prepare wrote the shards in shuffled order: a small buffer mixes the classes enough
    callbacks = [CalibrateBatchNorm(calibration, min(steps, 50))]
    if not console.is_quiet():  # last: an epoch's line means its checkpoint is kept
        until = pause_after or config.epochs
        callbacks.append(EpochProgress(title, config.epochs, steps, console.is_terminal(), until))
    return callbacks


def _with_chance(metrics: dict[str, Any], labels: list[str], evaluated_on: str) -> dict[str, Any]:
    """The metrics with the split they are on, the chance accuracy and whether they are near it."""
    chance = chance_accuracy(labels, {k: v["support"] for k, v in metrics["per_class"].items()})
    near_chance = metrics["accuracy"] is not None and metrics["accuracy"] - chance <= NEAR_CHANCE * (
        1 - chance
    )
    return {"evaluated_on": evaluated_on, "chance_accuracy": chance, "near_chance": near_chance, **metrics}


def _multilabel_near_chance(metrics: dict[str, Any]) -> dict[str, Any]:
    """Multi-label metrics with ``near_chance``: micro F1 within NEAR_CHANCE of the gap from chance to 1."""
    micro, chance = metrics["micro_f1"], metrics["chance_micro_f1"]
    near = micro is not None and chance is not None and micro - chance <= NEAR_CHANCE * (1 - chance)
    return {**metrics, "near_chance": near}


def _export(
    model: keras.Model,
    config: TrainConfig,
    labels: list[str],
    training: dict[str, Any],
    metrics: dict[str, Any],
    engine_files: EngineFiles | None,
    thresholds: dict[str, float],
) -> Manifest:
    """Saves the artifact (with its engines' files) and metrics.json beside it; returns its manifest.

    ``thresholds``: a multi-label model's per-class thresholds (empty for a single-label one).
    """
    source = load_manifest(config.weights) if config.architecture == IMPORTED else None
    manifest = new_manifest(
        model,
        config.architecture,
        labels,
        "trained",
        name=config.name,
        version=config.version,
        training=training,
        metrics=metrics,
        preprocessing=source.preprocessing if source else None,
    )
    if source:  # where the model came from, and what its new head outputs
        output = head_activation(bool(thresholds))
        manifest = dataclasses.replace(manifest, origin={**source.origin, "output": output})
    if thresholds:
        manifest = dataclasses.replace(manifest, multi_label=True, thresholds=thresholds)
    with tempfile.TemporaryDirectory() as converted:
        engine_extra = engine_files(model, manifest, config.engines, converted) if engine_files else {}
        manifest = save_artifact(model, manifest, config.output, config.overwrite, extra_files=engine_extra)
    storage.write_atomic(storage.join(config.output, METRICS_FILE), json.dumps(metrics, indent=2).encode())
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, CURVES_FILE)
        save_training_curves_png(training["history"], config.monitor, png, config.architecture)
        storage.write_atomic(storage.join(config.output, CURVES_FILE), local_path=png)
    return manifest


def _print_trained(
    config: TrainConfig,
    manifest: Manifest,
    metrics: dict[str, Any],
    seconds: float,
    epochs_run: int,
    classes: int,
) -> None:
    evaluated_on = metrics["evaluated_on"]
    print(
        f"trained {config.architecture} in {seconds:.0f}s ({counted(epochs_run, 'epoch')}): "
        f"{evaluated_on} {_headline(metrics, manifest.multi_label)} "
        f"on {counted(metrics['examples'], 'image')}, "
        f"macro F1 {_score(metrics['macro_f1'])}"
    )
    print(
        f"artifact: {config.output} ({manifest.name} version {manifest.version}); metrics: "
        f"{storage.join(config.output, METRICS_FILE)}, curves: {storage.join(config.output, CURVES_FILE)}"
    )
    if metrics["near_chance"] and manifest.multi_label:
        print(
            f"WARNING: {evaluated_on} micro F1 {_score(metrics['micro_f1'])} is near chance "
            f"({_score(metrics['chance_micro_f1'])}, predicting every label for every image): "
            f"this model has not learned the task. Try {_what_to_try(config)}.",
            file=sys.stderr,
        )
    elif metrics["near_chance"]:
        print(
            f"WARNING: {evaluated_on} accuracy {metrics['accuracy']:.1%} is near chance "
            f"({metrics['chance_accuracy']:.1%}, always guessing the most frequent of {classes} classes): "
            f"this model has not learned the task. Try {_what_to_try(config)}.",
            file=sys.stderr,
        )


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _headline(metrics: dict[str, Any], multi_label: bool) -> str:
    """The summary's first measure: accuracy (and top-5); multi-label, micro F1 and mAP at its thresholds."""
    if multi_label:
        return (
            f"micro F1 {_score(metrics['micro_f1'])}, mAP {_score(metrics['mean_average_precision'])} "
            "(thresholds chosen on val)"
        )
    top5 = f", top-5 {metrics['top5_accuracy']:.1%}" if metrics.get("top5_accuracy") is not None else ""
    return f"accuracy {metrics['accuracy']:.1%}{top5}"


def _what_to_try(config: TrainConfig) -> str:
    """What may lift a model from chance, on this machine: ImageNet weights only where Keras has them."""
    tries = ["more images", "more --epochs", "a lower --learning_rate"]
    spec = None if config.architecture == IMPORTED else get_spec(config.architecture)
    if config.weights == "none" and spec and imagenet_weights_cached(spec):
        tries.insert(0, f"--weights imagenet --input_size {spec.default_input_size}")
    return ", ".join(tries[:-1]) + " or " + tries[-1]
