"""evaluate on the common case: a 1,000-class model scored against a truth CSV of a few classes."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from beamvision.models.metrics import CLASSES_IN_PICTURE, most_frequent_classes, save_confusion_png
from beamvision.pipelines import classify, evaluate
from beamvision.pipelines.cli import main


def test_a_thousand_class_model_scored_against_two_classes(photos, tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    truth = ["uri,label"]
    for i, photo in enumerate(photos):
        path = images / f"photo_{i}.jpg"
        Image.fromarray(photo).save(path)
        truth.append(f"{path},{'goldfish' if i % 2 else 'tench'}")
    (tmp_path / "truth.csv").write_text("\n".join(truth) + "\n")
    model = str(tmp_path / "imagenet-labels")
    assert (
        main(
            [
                *("export", "--architecture", "squeezenet", "--weights", "none", "--labels", "imagenet"),
                *("--input_size", "32", "--output", model),
            ]
        )
        == 0
    )
    results = str(tmp_path / "results")
    classify.run(["--input", str(images), "--model", model, "--output", results, "--embeddings"])

    metrics = evaluate.run(["--results", results, "--truth", str(tmp_path / "truth.csv")])
    assert metrics["examples"] == len(photos)
    assert {"goldfish", "tench"} <= set(metrics["labels"])
    assert metrics["per_class"]["tench"]["support"] == (len(photos) + 1) // 2
    with open(os.path.join(f"{results}-evaluation", "metrics.json")) as f:  # beside the results
        assert json.load(f)["confusion_matrix"] == metrics["confusion_matrix"]
    # Top-5 of a 1,000-class model is reported however few labels the truth and top-1 name.
    rows = pd.concat(
        pd.read_parquet(os.path.join(results, n)) for n in os.listdir(results) if "results-" in n
    )
    truth_of = dict(line.split(",") for line in truth[1:])
    hits = [
        truth_of[uri] in list(top)[:5] for uri, top in zip(rows.image_uri, rows.top_k_labels, strict=True)
    ]
    assert metrics["top5_accuracy"] == pytest.approx(np.mean(hits))
    with Image.open(os.path.join(f"{results}-evaluation", "confusion_matrix.png")) as picture:
        assert max(picture.size) < 2000


def test_the_picture_of_a_thousand_classes_shows_the_most_frequent_and_other(tmp_path):
    rng = np.random.default_rng(0)
    labels = [f"class_{i}" for i in range(1000)]
    matrix = np.zeros((1000, 1000), dtype=np.int64)
    for _ in range(5000):  # a few frequent classes, a long tail
        true = int(rng.choice([3, 17, 500])) if rng.random() < 0.5 else int(rng.integers(1000))
        matrix[true, true if rng.random() < 0.7 else int(rng.integers(1000))] += 1
    small, names = most_frequent_classes(matrix, labels, CLASSES_IN_PICTURE)
    assert small.shape == (CLASSES_IN_PICTURE, CLASSES_IN_PICTURE)
    assert small.sum() == matrix.sum()  # every image counted once
    assert {"class_3", "class_17", "class_500"} <= set(names)
    assert names[-1] == f"other ({1000 - CLASSES_IN_PICTURE + 1} classes)"
    kept = [labels.index(n) for n in names[:-1]]
    assert np.trace(small[:-1, :-1]) == sum(matrix[i, i] for i in kept)

    png = str(tmp_path / "c.png")
    save_confusion_png({"confusion_matrix": matrix.tolist(), "labels": labels, "accuracy": 0.5}, png, "t")
    with Image.open(png) as picture:
        assert max(picture.size) < 2000
