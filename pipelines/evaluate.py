"""``beamvision evaluate``: score a classify output against ground truth.

    beamvision evaluate --results gs://bucket/runs/1 --truth truth.csv
    beamvision evaluate --results out/ --truth folders     # the parent folder names the class

Writes metrics.json and confusion_matrix.png (to --output, default a folder of
its own beside the results, ``RESULTS-evaluation``: nothing is added to the
results folder): accuracy, top-5 accuracy where there are more than 5 classes,
per-class precision/recall/F1, the confusion matrix, and how many images with
a true label have no result (their errors are in errors-*.parquet). Truth and
result URIs are compared ``storage.canonical``: a relative, absolute or
``file://`` spelling of one file is the same file.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import io
import json
import os
import posixpath
import tempfile

import numpy as np

from beamvision import storage
from beamvision.console import counted
from beamvision.models.metrics import classification_metrics, save_confusion_png
from beamvision.pipelines.flags import UsageError, add_results_argument, parse
from beamvision.pipelines.reports import EVALUATION_SUFFIX, METRICS_FILE, evaluation_dir, read_results

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
        "--output",
        metavar="DIR",
        help=f"where metrics.json and the PNG go (default DIR{EVALUATION_SUFFIX} beside --results DIR)",
    )


@dataclasses.dataclass(frozen=True)
class Config:
    results: str
    truth: str
    output: str  # --output, or evaluation_dir(--results)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        if args.output is None and glob.has_magic(args.results):
            raise UsageError(f"--results {args.results}: a glob of runs; give --output DIR for the metrics")
        return cls(args.results, args.truth, (args.output or evaluation_dir(args.results)).rstrip("/"))


def read_truth(truth: str, uris) -> dict[str, str]:
    """uri -> true label, from a CSV of uri,label or, with ``folders``, each uri's parent folder."""
    if truth == "folders":
        return {uri: posixpath.basename(posixpath.dirname(uri)) for uri in uris}
    check_truth_file(truth)
    mapping = {}
    for row in csv.reader(io.StringIO(storage.read_text(truth))):
        if len(row) >= 2 and row[0].strip() and row[0].strip().lower() != "uri":
            mapping[storage.canonical(row[0].strip())] = row[1].strip()
    if not mapping:
        raise UsageError(f"--truth {truth}: no uri,label rows")
    return mapping


def check_truth_file(truth: str) -> None:
    """``--truth``, unless ``folders``, must name a file."""
    if truth != "folders" and not storage.exists(truth):
        raise UsageError(f"--truth {truth}: no such file (give a CSV of uri,label or 'folders')")


def check_matched(config: Config, results, truth: dict[str, str]) -> None:
    """Refuses, in one line, a truth that names none of the results (with an example of each side)."""
    if results.image_uri.isin(truth.keys()).any():
        return
    if results.empty:
        raise UsageError(f"--results {config.results}: no result rows to score (every input was an error)")
    raise UsageError(
        f"--truth {config.truth}: 0 of its {counted(len(truth), 'URI')} match one of the "
        f"{counted(len(results), 'result')} in --results {config.results} "
        f"(truth e.g. {min(truth)}, results e.g. {results.image_uri.min()})"
    )


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
    results["image_uri"] = results.image_uri.map(storage.canonical)  # rows of runs before URIs were
    truth = read_truth(config.truth, results.image_uri)
    check_matched(config, results, truth)
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
        f"{metrics['macro_f1']:.3f}; {counted(metrics['labelled_without_result'], 'labelled image')} "
        f"{'has' if metrics['labelled_without_result'] == 1 else 'have'} no result"
        if accuracy is not None
        else "no labelled image has a result"
    )
    print(
        f"metrics: {storage.join(output, METRICS_FILE)}, "
        f"confusion matrix: {storage.join(output, CONFUSION_FILE)}"
    )
    return metrics
