"""Multi-label results: a sigmoid model's label sets, from both engines, with --threshold.

The model and the tiles are tests/multilabel.py's (built once a session):
each row's ``labels`` must be exactly the classes whose score is at or above
their threshold (the manifest's, or ``--threshold`` for every class), best
first, while ``label``/``score`` stay the top class and ``top_k_*`` as ever.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow.parquet as pq
from multilabel import CLASSES, THRESHOLDS

from beamvision.models.artifact import load_manifest
from beamvision.pipelines.cli import main
from beamvision.transforms.engines import chosen_labels, class_thresholds
from beamvision.transforms.rows import LABELS_FIELD, result_schema


def _rows(output: str) -> tuple[list[dict], object]:
    shards = sorted(f for f in os.listdir(output) if f.startswith("results-"))
    tables = [pq.read_table(os.path.join(output, f)) for f in shards]
    return [row for table in tables for row in table.to_pylist()], tables[0].schema


def _expected(row: dict, thresholds: dict[str, float]) -> list[str]:
    scores = dict(zip(row["top_k_labels"], row["top_k_scores"], strict=True))
    return [label for label in row["top_k_labels"] if scores[label] >= thresholds[label]]


def _check(output: str, thresholds: dict[str, float]) -> list[dict]:
    rows, schema = _rows(output)
    assert len(rows) == 12 and schema.names == result_schema(False, multi_label=True).names
    assert schema.field("labels").type == LABELS_FIELD.type
    for row in rows:
        assert row["top_k_labels"] and len(row["top_k_labels"]) == len(CLASSES)
        assert (row["label"], row["score"]) == (row["top_k_labels"][0], row["top_k_scores"][0])
        assert row["labels"] == _expected(row, thresholds), row
    return rows


def test_labels_are_the_classes_at_or_above_their_thresholds(multilabel):
    rows = _check(str(multilabel / "results"), THRESHOLDS)
    assert len({tuple(row["labels"]) for row in rows}) > 1  # the sets differ from image to image
    with open(multilabel / "results" / "summary.json") as f:
        assert json.load(f)["results"] == 12


def test_openvino_gives_the_same_label_sets(multilabel, tmp_path):
    output = str(tmp_path / "openvino")
    argv = ["classify", "--input", str(multilabel / "images"), "--model", str(multilabel / "model")]
    assert main([*argv, "--output", output, "--engine", "openvino"]) == 0
    rows = {row["image_uri"]: row for row in _check(output, THRESHOLDS)}
    for row in _rows(str(multilabel / "results"))[0]:
        other = rows[row["image_uri"]]
        np.testing.assert_allclose(other["top_k_scores"], row["top_k_scores"], atol=1e-4)
        if all(
            abs(s - THRESHOLDS[c]) > 1e-4
            for c, s in zip(row["top_k_labels"], row["top_k_scores"], strict=True)
        ):
            assert other["labels"] == row["labels"]


def test_threshold_overrides_every_class(multilabel, tmp_path):
    output = str(tmp_path / "runs")
    argv = ["classify", "--input", str(multilabel / "images"), "--model", str(multilabel / "model")]
    assert main([*argv, "--output", output, "--threshold", "0.45"]) == 0
    _check(output, dict.fromkeys(CLASSES, 0.45))


def test_an_incremental_run_at_another_threshold_classifies_everything_again(multilabel, tmp_path):
    """A catalog's rows hold label sets chosen at one threshold: a run at another skips none of them."""
    root = str(tmp_path / "catalog")
    argv = ["classify", "--input", str(multilabel / "images"), "--model", str(multilabel / "model")]
    argv += ["--output", root, "--incremental"]
    for threshold, skipped in ((None, 0), (None, None), ("0.45", 0), ("0.45", None)):
        flags = ["--threshold", threshold] if threshold else []
        assert main([*argv, *flags]) == 0
        summaries = sorted(glob.glob(f"{root}/run=*/summary.json"))
        with open(summaries[-1]) as f:
            summary = json.load(f)
        assert summary["model"]["threshold"] == (float(threshold) if threshold else None)
        if skipped is None:  # the same threshold again: everything was classified by the run before
            assert summary["skipped"] == summary["inputs"] and summary["results"] == 0
        else:
            assert summary["skipped"] == 0 and summary["results"] == summary["inputs"]


def test_thresholds_of_a_manifest_and_of_the_flag(multilabel):
    manifest = load_manifest(str(multilabel / "model"))
    np.testing.assert_allclose(class_thresholds(manifest), [0.5, 0.4, 0.6])
    np.testing.assert_allclose(class_thresholds(manifest, 0.0), [0.0, 0.0, 0.0])
    labels = np.asarray(CLASSES, dtype=object)
    scores = np.array([[0.5, 0.45, 0.59], [0.2, 0.9, 0.7], [0.1, 0.1, 0.1]], dtype=np.float32)
    chosen = chosen_labels(labels, scores, class_thresholds(manifest))
    assert chosen == [["cat", "coffee"], ["coffee", "rocket"], []]  # best first, at or above


def test_single_label_models_refuse_a_threshold(multilabel, capsys):
    argv = ["classify", "--input", str(multilabel / "images"), "--model", str(multilabel / "single")]
    assert main([*argv, "--output", str(multilabel / "refused"), "--threshold", "0.3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--threshold 0.3:" in err and "single-label" in err
    assert not os.path.exists(multilabel / "refused")
    assert class_thresholds(load_manifest(str(multilabel / "single"))) is None
    with open(multilabel / "single" / "manifest.json") as f:
        assert not {"multi_label", "thresholds"} & set(json.load(f))
    with open(multilabel / "model" / "manifest.json") as f:
        assert json.load(f)["thresholds"] == THRESHOLDS
