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


def _label_set_truth(multilabel, path) -> dict[str, list[str]]:
    """A truth CSV of the tiles' label sets, one row per label; returns uri -> set."""
    from multilabel import image_sets

    sets = image_sets(str(multilabel / "images"))
    rows = [f"{uri},{label}" for uri, labels in sets.items() for label in labels]
    path.write_text("uri,label\n" + "\n".join(rows) + "\n")
    return sets


def test_label_sets_are_scored_against_a_multi_label_truth(multilabel, tmp_path, capsys):
    from multilabel import CLASSES
    from sklearn.metrics import average_precision_score, f1_score

    sets = _label_set_truth(multilabel, tmp_path / "truth.csv")
    extra = multilabel / "images" / "gone.png"  # labelled, never classified
    with open(tmp_path / "truth.csv", "a") as f:
        f.write(f"{extra},cat\n{extra},rocket\n")
    results = str(multilabel / "results")
    output = str(tmp_path / "scored")
    metrics = evaluate.run(["--results", results, "--truth", str(tmp_path / "truth.csv"), "--output", output])

    rows = pd.concat(
        pd.read_parquet(os.path.join(results, n)) for n in os.listdir(results) if "results-" in n
    )
    truth = np.array([[c in sets[uri] for c in CLASSES] for uri in rows.image_uri])
    predicted = np.array([[c in list(chosen) for c in CLASSES] for chosen in rows["labels"]])
    scores = np.array(
        [
            [dict(zip(k, s, strict=True))[c] for c in CLASSES]
            for k, s in zip(rows.top_k_labels, rows.top_k_scores, strict=True)
        ]
    )
    assert metrics["labels"] == CLASSES and metrics["examples"] == 12
    assert metrics["micro_f1"] == pytest.approx(f1_score(truth, predicted, average="micro"))
    assert metrics["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    per_class_ap = [average_precision_score(truth[:, i], scores[:, i]) for i in range(len(CLASSES))]
    assert metrics["mean_average_precision"] == pytest.approx(np.mean(per_class_ap))
    cat = metrics["per_class"]["cat"]
    assert cat["support"] == 6 and cat["f1"] == pytest.approx(f1_score(truth[:, 0], predicted[:, 0]))
    assert cat["average_precision"] == pytest.approx(per_class_ap[0])
    assert metrics["average_precision_from"] == evaluate.ALL_SCORES  # every class is in each row's top k
    assert metrics["labelled_without_result"] == 1 and metrics["results_without_label"] == 0
    with open(os.path.join(output, "metrics.json")) as f:
        assert json.load(f) == metrics
    assert not os.path.exists(os.path.join(output, "confusion_matrix.png"))  # of one label per image
    printed = capsys.readouterr().out.splitlines()
    f1 = f"micro F1 {metrics['micro_f1']:.3f}, macro F1 {metrics['macro_f1']:.3f}"
    assert printed[0].startswith(f"{f1}, mAP {metrics['mean_average_precision']:.3f}, exact label sets ")
    assert printed[0].endswith("on 12 labelled images; 1 labelled image has no result")


def test_label_sets_of_top_k_results_say_what_their_average_precision_is_from(multilabel, tmp_path):
    results = str(tmp_path / "top1")
    argv = ["--input", str(multilabel / "images"), "--model", str(multilabel / "model"), "--top_k", "1"]
    classify.run([*argv, "--output", results])
    _label_set_truth(multilabel, tmp_path / "truth.csv")
    metrics = evaluate.run(["--results", results, "--truth", str(tmp_path / "truth.csv")])
    assert metrics["average_precision_from"] == evaluate.TOP_K_SCORES
    # The label sets are chosen over every class, whatever the top k: F1 is that of the full run.
    argv = ["--results", str(multilabel / "results"), "--truth", str(tmp_path / "truth.csv")]
    full = evaluate.run([*argv, "--output", str(tmp_path / "full")])
    assert metrics["micro_f1"] == pytest.approx(full["micro_f1"])


def test_single_label_results_refuse_a_truth_of_label_sets(multilabel, tmp_path, capsys):
    results = str(tmp_path / "single")
    argv = ["--input", str(multilabel / "images"), "--model", str(multilabel / "single")]
    classify.run([*argv, "--output", results])
    sets = _label_set_truth(multilabel, tmp_path / "truth.csv")
    capsys.readouterr()
    assert main(["evaluate", "--results", results, "--truth", str(tmp_path / "truth.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "6 URIs with more than one label" in err and "single-label" in err
    # One label per image (and a repeated row of the same label) scores as ever.
    one = [f"{uri},{labels[0]}" for uri, labels in sets.items()]
    (tmp_path / "one.csv").write_text("\n".join([*one, one[0]]) + "\n")
    metrics = evaluate.run(["--results", results, "--truth", str(tmp_path / "one.csv")])
    assert metrics["examples"] == 12 and "confusion_matrix" in metrics and "multi_label" not in metrics


def test_a_truth_csv_gives_each_uri_its_label_set(tmp_path):
    csv = tmp_path / "truth.csv"
    csv.write_text("uri,label\na.png,cat\na.png,rocket\nb.png,\nc.png,coffee\nc.png,coffee\n")
    sets = evaluate.label_sets(evaluate.read_truth_rows(str(csv), []))
    here = os.path.abspath
    assert sets == {here("a.png"): ["cat", "rocket"], here("b.png"): [], here("c.png"): ["coffee"]}
