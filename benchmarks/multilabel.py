"""Multi-label on real photos: ``beamvision train`` against plain Keras and a linear model, same split.

    python benchmarks/multilabel.py [--seeds 1] [--tiles 240]

The set: 64 px tiles whose left and right halves are crops of one or two of
four photographs that ship in scikit-image and scikit-learn (cat, coffee,
flower, hubble), so that a tile holds one label or two; a labels CSV names a
tile on one row per label. ``beamvision prepare --multi_label`` prepares it
once at 32 px (val 15%, test 20%), and every method trains on the same train
split and is scored on the same test split:

- beamvision defaults: ``beamvision train --architecture mobilenet_v2`` with
  every other flag at its default (sigmoid head, binary cross-entropy,
  per-class thresholds chosen on val);
- beamvision, the test's schedule: mobilenet_v1, 10 epochs, batch 16, no
  augmentation, learning rate 0.003 (tests/test_multilabel_training.py);
- plain Keras: a two-block CNN with a sigmoid head and binary cross-entropy,
  30 epochs of Adam, every label at 0.5 (what a user writes by hand);
- logreg: scikit-learn's one-vs-rest logistic regression on the standardised pixels, at 0.5.

Prints a markdown table of test micro F1, macro F1 and mean average
precision per method, the mean over ``--seeds`` training seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

from photos import write_photo_tiles  # noqa: E402
from small_data import cpu_model, small_cnn_model  # noqa: E402

CLASSES = ("cat", "coffee", "flower", "hubble")
SIZE = 32
TEST_SCHEDULE = ("--architecture", "mobilenet_v1", "--epochs", "10", "--batch_size", "16")
TEST_SCHEDULE += ("--augment", "none", "--learning_rate", "0.003")


def prepared(work: str, tiles: int) -> str:
    """The tiles, labelled and prepared once under ``work``; returns the prepared prefix."""
    from beamvision.pipelines import prepare

    data = os.path.join(work, "data")
    if not os.path.exists(os.path.join(data, "stats.json")):
        written = write_photo_tiles(os.path.join(work, "tiles"), tiles, CLASSES)
        labels = os.path.join(work, "labels.csv")
        with open(labels, "w", newline="") as f:
            rows = csv.writer(f)
            rows.writerow(["uri", "label"])
            rows.writerows((uri, label) for uri, names in written for label in names)
        argv = ["--input", os.path.join(work, "tiles"), "--labels", labels, "--output", data]
        splits = ["--image_size", str(SIZE), "--val_fraction", "0.15", "--test_fraction", "0.2"]
        with contextlib.redirect_stdout(io.StringIO()):
            prepare.run([*argv, *splits, "--multi_label", "--overwrite", "--quiet"])
    return data


def arrays(data: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A prepared split as (uint8 images [n, 32, 32, 3], multi-hot labels [n, classes])."""
    from beamvision.models.training import local_shards, make_dataset, read_dataset_info

    labels, stats = read_dataset_info(data)
    files = local_shards(data, split, "")
    count = stats["totals"][split]
    ds = make_dataset(files, SIZE, SIZE, len(labels), 256, False, count=count, multi_label=True)
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    return np.concatenate(xs), np.concatenate(ys).astype(int)


def scores(y_true: np.ndarray, y_score: np.ndarray, thresholds: np.ndarray) -> tuple[float, float, float]:
    from sklearn.metrics import average_precision_score, f1_score

    y_pred = (y_score >= thresholds).astype(int)
    return (
        f1_score(y_true, y_pred, average="micro", zero_division=0),
        f1_score(y_true, y_pred, average="macro", zero_division=0),
        average_precision_score(y_true, y_score, average="macro"),
    )


def beamvision_train(data: str, output: str, seed: int, flags: tuple[str, ...]) -> tuple[float, float, float]:
    from beamvision.pipelines import train

    args = ["--data", data, "--output", output, "--seed", str(seed), *flags]
    with contextlib.redirect_stdout(io.StringIO()):
        train.run([*args, "--overwrite", "--quiet"])
    with open(os.path.join(output, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["evaluated_on"] == "test"
    return metrics["micro_f1"], metrics["macro_f1"], metrics["mean_average_precision"]


def plain_keras(train, test, seed: int) -> tuple[float, float, float]:
    (x, y), (xt, yt) = train, test
    model = small_cnn_model(y.shape[1], "sigmoid", seed)
    model.compile("adam", "binary_crossentropy")
    model.fit(x, y.astype("float32"), batch_size=32, epochs=30, verbose=0)
    return scores(yt, model.predict(xt, verbose=0), np.full(y.shape[1], 0.5))


def logistic_regression(train, test, seed: int) -> tuple[float, float, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (x, y), (xt, yt) = train, test
    model = make_pipeline(
        StandardScaler(), OneVsRestClassifier(LogisticRegression(max_iter=2000, random_state=seed))
    )
    model.fit(x.reshape(len(x), -1).astype(np.float32), y)
    probabilities = model.predict_proba(xt.reshape(len(xt), -1).astype(np.float32))
    return scores(yt, probabilities, np.full(y.shape[1], 0.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--tiles", type=int, default=240)
    parser.add_argument("--workdir", default="/tmp/beamvision-bench-multilabel")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    started = time.perf_counter()
    data = prepared(args.workdir, args.tiles)
    train, test = arrays(data, "train"), arrays(data, "test")
    methods = {
        "beamvision defaults (mobilenet_v2)": lambda seed: beamvision_train(
            data, os.path.join(args.workdir, f"defaults-{seed}"), seed, ("--architecture", "mobilenet_v2")
        ),
        "beamvision, the test's schedule (mobilenet_v1)": lambda seed: beamvision_train(
            data, os.path.join(args.workdir, f"schedule-{seed}"), seed, TEST_SCHEDULE
        ),
        "plain Keras CNN, sigmoid, 0.5": lambda seed: plain_keras(train, test, seed),
        "logreg on pixels, one-vs-rest, 0.5": lambda seed: logistic_regression(train, test, seed),
    }
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in methods}
    for seed in range(args.seeds):
        for name, method in methods.items():
            t0 = time.perf_counter()
            results[name].append(method(seed))
            took = time.perf_counter() - t0
            print(f"seed {seed}: {name}: micro F1 {results[name][-1][0]:.3f} ({took:.0f}s)", file=sys.stderr)
    trivial = scores(test[1], np.ones(test[1].shape), np.full(test[1].shape[1], 0.5))
    print(
        f"\n{len(train[1])} train / {len(test[1])} test tiles, {SIZE} px, {args.seeds} seed(s), "
        f"{cpu_model()}, {time.perf_counter() - started:.0f} s in all\n"
    )
    print("| method | micro F1 | macro F1 | mAP |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        micro, macro, ap = np.mean(runs, axis=0)
        print(f"| {name} | {micro:.3f} | {macro:.3f} | {ap:.3f} |")
    print(f"| every label for every tile | {trivial[0]:.3f} | {trivial[1]:.3f} | - |")


if __name__ == "__main__":
    main()
