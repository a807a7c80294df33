"""Multi-label end to end: prepare --multi_label and train on tiles of real photos with one or two labels.

Each 64 px tile's left and right halves are crops of one or two of four
shipped photos (``photos.write_photo_tiles``); a labels CSV names a tile on
one row per label. prepare reads it as label sets, train fits a sigmoid head,
chooses each class's threshold on the validation split and scores the test
split with multi-label metrics.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pandas as pd
import pytest
from conftest import built_once
from photos import write_photo_classes, write_photo_tiles

from beamvision.models import trainer
from beamvision.models.artifact import load_artifact
from beamvision.models.dataset import parse_example
from beamvision.models.errors import ModelError
from beamvision.models.train_config import (
    DEFAULT_RANKING,
    MONITORS,
    TrainConfig,
    default_monitor,
    resolve_monitor,
)
from beamvision.pipelines import train
from beamvision.pipelines.cli import main
from beamvision.pipelines.labelstudio import label_studio_labels
from beamvision.pipelines.prepare import LabelProblem, file_label
from beamvision.transforms.rows import label_set
from beamvision.transforms.trials import rank

CLASSES = ("cat", "coffee", "flower", "hubble")
TILES = 240
SPLIT_FLAGS = ["--image_size", "32", "--val_fraction", "0.15", "--test_fraction", "0.2"]
# An explicit schedule, so that the test depends on no default: mobilenet_v1 from scratch at 32 px.
SCHEDULE = ["--architecture", "mobilenet_v1", "--epochs", "10", "--batch_size", "16", "--augment", "none"]
SCHEDULE += ["--learning_rate", "0.003"]
# Measured: test micro F1 0.894 on this set (chance, predicting every label for every tile: 0.529).
MICRO_F1_AT_LEAST = 0.75


def _json(path: str):
    with open(path) as f:
        return json.load(f)


def _write_labels_csv(path: str, tiles: list[tuple[str, tuple[str, ...]]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "label"])
        for uri, labels in tiles:
            for label in labels:  # one row per label: a tile with two is named twice
                writer.writerow([uri, label])


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """(labels CSV, tiles, prepared prefix, trained model folder, what train printed): built once."""

    def build(folder):
        import contextlib
        import io

        written = write_photo_tiles(str(folder / "tiles"), TILES, CLASSES)
        _write_labels_csv(str(folder / "labels.csv"), written)
        data, model = str(folder / "data"), str(folder / "model")
        argv = ["--input", str(folder / "tiles"), "--labels", str(folder / "labels.csv"), "--output", data]
        assert main(["prepare", *argv, *SPLIT_FLAGS, "--multi_label"]) == 0
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            train.run(["--data", data, "--output", model, *SCHEDULE])
        (folder / "train.out").write_text(printed.getvalue())
        (folder / "tiles.json").write_text(json.dumps(written))

    folder = built_once(tmp_path_factory, "multilabel-tiles", build)
    written = [(uri, tuple(labels)) for uri, labels in _json(os.path.join(folder, "tiles.json"))]
    with open(os.path.join(folder, "train.out")) as f:
        printed = f.read()
    return (
        os.path.join(folder, "labels.csv"),
        written,
        os.path.join(folder, "data"),
        os.path.join(folder, "model"),
        printed,
    )


@pytest.mark.slow  # the tiles: prepared and trained once, about 40 s
def test_prepare_gives_each_tile_its_label_set(tiles):
    _, written, data, _, _ = tiles
    stats = _json(os.path.join(data, "stats.json"))
    assert stats["multi_label"] is True
    assert _json(os.path.join(data, "labels.json")) == list(CLASSES)
    assert stats["examples"] == sum(stats["totals"].values()) == TILES and stats["errors"] == 0
    # An image counts once in each of its classes.
    for name in CLASSES:
        assert sum(stats["counts"][split][name] for split in stats["counts"]) == sum(
            name in labels for _, labels in written
        )
    assert sum(stats["counts"]["train"].values()) > stats["totals"]["train"]  # two-label tiles
    assert not any(stats["missing_from_splits"].values())
    import tensorflow as tf

    truth = {os.path.abspath(uri): set(labels) for uri, labels in written}
    shards = tf.io.gfile.glob(os.path.join(data, "*.tfrecord"))
    seen = 0
    for record in tf.data.TFRecordDataset(shards):
        _, hot = parse_example(record, 32, multi_hot_classes=len(CLASSES))
        uri = tf.train.Example.FromString(record.numpy()).features.feature["uri"].bytes_list.value[0]
        assert {CLASSES[i] for i in np.flatnonzero(hot.numpy())} == truth[uri.decode()]
        seen += 1
    assert seen == TILES


@pytest.mark.slow  # the tiles: prepared and trained once, about 40 s
def test_train_fits_a_sigmoid_head_and_chooses_thresholds_on_val(tiles):
    _, _, _, model, printed = tiles
    artifact = load_artifact(model)
    manifest = artifact.manifest
    assert manifest.multi_label is True
    assert set(manifest.thresholds) == set(CLASSES)
    assert all(0 < t < 1 for t in manifest.thresholds.values())
    assert artifact.model.layers[-1].get_config()["activation"] == "sigmoid"
    assert manifest.training["config"]["monitor"] == "val_f1"
    assert "val_f1" in manifest.training["history"]
    metrics = _json(os.path.join(model, "metrics.json"))
    assert metrics["evaluated_on"] == "test" and metrics["thresholds"] == manifest.thresholds
    assert metrics["micro_f1"] >= MICRO_F1_AT_LEAST > metrics["chance_micro_f1"] + 0.1
    assert metrics["near_chance"] is False
    assert set(metrics["per_class"]) == set(CLASSES)
    assert all(0 <= c["average_precision"] <= 1 for c in metrics["per_class"].values())
    summary = next(line for line in printed.splitlines() if line.startswith("trained mobilenet_v1 in "))
    assert f"test micro F1 {metrics['micro_f1']:.3f}, mAP {metrics['mean_average_precision']:.3f}" in summary
    assert f"macro F1 {metrics['macro_f1']:.3f}" in summary and "accuracy" not in summary
    assert os.path.getsize(os.path.join(model, "training-curves.png")) > 0


@pytest.mark.slow  # the tiles: prepared and trained once, about 40 s
def test_a_single_label_artifact_warm_starts_a_multi_label_model(tiles, tiny, tmp_path):
    _, _, data, _, _ = tiles
    _, digits = tiny
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    short = ["--architecture", "squeezenet", "--epochs", "1", "--steps_per_epoch", "2", "--batch_size", "8"]
    assert main(["train", "--data", digits, "--output", single, *short, "--quiet"]) == 0
    assert main(["train", "--data", data, "--output", multi, *short, "--weights", single, "--quiet"]) == 0
    artifact = load_artifact(multi)
    assert artifact.manifest.multi_label and artifact.manifest.labels == list(CLASSES)
    assert artifact.model.layers[-1].get_config()["activation"] == "sigmoid"
    assert not load_artifact(single).manifest.multi_label


@pytest.mark.slow  # the tiles: prepared and trained once, about 40 s
def test_a_paused_multi_label_run_resumes_from_its_checkpoint(tiles, tmp_path):
    _, _, data, _, _ = tiles
    config = TrainConfig(
        data, "squeezenet", str(tmp_path / "m"), epochs=2, steps_per_epoch=2, batch_size=8, augment=()
    )
    first = trainer.train(config, pause_after=1)  # as a tune rung: the checkpoint is kept
    assert first.paused and first.epochs_run == 1
    second = trainer.train(config)
    assert second.epochs_run == 2 and len(second.history["val_f1"]) == 2
    assert second.history["val_f1"][0] == first.history["val_f1"][0]  # epoch 1 came from the checkpoint
    assert second.manifest.multi_label and set(second.manifest.thresholds) == set(CLASSES)


@pytest.mark.slow  # the tiles: prepared and trained once, about 40 s
def test_without_multi_label_a_tile_with_two_labels_is_an_error_row(tiles, tmp_path, capsys):
    labels_csv, written, _, _, _ = tiles
    out = str(tmp_path / "single")
    tiles_root = os.path.dirname(written[0][0])
    argv = ["prepare", "--input", tiles_root, "--labels", labels_csv, "--output", out, *SPLIT_FLAGS]
    assert main([*argv, "--max_error_rate", "1"]) == 0
    stats = _json(os.path.join(out, "stats.json"))
    two = [uri for uri, labels in written if len(labels) == 2]
    assert "multi_label" not in stats and (stats["examples"], stats["errors"]) == (TILES - len(two), len(two))
    errors = pd.read_parquet(os.path.join(out, next(n for n in os.listdir(out) if n.startswith("errors-"))))
    assert set(errors.error_type) == {"ConflictingLabels"}
    assert sorted(errors.image_uri) == sorted(os.path.abspath(uri) for uri in two)
    assert all(
        message.endswith("(pass --multi_label if an image may hold several)") for message in errors.message
    )


@pytest.mark.slow  # the tiles: prepared and trained once, about 40 s
def test_class_weight_is_refused_on_multi_label_data(tiles, tmp_path, capsys):
    _, _, data, _, _ = tiles
    argv = ["train", "--data", data, "--output", str(tmp_path / "m"), *SCHEDULE, "--class_weight", "balanced"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"beamvision train: error: --class_weight balanced: not for multi-label data (--data {data}); "
        "an image with several labels has no one class to weigh it by"
    )


def _task(uri: str, *choices: str) -> dict:
    result = {
        "from_name": "choice",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": list(choices)},
    }
    return {"data": {"image": uri, "source_uri": uri}, "annotations": [{"id": 1, "result": [result]}]}


@pytest.mark.slow  # the tiles: prepared and trained once, about 40 s
def test_a_label_studio_task_with_two_choices_is_a_label_set(tiles, tmp_path):
    _, written, _, _, _ = tiles
    picked = written[:12]
    export = tmp_path / "export.json"
    export.write_text(json.dumps([_task(os.path.abspath(uri), *labels) for uri, labels in picked]))
    out = str(tmp_path / "reviewed")
    tiles_root = os.path.dirname(written[0][0])
    argv = ["prepare", "--input", tiles_root, "--labels", str(export), "--output", out, "--image_size", "16"]
    assert main([*argv, "--multi_label", "--val_fraction", "0", "--test_fraction", "0"]) == 0
    stats = _json(os.path.join(out, "stats.json"))
    assert stats["multi_label"] and stats["examples"] == 12 and stats["errors"] == 0
    for name in stats["counts"]["train"]:
        assert stats["counts"]["train"][name] == sum(name in labels for _, labels in picked)
    single = str(tmp_path / "single")  # without --multi_label, a task with two choices is an error row
    argv[argv.index(out)] = single
    assert main([*argv, "--val_fraction", "0", "--test_fraction", "0", "--max_error_rate", "1"]) == 0
    errors = pd.read_parquet(os.path.join(single, next(n for n in os.listdir(single) if "errors-" in n)))
    two = sorted(os.path.abspath(uri) for uri, labels in picked if len(labels) == 2)
    assert two and sorted(errors.image_uri) == two and set(errors.error_type) == {"ConflictingLabels"}
    assert all(m.startswith("the Label Studio export gives this file 2 labels: ") for m in errors.message)


def test_class_folders_under_multi_label_give_sets_of_one(tmp_path):
    written = write_photo_classes(str(tmp_path / "photos"), per_class=3, size=(32, 24))
    out = str(tmp_path / "data")
    argv = ["prepare", "--input", str(tmp_path / "photos"), "--output", out, "--image_size", "16"]
    assert main([*argv, "--multi_label"]) == 0
    stats = _json(os.path.join(out, "stats.json"))
    labels = _json(os.path.join(out, "labels.json"))
    assert stats["multi_label"] and (stats["examples"], stats["errors"]) == (3 * len(written), 0)
    import tensorflow as tf

    for record in tf.data.TFRecordDataset(tf.io.gfile.glob(os.path.join(out, "*.tfrecord"))):
        _, hot = parse_example(record, 16, multi_hot_classes=len(labels))
        uri = tf.train.Example.FromString(record.numpy()).features.feature["uri"].bytes_list.value[0]
        assert [labels[i] for i in np.flatnonzero(hot.numpy())] == [uri.decode().split("/")[-2]]


# --- plain functions ----------------------------------------------------------------------------


def test_a_file_named_on_several_rows_gets_its_label_set_only_when_asked():
    assert file_label(["cat", "cat"], multi_label=False) == "cat"
    assert file_label(["dog", "cat", "dog", ""], multi_label=True) == ("cat", "dog")
    assert file_label(["cat"], multi_label=True) == ("cat",)
    conflict = file_label(["dog", "cat"], multi_label=False)
    assert conflict == LabelProblem(
        "ConflictingLabels",
        "the CSV gives this file 2 labels: cat, dog (pass --multi_label if an image may hold several)",
    )
    assert file_label(["", ""], multi_label=True) == LabelProblem("NoLabel", "file has no label in the CSV")
    assert label_set("cat") == ("cat",) and label_set(("cat", "dog")) == ("cat", "dog")


def test_label_studio_choices_of_the_latest_annotation_are_the_task_labels():
    older = {"id": 1, "updated_at": "2026-01-01", "result": [_result("cat")]}
    newer = {"id": 2, "updated_at": "2026-02-01", "result": [_result("dog", "cat"), _result("dog")]}
    cancelled = {"id": 3, "updated_at": "2026-03-01", "was_cancelled": True, "result": [_result("fox")]}
    tasks = [
        {"data": {"source_uri": "/x/a.jpg"}, "annotations": [older, newer, cancelled]},
        {"data": {"source_uri": "/x/b.jpg"}, "annotations": [older]},
        {"data": {"source_uri": "/x/c.jpg"}, "annotations": []},
    ]
    reviewed = label_studio_labels(json.dumps(tasks), "/x")
    assert reviewed.labelled == [("/x/a.jpg", ("dog", "cat")), ("/x/b.jpg", ("cat",))]
    assert reviewed.unannotated == 1


def _result(*choices: str) -> dict:
    return {"from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": list(choices)}}


def test_monitors_fit_the_kind_of_data():
    # Early stopping orders a few dozen validation images by their loss; tune ranks trials by accuracy.
    assert (default_monitor(False), default_monitor(True)) == ("val_loss", "val_f1")
    assert resolve_monitor(None, True) == "val_f1" and resolve_monitor("val_loss", True) == "val_loss"
    ranking = [resolve_monitor(None, multi, "--metric", DEFAULT_RANKING) for multi in (False, True)]
    assert ranking == ["val_accuracy", "val_f1"]
    assert set(MONITORS) == {"val_accuracy", "val_loss", "val_f1"}
    records = [{"index": i, "status": "completed", "best": b} for i, b in enumerate((0.4, 0.7))]
    assert [r["index"] for r in rank(records, "val_f1")] == [1, 0]  # tune ranks trials by the monitor
    with pytest.raises(ModelError, match=r"^--monitor val_accuracy: not measured on multi-label data "):
        resolve_monitor("val_accuracy", True)
    with pytest.raises(ModelError, match=r"^--metric val_f1: not measured on single-label data "):
        resolve_monitor("val_f1", False, "--metric")
