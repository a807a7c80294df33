"""``beamvision evaluate``: score a classify output against ground truth.

    beamvision evaluate --results gs://bucket/runs/1 --truth truth.csv
    beamvision evaluate --results out/ --truth folders     # the parent folder names the class

Writes metrics.json and confusion_matrix.png (to --output, default the results
directory): accuracy, top-5 accuracy where there are more than 5 classes,
per-class precision/recall/F1, the confusion matrix, and how many images with
a true label have no result (their errors are in errors-*.parquet).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import posixpath
import tempfile

import numpy as np

from beamvision import storage
from beamvision.models.metrics import classification_metrics, save_confusion_png
from beamvision.pipelines.flags import UsageError, add_results_argument, parse
from beamvision.pipelines.reports import METRICS_FILE, read_results

CONFUSION_FILE = "confusion_matrix.png"
RESULT_COLUMNS = ["image_uri", "label", "top_k_labels"]  # all that scoring needs (never the embeddings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_results_argument(parser)
    parser.add_argument(
        "--truth",
        required=True,
        metavar="{CSV,folders}",
        help="CSV of uri,label, or 'folders': each image's parent folder is its class",
    )
    parser.add_argument(
        "--output", metavar="DIR", help="where metrics.json and the PNG go (default --results)"
    )


@dataclasses.dataclass(frozen=True)
class Config:
    results: str
    truth: str
    output: str  # --output, or --results

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        return cls(args.results, args.truth, (args.output or args.results).rstrip("/"))


def read_truth(truth: str, uris) -> dict[str, str]:
    """uri -> true label, from a CSV of uri,label or, with ``folders``, each uri's parent folder."""
    if truth == "folders":
        return {uri: posixpath.basename(posixpath.dirname(uri)) for uri in uris}
    if not storage.exists(truth):
        raise UsageError(f"--truth {truth}: no such file (give a CSV of uri,label or 'folders')")
    mapping = {}
    for row in csv.reader(io.StringIO(storage.read_text(truth))):
        if len(row) >= 2 and row[0].strip() and row[0].strip().lower() != "uri":
            mapping[row[0].strip()] = row[1].strip()
    if not mapping:
        raise UsageError(f"--truth {truth}: no uri,label rows")
    return mapping


def score(results, truth: dict[str, str]) -> dict:
    """Metrics of the results whose URI has a true label; counts the labelled URIs without a result."""
    matched = results[results.image_uri.isin(truth.keys())]
    labels = sorted(set(truth.values()) | set(matched.label))
    index = {label: i for i, label in enumerate(labels)}
    y_true = np.array([index[truth[uri]] for uri in matched.image_uri], dtype=np.int64)
    # A lower-ranked label that is no image's truth can never be a hit: -1 stands for it.
    ranked = np.array([[index.get(x, -1) for x in row] for row in matched.top_k_labels], dtype=np.int64)
    if len(matched) == 0:
        ranked = np.zeros((0, 1), dtype=np.int64)
    # Top-5 means something when classify ranked at least 5 labels of a model that knows more than 5,
    # however few of them the truth names.
    predicted = {label for row in results.top_k_labels for label in row}
    metrics = classification_metrics(y_true, ranked, labels, top5=ranked.shape[1] >= 5 and len(predicted) > 5)
    metrics.setdefault("top5_accuracy", None)  # classify ran with --top_k below 5, or a small model
    metrics["labelled_without_result"] = len(set(truth) - set(results.image_uri))
    metrics["results_without_label"] = int((~results.image_uri.isin(truth.keys())).sum())
    return metrics


def run(argv: list[str] | None = None) -> dict:
    """Scores, writes metrics.json and the confusion-matrix PNG, prints a summary."""
    config = Config.from_args(parse("beamvision evaluate", __doc__.splitlines()[0], add_arguments, argv))
    output = config.output
    results = read_results(config.results, RESULT_COLUMNS)
    truth = read_truth(config.truth, results.image_uri)
    metrics = score(results, truth)
    storage.write_atomic(storage.join(output, METRICS_FILE), json.dumps(metrics, indent=2).encode())
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, CONFUSION_FILE)
        save_confusion_png(metrics, png, config.results)
        storage.write_atomic(storage.join(output, CONFUSION_FILE), local_path=png)
    accuracy = metrics["accuracy"]
    top5 = f", top-5 {metrics['top5_accuracy']:.1%}" if metrics.get("top5_accuracy") is not None else ""
    print(
        f"accuracy {accuracy:.1%}{top5} on {metrics['examples']:,} labelled images, macro F1 "
        f"{metrics['macro_f1']:.3f}; {metrics['labelled_without_result']} labelled images have no result"
        if accuracy is not None
        else "no labelled image has a result"
    )
    print(
        f"metrics: {storage.join(output, METRICS_FILE)}, "
        f"confusion matrix: {storage.join(output, CONFUSION_FILE)}"
    )
    return metrics
