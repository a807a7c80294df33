"""Multi-label metrics and thresholds (plain numpy), checked against scikit-learn's definitions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, hamming_loss

from beamvision.models.metrics import (
    DEFAULT_THRESHOLD,
    THRESHOLD_GRID,
    average_precision,
    choose_thresholds,
    multilabel_metrics,
)

LABELS = ["person", "dog", "car", "tree"]


@pytest.fixture
def predictions():
    """Scores that carry the truth plus noise, with tied scores; "tree" has no positive."""
    rng = np.random.default_rng(7)
    truth = rng.random((200, 4)) < [0.5, 0.3, 0.1, 0.0]
    scores = np.clip(truth * 0.4 + rng.random((200, 4)) * 0.6, 0, 1).round(2)  # ties at 2 decimals
    return truth, scores


def test_metrics_match_scikit_learn(predictions):
    truth, scores = predictions
    predicted = scores >= 0.5
    metrics = multilabel_metrics(truth, predicted, scores, LABELS)
    present = truth.any(axis=0)
    assert metrics["examples"] == 200
    assert metrics["micro_f1"] == pytest.approx(f1_score(truth, predicted, average="micro"))
    assert metrics["macro_f1"] == pytest.approx(
        f1_score(truth[:, present], predicted[:, present], average="macro")
    )
    assert metrics["hamming_loss"] == pytest.approx(hamming_loss(truth, predicted))
    assert metrics["exact_match"] == pytest.approx(np.mean(np.all(truth == predicted, axis=1)))
    for i, label in enumerate(LABELS[:3]):
        expected = average_precision_score(truth[:, i], scores[:, i])
        assert metrics["per_class"][label]["average_precision"] == pytest.approx(expected)
        assert metrics["per_class"][label]["support"] == int(truth[:, i].sum())
    assert metrics["per_class"]["tree"]["average_precision"] is None
    expected_map = np.mean([average_precision_score(truth[:, i], scores[:, i]) for i in range(3)])
    assert metrics["mean_average_precision"] == pytest.approx(expected_map)


def test_average_precision_of_a_perfect_ranking_is_one():
    assert average_precision(np.array([0, 1, 1, 0]), np.array([0.1, 0.9, 0.8, 0.2])) == 1.0
    assert average_precision(np.array([0, 0]), np.array([0.1, 0.9])) is None


def test_thresholds_maximise_each_class_f1_on_validation(predictions):
    truth, scores = predictions
    thresholds = choose_thresholds(truth, scores, LABELS)
    assert thresholds["tree"] == DEFAULT_THRESHOLD  # no positive: the default
    for i, label in enumerate(LABELS[:3]):
        chosen = f1_score(truth[:, i], scores[:, i] >= thresholds[label])
        for other in THRESHOLD_GRID:
            assert chosen >= f1_score(truth[:, i], scores[:, i] >= other, zero_division=0) - 1e-12
    # Chosen thresholds do at least as well as 0.5 everywhere on the split they were chosen on.
    tuned = scores >= np.array([thresholds[label] for label in LABELS])
    assert (
        multilabel_metrics(truth, tuned, scores, LABELS)["micro_f1"]
        >= multilabel_metrics(truth, scores >= 0.5, scores, LABELS)["micro_f1"]
    )
