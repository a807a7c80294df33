"""beamvision tune: search spaces, successive halving, and whole searches on real digits and photos.

The searches train real (tiny) models: digits with two multi-processing
workers, and real photographs with data, checkpoints and outputs on gs://
(the GCS emulator), where prepare, train and tune run end to end.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from apache_beam.metrics.metric import MetricsFilter
from digits import render_subset
from photos import write_photo_classes

from beamvision import storage
from beamvision.models.artifact import load_artifact
from beamvision.models.train_config import TrainConfig
from beamvision.models.trainer import train
from beamvision.pipelines import classify, prepare, tune
from beamvision.pipelines.cli import main
from beamvision.pipelines.search_space import SpaceError
from beamvision.pipelines.tune_report import influence
from beamvision.transforms.trials import COMPLETED, FAILED, PAUSED, STOPPED, halve, rung_epochs

# Two architectures, two learning rates and a switch that train refuses without pretrained
# weights: random search over these draws some impossible trials, which must become error rows.
DIGITS_SPACE = """
architecture: [squeezenet, mobilenet_v1]
learning_rate: [0.001, 0.01]
freeze_base: [false, true]   # true with random weights: train refuses it
epochs: 2
steps_per_epoch: 2
batch_size: 8
optimizer: sgd               # Keras traces SGD's update faster than Adam's
"""


def _space(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def _json(folder: str, name: str):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def _counter(result, name: str) -> int:
    counters = result.metrics().query(MetricsFilter().with_name(name))["counters"]
    return sum(c.committed or c.attempted or 0 for c in counters)


# --- plain functions ---------------------------------------------------------------------------


def test_rungs_are_fractions_of_each_trials_epochs():
    assert rung_epochs(8, 2, 2) == [4, 8]
    assert rung_epochs(9, 3, 3) == [1, 3, 9]
    assert rung_epochs(5, 2, 2) == [3, 5]  # rounded up
    assert rung_epochs(1, 3, 2) == [1]  # a one-epoch trial has one rung
    assert rung_epochs(6, 1, 2) == [6]  # one rung: no early stopping


def _record(index, status, best):
    return {"index": index, "trial_id": f"t{index}", "status": status, "best": best}


def test_halving_keeps_the_best_share_and_ranks_completed_trials_too():
    records = [
        _record(0, PAUSED, 0.50),
        _record(1, PAUSED, 0.90),
        _record(2, COMPLETED, 0.95),  # ended early on its own: ranked, but never goes on
        _record(3, PAUSED, 0.70),
        _record(4, FAILED, None),
        _record(5, PAUSED, 0.70),  # ties with trial 3: the earlier trial wins
    ]
    going, done = halve(records, "val_accuracy", 2)  # 5 ranked: the best 3 make the cut
    assert [r["index"] for r in going] == [1, 3]
    assert {r["index"]: r["status"] for r in done} == {0: STOPPED, 2: COMPLETED, 4: FAILED, 5: STOPPED}
    going, _ = halve(records, "val_loss", 2)  # a loss: lower is better
    assert [r["index"] for r in going] == [0, 3, 5]


def test_influence_finds_the_flag_that_moves_the_metric():
    rng = np.random.default_rng(0)
    records = []
    for index in range(40):
        flags = {"learning_rate": float(10 ** rng.uniform(-4, -1)), "optimizer": ["adam", "sgd"][index % 2]}
        best = 0.5 + 0.1 * np.log10(flags["learning_rate"]) + rng.normal(0, 0.01)
        records.append(
            {"index": index, "trial_id": str(index), "status": COMPLETED, "best": best, "flags": flags}
        )
    shares = influence(records, ["optimizer", "learning_rate"])
    assert list(shares) == ["learning_rate", "optimizer"]
    assert shares["learning_rate"] > 0.8 and shares["optimizer"] < 0.1


# --- search spaces ---------------------------------------------------------------------------------


def test_grid_takes_every_combination_in_the_files_order(tmp_path):
    space = tune.load_space(
        _space(
            tmp_path,
            "architecture: [squeezenet, alexnet]\nbatch_size: {low: 8, high: 32, log: true, num: 3}\n",
        )
    )
    trials = space.trials("grid", None, seed=0)
    assert [(t["architecture"], t["batch_size"]) for t in trials] == [
        ("squeezenet", 8),
        ("squeezenet", 16),
        ("squeezenet", 32),
        ("alexnet", 8),
        ("alexnet", 16),
        ("alexnet", 32),
    ]
    assert space.trials("grid", 2, seed=0) == trials[:2]


def test_random_search_is_reproducible_distinct_and_log_uniform(tmp_path):
    path = _space(
        tmp_path,
        '{"learning_rate": {"low": 1e-5, "high": 1e-1, "log": true}, "optimizer": ["adam", "sgd"], '
        '"epochs": {"low": 2, "high": 9}}',  # JSON is YAML too
    )
    space = tune.load_space(path)
    trials = space.trials("random", 200, seed=7)
    assert trials == tune.load_space(path).trials("random", 200, seed=7)
    assert trials != space.trials("random", 200, seed=8)
    assert len({json.dumps(t, sort_keys=True) for t in trials}) == 200
    rates = np.log10([t["learning_rate"] for t in trials])
    assert rates.min() >= -5 and rates.max() <= -1
    assert 0.15 < np.mean(rates < -4) < 0.35  # log-uniform: a quarter of the draws in the lowest decade
    assert {type(t["epochs"]) for t in trials} == {int} and {t["epochs"] for t in trials} == set(range(2, 10))
    # A space of 4 combinations gives 4 random trials, however many are asked for.
    small = tune.load_space(_space(tmp_path, "optimizer: [adam, sgd]\nbatch_size: [8, 16]\n"))
    assert len(small.trials("random", 10, seed=0)) == 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("learning_rat: [0.1]", "learning_rat: not a flag of beamvision train"),
        ("optimizer: [adam, adamw]", "optimizer: argument --optimizer: invalid choice: 'adamw'"),
        ("monitor: [val_loss]", "monitor: set by tune's --metric"),
        ("output: /tmp/x", "output: tune writes each trial's artifact under --output"),
        ("learning_rate: {low: 0.1, high: 0.01}", "learning_rate: low must be below high"),
        ("learning_rate: {low: 0, high: 0.1, log: true}", "learning_rate: a log range needs low above 0"),
        ("batch_size: {low: 0, high: 8}", "batch_size: argument --batch_size: expected a positive integer"),
        ("epochs: []", "epochs: an empty list of choices"),
        ("epochs: {min: 1, max: 3}", "epochs: a range is {low: X, high: Y}"),
        (
            "architecture: [squeezenet, lenet]",
            "architecture: argument --architecture: invalid choice: 'lenet'",
        ),
        ("[1, 2]", "must be a mapping of train flags"),
        ("epochs: [1, 2", "not valid YAML or JSON"),
        ("learning_rate: {low: 0.1, high: .inf}", "learning_rate: high must be a finite number"),
        (
            "label_smoothing: [0.1, 1.5]",
            "label_smoothing: argument --label_smoothing: expected a fraction in",
        ),
        (  # every trial lacks it: refused before any work, not 10 failed trials
            "epochs: 3",
            "trial 0 ({'epochs': 3, 'seed': 0}): the following arguments are required: --architecture",
        ),
    ],
)
def test_a_bad_space_is_one_line_naming_the_key(tmp_path, capsys, text, expected):
    path = _space(tmp_path, text)
    os.makedirs(tmp_path / "data")
    for name, content in (
        ("labels.json", '["a", "b"]'),
        ("stats.json", '{"totals": {"train": 4, "val": 2}}'),
    ):
        (tmp_path / "data" / name).write_text(content)
    argv = ["tune", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--space", path]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"beamvision tune: error: --space {path}: {expected}" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_grid_over_a_range_without_points_is_refused(tmp_path):
    space = tune.load_space(_space(tmp_path, "learning_rate: {low: 0.001, high: 0.1}"))
    with pytest.raises(SpaceError, match="learning_rate: a range needs num: N for --search grid"):
        space.trials("grid", None, seed=0)


# --- whole searches --------------------------------------------------------------------------------


@pytest.mark.slow
def test_six_trials_on_two_workers_keep_every_trial_and_the_best_model(tiny, tmp_path, capsys):
    root, data = tiny
    out = str(tmp_path / "search")
    argv = ["--data", data, "--output", out, "--space", _space(tmp_path, DIGITS_SPACE), "--trials", "6"]
    workers = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
    tune.run(argv + workers)
    printed = capsys.readouterr().out

    trials = pd.read_parquet(os.path.join(out, "trials.parquet"))
    assert list(trials.trial) == list(range(6))
    planned = _json(out, "search.json")["trials"]
    assert list(trials.trial_id) == [t["trial_id"] for t in planned]
    # Every trial is accounted for: the impossible ones as rows with train's own message.
    assert set(trials.status) <= {COMPLETED, STOPPED, FAILED}
    broken = trials[trials.freeze_base]
    assert len(broken) >= 1 and set(broken.status) == {FAILED}
    assert all(e.startswith("--freeze_base: needs --weights imagenet") for e in broken.error)
    runnable = trials[~trials.freeze_base]
    assert len(runnable) >= 2 and runnable.error.isna().all()
    # Successive halving at 1 of the 2 epochs: the best half of the runnable trials went on.
    assert (runnable.status == COMPLETED).sum() == -(-len(runnable) // 2)
    assert set(runnable[runnable.status == STOPPED].epochs_run) == {1}
    assert set(runnable[runnable.status == COMPLETED].epochs_run) == {2}
    assert all(len(v) == e for v, e in zip(runnable.val_accuracy_per_epoch, runnable.epochs_run, strict=True))
    assert {tuple(a) for a in runnable[["architecture", "learning_rate"]].values} <= {
        (a, r) for a in ("squeezenet", "mobilenet_v1") for r in (0.001, 0.01)
    }

    summary = _json(out, "summary.json")
    completed = trials[trials.status == COMPLETED]
    best_row = completed.sort_values(["val_accuracy", "trial"], ascending=[False, True]).iloc[0]
    assert summary["best"]["trial"] == best_row.trial
    assert (summary["trials"], summary["failed"]) == (6, len(broken))
    best = load_artifact(os.path.join(out, "best"))
    assert best.manifest.training["trial"]["trial_id"] == best_row.trial_id
    assert best.manifest.training["config"]["architecture"] == best_row.architecture
    assert best.manifest.training["config"]["learning_rate"] == best_row.learning_rate
    assert best.manifest.training["epochs_run"] == 2
    for stopped in trials[trials.status == STOPPED].trial_id:  # its checkpoint is gone
        assert not os.path.exists(os.path.join(out, "trials", stopped, "model.checkpoints"))
    with open(os.path.join(out, "plot.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for row in trials.itertuples():
        assert f"\n{row.trial}  " in printed  # the table shows every trial
    assert f"best: trial {best_row.trial} " in printed

    # The best artifact is an ordinary model artifact: classify runs it.
    results = str(tmp_path / "results")
    classify.run(["--input", root, "--model", os.path.join(out, "best"), "--output", results])
    assert _json(results, "summary.json")["results"] == 36

    # A rerun of the same command trains nothing that finished: only the failed trials run again.
    result = tune.run(argv)
    assert _counter(result, "trial_rungs_trained") == len(broken)
    assert _counter(result, "trial_rungs_reused") == len(runnable) + (runnable.status == COMPLETED).sum()
    again = pd.read_parquet(os.path.join(out, "trials.parquet"))
    pd.testing.assert_frame_equal(
        again.drop(columns=["seconds"]), trials.drop(columns=["seconds"]), check_like=False
    )
    assert "trial rungs already done" in capsys.readouterr().out


@pytest.mark.slow
def test_prepare_train_and_tune_from_a_bucket(tmp_path, gcs_bucket, capsys):
    """Real photos in gs://: prepare, train (paused and resumed from gs://) and tune, all in the bucket."""
    written = write_photo_classes(str(tmp_path / "photos"), per_class=6, size=(64, 48))
    for paths in written.values():
        for path in paths:
            relative = os.path.relpath(path, tmp_path / "photos")
            storage.write_atomic(f"{gcs_bucket}/photos/{relative}", local_path=path)
    data = f"{gcs_bucket}/data"
    prepare.run(["--input", f"{gcs_bucket}/photos", "--output", data, "--image_size", "32"])
    stats = json.loads(storage.read_text(f"{data}/stats.json"))
    assert stats["examples"] == 42 and stats["totals"]["val"] > 0

    # train on gs://: a run paused after one epoch keeps its checkpoint in the bucket and goes on.
    model = f"{gcs_bucket}/models/photos"
    config = TrainConfig(data=data, output=model, architecture="squeezenet", epochs=2, batch_size=8)
    paused = train(config, pause_after=1)
    assert paused.paused and paused.epochs_run == 1
    kept = [os.path.basename(u) for u in storage.list_files(f"{model}.checkpoints")]
    assert {"latest.weights.h5", "training_metadata.json", "history.json", "best.weights.npz"} <= set(kept)
    capsys.readouterr()
    finished = train(config)
    trained = capsys.readouterr().out
    assert "train epoch 2/2: " in trained and "epoch 1/2" not in trained  # resumed from the bucket
    assert finished.epochs_run == 2 and len(finished.history["val_accuracy"]) == 2
    assert finished.history["val_accuracy"][0] == paused.history["val_accuracy"][0]
    assert load_artifact(model).manifest.training["epochs_run"] == 2
    assert storage.list_files(f"{model}.checkpoints") == []

    out = f"{gcs_bucket}/tune"
    space = _space(
        tmp_path, "learning_rate: [0.001, 0.01]\nepochs: 2\nbatch_size: 8\narchitecture: squeezenet\n"
    )
    assert main(["tune", "--data", data, "--output", out, "--space", space, "--search", "grid"]) == 0
    summary = json.loads(storage.read_text(f"{out}/summary.json"))
    assert (summary["trials"], summary["completed"], summary["stopped"]) == (2, 1, 1)
    assert load_artifact(f"{out}/best").manifest.training["trial"]["trial_id"] == summary["best"]["trial_id"]
    assert storage.exists(f"{out}/trials.parquet") and storage.exists(f"{out}/plot.png")
    assert "tune: 2 trials" in capsys.readouterr().out


def _on_dataflow(data: str, bucket: str, space: str) -> list[str]:
    return [
        *("tune", "--data", data, "--output", f"{bucket}/tune", "--space", space),
        *("--runner", "DataflowRunner", "--project", "beamvision-test", "--region", "us-central1"),
        *("--temp_location", f"{bucket}/tmp"),
    ]


def test_a_remote_runner_needs_data_and_output_in_storage(tiny, tmp_path, gcs_bucket, capsys):
    _, data = tiny
    assert main(_on_dataflow(data, gcs_bucket, _space(tmp_path, DIGITS_SPACE))) == 2
    err = capsys.readouterr().err
    assert f"--data {data}: a local path, which DataflowRunner's workers cannot reach (use gs://)" in err
    assert len(err.splitlines()) == 1


def test_tune_needs_a_validation_split(tmp_path, capsys):
    root = render_subset(str(tmp_path / "digits"), classes=2, per_class=5)
    data = str(tmp_path / "data")
    prepare.run(["--input", root, "--output", data, "--image_size", "32", "--val_fraction", "0"])
    argv = ["tune", "--data", data, "--output", str(tmp_path / "o"), "--space", _space(tmp_path, "epochs: 1")]
    assert main(argv) == 2
    assert "has no validation split, which ranks the trials" in capsys.readouterr().err


def test_the_dataflow_job_graph_of_a_search_builds(tiny, tmp_path, gcs_bucket, capsys):
    _, data = tiny
    argv = [*_on_dataflow(data, gcs_bucket, _space(tmp_path, DIGITS_SPACE)), "--dry_run"]
    assert main(argv) == 0
    assert "dry run: built the DataflowRunner job graph" in capsys.readouterr().out
    assert storage.list_files(f"{gcs_bucket}/tune") == []
