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

A multi-label model's results (their ``labels`` column) are scored against
label sets: a truth CSV may name a URI on several rows, one label each (a row
``uri,`` with no label: an image with none of the classes). metrics.json then
holds micro and macro F1, mean average precision (from the results' scores:
every class's where each row ranks every class, else the top k, a class
outside an image's top k scoring 0; ``average_precision_from`` says which),
exact-match ratio, Hamming loss and per-class precision/recall/F1/support/AP;
no confusion matrix. Single-label results refuse a truth that gives one URI
two labels, in one line.
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
from collections import defaultdict

import numpy as np

from beamvision import storage
from beamvision.console import counted
from beamvision.models.metrics import classification_metrics, multilabel_metrics, save_confusion_png
from beamvision.pipelines.flags import UsageError, add_results_argument, parse
from beamvision.pipelines.reports import (
    EVALUATION_SUFFIX,
    METRICS_FILE,
    evaluation_dir,
    read_results,
    read_summary,
)
from beamvision.transforms.rows import LABELS_FIELD

CONFUSION_FILE = "confusion_matrix.png"
RESULT_COLUMNS = ["image_uri", "label", "top_k_labels"]  # all that scoring needs (never the embeddings)
LABEL_SET_COLUMNS = (LABELS_FIELD.name, "top_k_scores")  # and of a multi-label model's results
ALL_SCORES = "every class's score"
TOP_K_SCORES = "top-k scores (a class outside an image's top k scores 0)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_results_argument(parser)
    parser.add_argument(
        "--truth",
        required=True,
        metavar="{CSV,folders}",
        help="CSV of uri,label (a multi-label model's results: one row per label), or 'folders': each "
        "image's parent folder is its class",
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


def read_truth_rows(truth: str, uris) -> list[tuple[str, str]]:
    """(uri, label) pairs, from a CSV of uri,label (a URI may be on several rows) or, with ``folders``,
    each uri's parent folder."""
    if truth == "folders":
        return [(uri, posixpath.basename(posixpath.dirname(uri))) for uri in uris]
    check_truth_file(truth)
    pairs = [
        (storage.canonical(row[0].strip()), row[1].strip() if len(row) >= 2 else "")
        for row in csv.reader(io.StringIO(storage.read_text(truth)))
        if row and row[0].strip() and row[0].strip().lower() != "uri"
    ]
    if not any(label for _, label in pairs):
        raise UsageError(f"--truth {truth}: no uri,label rows")
    return pairs


def read_truth(truth: str, uris) -> dict[str, str]:
    """uri -> its one true label (rows without a label passed over).

    Raises:
        UsageError: the truth gives a URI two labels (a multi-label truth, for single-label results).
    """
    sets = label_sets(read_truth_rows(truth, uris))
    several = sorted(uri for uri, labels in sets.items() if len(labels) > 1)
    if several:
        raise UsageError(
            f"--truth {truth}: {counted(len(several), 'URI')} with more than one label "
            f"(e.g. {several[0]}: {', '.join(sets[several[0]])}), but the results are a single-label "
            "model's (no labels column): give one label per image, or score a multi-label model's results"
        )
    return {uri: labels[0] for uri, labels in sets.items() if labels}


def label_sets(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """uri -> its true labels, sorted (empty for a URI named only on rows without a label)."""
    sets: dict[str, set[str]] = defaultdict(set)
    for uri, label in pairs:
        sets[uri].update([label] if label else [])
    return {uri: sorted(labels) for uri, labels in sets.items()}


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


def score(results, truth: dict[str, str], model_classes: int | None = None) -> dict:
    """Metrics of the results whose URI has a true label; counts the labelled URIs without a result.

    ``model_classes``: how many classes the model has (summary.json says), when known.
    """
    matched = results[results.image_uri.isin(truth.keys())]
    labels = sorted(set(truth.values()) | set(matched.label))
    index = {label: i for i, label in enumerate(labels)}
    y_true = np.array([index[truth[uri]] for uri in matched.image_uri], dtype=np.int64)
    # A lower-ranked label that is no image's truth can never be a hit: -1 stands for it.
    ranked = np.array([[index.get(x, -1) for x in row] for row in matched.top_k_labels], dtype=np.int64)
    if len(matched) == 0:
        ranked = np.zeros((0, 1), dtype=np.int64)
    # Top-5 means something when classify ranked at least 5 labels of a model that knows more than 5,
    # however few of them the truth names. (Without summary.json, the labels the rows name tell: a
    # random 1,000-class model may rank the same 5 first for every image.)
    knows = model_classes or len({label for row in results.top_k_labels for label in row})
    metrics = classification_metrics(y_true, ranked, labels, top5=ranked.shape[1] >= 5 and knows > 5)
    metrics.setdefault("top5_accuracy", None)  # classify ran with --top_k below 5, or a small model
    metrics["labelled_without_result"] = len(set(truth) - set(results.image_uri))
    metrics["results_without_label"] = int((~results.image_uri.isin(truth.keys())).sum())
    return metrics


def score_label_sets(results, truth: dict[str, list[str]]) -> dict:
    """Multi-label metrics of the results whose URI has a truth, against their ``labels`` sets."""
    matched = results[results.image_uri.isin(truth.keys())]
    labels = sorted({x for v in truth.values() for x in v} | {x for row in matched["labels"] for x in row})
    index = {label: i for i, label in enumerate(labels)}
    y_true = np.zeros((len(matched), len(labels)), dtype=bool)
    y_pred = np.zeros_like(y_true)
    scores = np.zeros(y_true.shape, dtype=float)
    every = True  # each row scores every class of the metrics
    for row, (uri, chosen, ranked, ranked_scores) in enumerate(
        zip(matched.image_uri, matched["labels"], matched.top_k_labels, matched.top_k_scores, strict=True)
    ):
        y_true[row, [index[x] for x in truth[uri]]] = True
        y_pred[row, [index[x] for x in chosen]] = True
        for label, value in zip(ranked, ranked_scores, strict=True):
            if label in index:
                scores[row, index[label]] = value
        every = every and set(labels) <= set(ranked)
    metrics = multilabel_metrics(y_true, y_pred, scores, labels)
    metrics["multi_label"] = True
    metrics["average_precision_from"] = ALL_SCORES if every else TOP_K_SCORES
    metrics["labelled_without_result"] = len(set(truth) - set(results.image_uri))
    metrics["results_without_label"] = int((~results.image_uri.isin(truth.keys())).sum())
    return metrics


def _summary_line(metrics: dict) -> str:
    """The line that says how the results scored."""
    missing = metrics["labelled_without_result"]
    without = f"{counted(missing, 'labelled image')} {'has' if missing == 1 else 'have'} no result"
    if not metrics["examples"]:
        return "no labelled image has a result"
    if metrics.get("multi_label"):
        figures = [f"micro F1 {metrics['micro_f1']:.3f}"]
        figures += [
            f"{name} {metrics[key]:.3f}"
            for key, name in (("macro_f1", "macro F1"), ("mean_average_precision", "mAP"))
            if metrics[key] is not None
        ]
        return (
            f"{', '.join(figures)}, exact label sets {metrics['exact_match']:.1%} on "
            f"{metrics['examples']:,} labelled images; {without}"
        )
    top5 = f", top-5 {metrics['top5_accuracy']:.1%}" if metrics.get("top5_accuracy") is not None else ""
    return (
        f"accuracy {metrics['accuracy']:.1%}{top5} on {metrics['examples']:,} labelled images, macro F1 "
        f"{metrics['macro_f1']:.3f}; {without}"
    )


def run(argv: list[str] | None = None) -> dict:
    """Scores, writes metrics.json and the confusion-matrix PNG, prints a summary."""
    config = Config.from_args(parse("beamvision evaluate", __doc__.splitlines()[0], add_arguments, argv))
    output = config.output
    results = read_results(config.results, RESULT_COLUMNS, LABEL_SET_COLUMNS)
    results["image_uri"] = results.image_uri.map(storage.canonical)  # rows of runs before URIs were
    multi_label = LABELS_FIELD.name in results.columns
    if multi_label:
        truth = label_sets(read_truth_rows(config.truth, results.image_uri))
        check_matched(config, results, truth)
        metrics = score_label_sets(results, truth)
    else:
        truth = read_truth(config.truth, results.image_uri)
        check_matched(config, results, truth)
        model_classes = len(read_summary(config.results).get("model", {}).get("labels", [])) or None
        metrics = score(results, truth, model_classes)
    storage.write_atomic(storage.join(output, METRICS_FILE), json.dumps(metrics, indent=2).encode())
    written = f"metrics: {storage.join(output, METRICS_FILE)}"
    if not multi_label:  # a confusion matrix is of one label per image
        with tempfile.TemporaryDirectory() as tmp:
            png = os.path.join(tmp, CONFUSION_FILE)
            save_confusion_png(metrics, png, config.results)
            storage.write_atomic(storage.join(output, CONFUSION_FILE), local_path=png)
        written += f", confusion matrix: {storage.join(output, CONFUSION_FILE)}"
    print(_summary_line(metrics))
    print(written)
    return metrics
