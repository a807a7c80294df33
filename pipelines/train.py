"""``beamvision train``: prepared TFRecords to a trained, evaluated, versioned model artifact.

    beamvision train --data gs://bucket/data/flowers --architecture mobilenet_v2 --output gs://bucket/models/f1

Trains with validation each epoch (BatchNorm statistics re-estimated first,
so validation sees what the weights have learned), keeps checkpoints so an
interrupted run resumes where it stopped, stops early (never during the
warm-up) with the best weights restored, warns when the result is near chance,
evaluates on the test split and exports the artifact that classify runs
(training config, dataset fingerprint and metrics in its manifest, and
metrics.json beside it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

from beamvision import console, storage
from beamvision.models import ArtifactError, ModelArgumentError, get_spec
from beamvision.models.artifact import MANIFEST_FILE, Manifest, new_manifest, save_artifact
from beamvision.models.training import (
    CalibrateBatchNorm,
    EpochProgress,
    KeepCheckpoint,
    ResumableEarlyStopping,
    build_model,
    chance_accuracy,
    checkpoint_dir,
    checkpoint_root,
    compile_model,
    dataset_fingerprint,
    evaluate,
    evaluation_split,
    local_shards,
    make_dataset,
    prepare_for_training,
    read_dataset_info,
    restore_checkpoint,
    steps_for,
)
from beamvision.pipelines import options
from beamvision.transforms.engines import engine_files

METRICS_FILE = "metrics.json"
# A final accuracy that closes at most this share of the gap from chance (the most
# frequent class's share) to 100% gets a warning, and near_chance in metrics.json.
NEAR_CHANCE = 0.25


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


def run(argv: list[str] | None = None) -> Manifest:
    """Trains, evaluates and exports; prints per-epoch progress and a summary."""
    args = options.parse("beamvision train", __doc__.splitlines()[0], options.add_train_arguments, argv)
    config = options.TrainConfig.from_args(args)
    if not config.overwrite and storage.exists(storage.join(config.output, MANIFEST_FILE)):
        raise ArtifactError(f"an artifact already exists at {config.output} (pass --overwrite to replace it)")
    return train(config).manifest


def train(
    config: options.TrainConfig,
    pause_after: int | None = None,
    extra: dict | None = None,
    title: str = "train",
) -> Outcome:
    """Trains ``config``, evaluates and exports its artifact; prints per-epoch progress and a summary.

    With ``pause_after``, the run stops after that many epochs (resumed ones
    included) unless early stopping ends it first, keeps its checkpoint and
    exports nothing: a later call with the same config goes on from there
    (``beamvision tune``'s rungs). ``extra`` joins the manifest's ``training``
    record; ``title`` begins each epoch's line (``train epoch 3/20: ...``).
    """
    import keras

    labels, stats = read_dataset_info(config.data)
    image_size = stats["image_size"]
    input_size = config.input_size or image_size
    totals = stats["totals"]
    if totals["train"] == 0:
        raise options.UsageError(f"--data {config.data}: the training split is empty")
    if config.input_size is None:  # the prepared size is the input size: the same rules apply
        try:
            get_spec(config.architecture).check_arguments(input_size=image_size, weights=config.weights)
        except ModelArgumentError as exc:
            raise options.UsageError(
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
    fingerprint = dataset_fingerprint(config.data, labels, stats)
    started = time.monotonic()
    keras.utils.set_random_seed(config.seed)
    model, head = build_model(config, len(labels), input_size)
    prepare_for_training(model, head, config.freeze_base)

    with tempfile.TemporaryDirectory() as cache:
        shards = {split: local_shards(config.data, split, os.path.join(cache, split)) for split in totals}

        def dataset(split, training):
            return make_dataset(
                shards[split],
                image_size,
                input_size,
                len(labels),
                config.batch_size,
                training,
                config.augment if training else (),
                config.seed,
                count=totals[split],
            )

        steps = config.steps_per_epoch or steps_for(totals["train"], config.batch_size)
        warmup_steps = min(steps, 100)
        compile_model(model, config, len(labels), steps * config.epochs, warmup_steps)
        # What shapes the weights: the training flags, the input size and the data (never the
        # artifact's name, version or --overwrite). A rerun with all of these equal resumes.
        resumable = {k: v for k, v in config.to_dict().items() if k not in ("name", "version", "overwrite")}
        resumable.update(input_size=input_size, dataset=fingerprint)
        checkpoint = checkpoint_dir(config.output, resumable)
        local, history_before = restore_checkpoint(checkpoint)
        pausing = pause_after is not None and pause_after < config.epochs
        callbacks = [keras.callbacks.BackupAndRestore(local, delete_checkpoint=not pausing)]
        validation = dataset("val", False) if totals["val"] else None
        early = None
        if validation is not None:
            early = ResumableEarlyStopping(
                local,
                history_before,
                monitor=config.monitor,
                patience=config.early_stopping_patience,
                restore_best_weights=True,
                # Every validation is meaningful: the warm-up ends within the first epoch
                # and BatchNorm statistics are re-estimated before each validation.
                start_from_epoch=0,
            )
            callbacks.append(early)
        # After the checkpoint and the best weights are saved: copies them to remote storage.
        kept = KeepCheckpoint(checkpoint, local, history_before)
        callbacks.append(kept)
        # After EarlyStopping, so that the restored weights get their own statistics.
        calibration = make_dataset(
            shards["train"],
            image_size,
            input_size,
            len(labels),
            config.batch_size,
            True,
            seed=config.seed,
            count=totals["train"],
            shuffle_buffer=8 * config.batch_size,
        )  # prepare wrote the shards in shuffled order: a small buffer mixes the classes enough
        callbacks.append(CalibrateBatchNorm(calibration, min(steps, 50)))
        if not console.is_quiet():  # last: an epoch's line means its checkpoint is kept
            until = pause_after if pausing else config.epochs
            callbacks.append(EpochProgress(title, config.epochs, steps, console.is_terminal(), until))
        print(
            f"training {config.architecture} at {input_size}px on {totals['train']:,} images, "
            f"{len(labels)} classes, {config.epochs} epochs of {steps} steps, weights {config.weights}",
            flush=True,
        )
        model.fit(  # the schedule spans config.epochs; a pausing run stops at pause_after
            dataset("train", True),
            validation_data=validation,
            epochs=pause_after if pausing else config.epochs,
            steps_per_epoch=steps,
            callbacks=callbacks,
            verbose=0,  # EpochProgress's lines instead
            shuffle=False,  # the tf.data pipeline shuffles
        )
        history = kept.history
        epochs_run = len(history.get("loss", []))
        if pausing and not (early and early.stopped_epoch):  # paused, not ended by early stopping
            if local != checkpoint:  # the remote copy is the checkpoint; the next call fetches it
                shutil.rmtree(local, ignore_errors=True)
            return Outcome(history, epochs_run, time.monotonic() - started)
        evaluated_on = evaluation_split(totals)
        metrics = evaluate(model, dataset(evaluated_on, False), labels)
    chance = chance_accuracy(labels, {k: v["support"] for k, v in metrics["per_class"].items()})
    near_chance = metrics["accuracy"] is not None and metrics["accuracy"] - chance <= NEAR_CHANCE * (
        1 - chance
    )
    metrics = {"evaluated_on": evaluated_on, "chance_accuracy": chance, "near_chance": near_chance, **metrics}
    seconds = time.monotonic() - started
    training = {
        "config": config.to_dict(),
        "input_size": input_size,
        "epochs_run": epochs_run,
        "history": history,
        "seconds": round(seconds, 1),
        "dataset": {
            "prefix": config.data,
            "fingerprint": fingerprint,
            "image_size": image_size,
            "totals": totals,
        },
        **(extra or {}),
    }
    manifest = new_manifest(
        model,
        config.architecture,
        labels,
        "trained",
        name=config.name,
        version=config.version,
        training=training,
        metrics=metrics,
    )
    with tempfile.TemporaryDirectory() as converted:
        engine_extra = engine_files(model, manifest, config.engines, converted)
        manifest = save_artifact(model, manifest, config.output, config.overwrite, extra_files=engine_extra)
    storage.write_atomic(storage.join(config.output, METRICS_FILE), json.dumps(metrics, indent=2).encode())
    # Only now: an export that fails leaves the checkpoint, and a rerun resumes from it.
    storage.delete_tree(checkpoint_root(config.output))
    if local != checkpoint:
        shutil.rmtree(local, ignore_errors=True)
    top5 = f", top-5 {metrics['top5_accuracy']:.1%}" if metrics.get("top5_accuracy") is not None else ""
    print(
        f"trained {config.architecture} in {seconds:.0f}s ({epochs_run} epochs): "
        f"{evaluated_on} accuracy {metrics['accuracy']:.1%}{top5} on {metrics['examples']:,} images, "
        f"macro F1 {metrics['macro_f1']:.3f}"
    )
    print(
        f"artifact: {config.output} ({manifest.name} version {manifest.version}); metrics: "
        f"{storage.join(config.output, METRICS_FILE)}"
    )
    if near_chance:
        print(
            f"WARNING: {evaluated_on} accuracy {metrics['accuracy']:.1%} is near chance ({chance:.1%}, "
            f"always guessing the most frequent of {len(labels)} classes): this model has not learned "
            "the task. Try --weights imagenet, more images or more --epochs, or a lower --learning_rate.",
            file=sys.stderr,
        )
    return Outcome(history, epochs_run, seconds, manifest)
