"""Classification metrics, shared by ``train`` (test split) and ``evaluate`` (classify output).

Plain numpy, so both commands report exactly the same figures the same way:
accuracy, top-5 accuracy where there are more than 5 classes, per-class
precision/recall/F1/support, macro averages and the confusion matrix (rows:
true class, columns: predicted class). For multi-label models
(``multilabel_metrics``): micro and macro F1, per-class precision/recall/F1,
support and average precision, mean average precision, exact-match ratio and
Hamming loss; ``choose_thresholds`` picks each class's decision threshold.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Top-k accuracy is reported for this k, where there are more labels than k.
TOP_K = 5


def classification_metrics(
    y_true: np.ndarray, ranked: np.ndarray, labels: list[str], top5: bool | None = None
) -> dict[str, Any]:
    """Metrics for predictions ranked best first.

    Args:
        y_true: true class indices, shape [n].
        ranked: predicted class indices, best first, shape [n, k] (k >= 1);
            -1 for a predicted class outside ``labels``.
        labels: class names; index i names class i.
        top5: report top-5 accuracy; by default when there are more than 5
            labels (a model may know more classes than the labels scored).

    Returns:
        A JSON-ready dict.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    ranked = np.asarray(ranked, dtype=np.int64).reshape(len(y_true), -1)
    n_classes = len(labels)
    y_pred = ranked[:, 0] if len(y_true) else np.zeros(0, dtype=np.int64)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    true_positives = np.diag(confusion).astype(float)
    predicted = confusion.sum(axis=0).astype(float)
    support = confusion.sum(axis=1).astype(float)
    precision = np.divide(true_positives, predicted, out=np.zeros(n_classes), where=predicted > 0)
    recall = np.divide(true_positives, support, out=np.zeros(n_classes), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(n_classes), where=denominator > 0)
    metrics: dict[str, Any] = {
        "examples": len(y_true),
        "accuracy": float(np.mean(y_pred == y_true)) if len(y_true) else None,
    }
    if (n_classes > TOP_K) if top5 is None else top5:
        top5 = ranked[:, :TOP_K]
        metrics["top5_accuracy"] = (
            float(np.mean(np.any(top5 == y_true[:, None], axis=1))) if len(y_true) else None
        )
    present = support > 0
    metrics["macro_precision"] = float(precision[present].mean()) if present.any() else None
    metrics["macro_recall"] = float(recall[present].mean()) if present.any() else None
    metrics["macro_f1"] = float(f1[present].mean()) if present.any() else None
    metrics["per_class"] = _per_class(labels, precision, recall, f1, support)
    metrics["labels"] = list(labels)
    metrics["confusion_matrix"] = confusion.tolist()
    return metrics


def average_precision(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """Average precision of one class (scikit-learn's ``average_precision_score``).

    The sum over distinct score thresholds, highest first, of precision times
    the gain in recall; None where the class has no positive.
    """
    truth = np.asarray(truth, dtype=bool)
    positives = int(truth.sum())
    if positives == 0:
        return None
    order = np.argsort(-np.asarray(scores, dtype=float), kind="mergesort")
    sorted_scores = np.asarray(scores, dtype=float)[order]
    hits = np.cumsum(truth[order])
    # One point per distinct score: the last index of each run of tied scores.
    last = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    true_positives = hits[last].astype(float)
    precision = true_positives / (last + 1)
    recall = true_positives / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1(true_positives, predicted, actual):
    precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0)
    recall = np.divide(true_positives, actual, out=np.zeros_like(true_positives), where=actual > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return precision, recall, f1


def multilabel_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None, labels: list[str]
) -> dict[str, Any]:
    """Metrics for multi-label predictions.

    Args:
        y_true: multi-hot truth, shape [n, classes].
        y_pred: multi-hot predictions (score at or above the class's threshold).
        scores: each class's score, shape [n, classes] (0 for a class not
            scored); None to leave average precision out.
        labels: class names; index i names column i.

    Returns:
        A JSON-ready dict: ``micro_f1``, ``macro_f1`` (over classes with a
        positive), ``mean_average_precision``, ``exact_match``,
        ``hamming_loss``, ``per_class``, ``examples``, ``labels``.
    """
    n_classes = len(labels)
    y_true = np.asarray(y_true, dtype=bool).reshape(-1, n_classes)
    y_pred = np.asarray(y_pred, dtype=bool).reshape(-1, n_classes)
    examples = len(y_true)
    true_positives = (y_true & y_pred).sum(axis=0).astype(float)
    predicted = y_pred.sum(axis=0).astype(float)
    support = y_true.sum(axis=0).astype(float)
    precision, recall, f1 = _f1(true_positives, predicted, support)
    _, _, micro = _f1(
        np.array([true_positives.sum()]), np.array([predicted.sum()]), np.array([support.sum()])
    )
    present = support > 0
    ap = (
        [average_precision(y_true[:, i], scores[:, i]) for i in range(n_classes)]
        if scores is not None
        else []
    )
    scored = [a for a in ap if a is not None]
    metrics: dict[str, Any] = {
        "examples": examples,
        "micro_f1": float(micro[0]) if examples else None,
        "macro_f1": float(f1[present].mean()) if present.any() else None,
        "mean_average_precision": float(np.mean(scored)) if scored else None,
        "exact_match": float(np.mean(np.all(y_true == y_pred, axis=1))) if examples else None,
        "hamming_loss": float(np.mean(y_true != y_pred)) if examples else None,
    }
    extra = [{"average_precision": value} for value in ap] if scores is not None else None
    metrics["per_class"] = _per_class(labels, precision, recall, f1, support, extra)
    metrics["labels"] = list(labels)
    return metrics


# The thresholds choose_thresholds tries for each class.
THRESHOLD_GRID = np.round(np.arange(0.05, 1.0, 0.05), 2)
DEFAULT_THRESHOLD = 0.5


def choose_thresholds(y_true: np.ndarray, scores: np.ndarray, labels: list[str]) -> dict[str, float]:
    """Each class's threshold: the one in ``THRESHOLD_GRID`` that maximises its F1 on ``y_true``.

    Ties go to the threshold closest to 0.5; a class without a positive in
    ``y_true`` keeps ``DEFAULT_THRESHOLD``.
    """
    y_true = np.asarray(y_true, dtype=bool).reshape(-1, len(labels))
    scores = np.asarray(scores, dtype=float).reshape(-1, len(labels))
    preference = np.argsort(np.abs(THRESHOLD_GRID - DEFAULT_THRESHOLD), kind="stable")
    thresholds = {}
    for i, label in enumerate(labels):
        truth = y_true[:, i]
        if not truth.any():
            thresholds[label] = DEFAULT_THRESHOLD
            continue
        predicted = scores[:, i][None, :] >= THRESHOLD_GRID[:, None]
        true_positives = (predicted & truth).sum(axis=1).astype(float)
        _, _, f1 = _f1(
            true_positives,
            predicted.sum(axis=1).astype(float),
            np.full(len(THRESHOLD_GRID), truth.sum(), dtype=float),
        )
        best = preference[np.argmax(f1[preference])]
        thresholds[label] = float(THRESHOLD_GRID[best])
    return thresholds


# Beyond this many classes the picture shows the most frequent ones and "other";
# metrics.json keeps the whole matrix.
CLASSES_IN_PICTURE = 30


def most_frequent_classes(matrix: np.ndarray, labels: list[str], limit: int) -> tuple[np.ndarray, list[str]]:
    """The confusion matrix over the ``limit - 1`` classes with the most images, the rest summed as "other".

    A class's count is its true plus its predicted images; the kept classes stay
    in their original order, and every image is still counted once.
    """
    if len(labels) <= limit:
        return matrix, list(labels)
    counts = matrix.sum(axis=0) + matrix.sum(axis=1)
    keep = np.sort(np.argsort(-counts, kind="stable")[: limit - 1])
    position = np.full(len(labels), len(keep))
    position[keep] = np.arange(len(keep))
    small = np.zeros((limit, limit), dtype=matrix.dtype)
    np.add.at(small, (position[:, None], position[None, :]), matrix)
    return small, [labels[i] for i in keep] + [f"other ({len(labels) - len(keep)} classes)"]


def save_confusion_png(metrics: dict[str, Any], path: str, title: str) -> None:
    """Draws the confusion matrix of ``metrics`` to a local PNG file, readable at any class count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix, labels = most_frequent_classes(
        np.asarray(metrics["confusion_matrix"]), metrics["labels"], CLASSES_IN_PICTURE
    )
    size = max(4.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = metrics.get("accuracy")
    ax.set_title(f"{title} (accuracy {accuracy:.1%})" if accuracy is not None else title)
    if len(labels) <= 30:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (row, col), value in np.ndenumerate(matrix):
            ax.text(
                col,
                row,
                str(value),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value > threshold else "black",
            )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_training_curves_png(history: dict[str, list[float]], monitor: str, path: str, title: str) -> None:
    """Draws loss and ``monitor`` per epoch, train and validation, side by side, to a local PNG file.

    When ``monitor`` is the loss, the second panel shows the first other validation metric
    (accuracy, or F1 on multi-label data).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [key for key in history if key.startswith("val_") and key != "val_loss"]
    second = others[0] if monitor == "val_loss" and others else monitor
    names = list(dict.fromkeys(["loss", second.removeprefix("val_")]))
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for key, label in ((name, "train"), (f"val_{name}", "val")):
            values = history.get(key)
            if values:
                ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _per_class(labels, precision, recall, f1, support, extra: list[dict] | None = None) -> dict[str, dict]:
    """label -> its precision, recall, F1 and support (and ``extra[i]``), as metrics.json holds them."""
    return {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
            **(extra[i] if extra else {}),
        }
        for i, label in enumerate(labels)
    }
