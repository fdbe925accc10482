"""Evaluation metrics on synthetic predictions whose right answers are known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.metrics import (
    classification_metrics,
    entropy_scores,
    expected_calibration_error,
    label_quality_scores,
    margin_scores,
)

NAMES = ["a", "b", "c"]


def _one_hot(indices: list[int], classes: int = 3, confidence: float = 1.0) -> np.ndarray:
    rest = (1 - confidence) / (classes - 1)
    probs = np.full((len(indices), classes), rest)
    probs[np.arange(len(indices)), indices] = confidence
    return probs


def test_perfect_predictions() -> None:
    y = np.array([0, 1, 2, 2, 1, 0])
    result = classification_metrics(y, _one_hot(list(y)), NAMES)
    assert result["accuracy"] == 1.0
    assert result["macro_f1"] == 1.0
    assert result["ece"] == pytest.approx(0.0)
    assert result["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert result["per_class"]["b"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    json.dumps(result)  # must be storable as JSON as is


def test_known_confusion_matrix_rows_true_columns_predicted() -> None:
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = [0, 1, 1, 1, 1, 0]
    result = classification_metrics(y, _one_hot(pred, confidence=0.8), NAMES)
    assert result["confusion_matrix"] == [[1, 2, 0], [0, 2, 0], [1, 0, 0]]
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert result["per_class"]["a"]["recall"] == pytest.approx(1 / 3)
    assert result["per_class"]["b"]["precision"] == pytest.approx(2 / 4)
    assert result["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert result["n"] == 6
    # All confidences 0.8 in one bin, accuracy 0.5 there: ECE is exactly |0.5 - 0.8|.
    assert result["ece"] == pytest.approx(0.3)
    full_bins = [b for b in result["reliability"] if b["count"]]
    assert len(full_bins) == 1
    assert full_bins[0]["lo"] < 0.8 <= full_bins[0]["hi"]
    assert full_bins[0]["accuracy"] == pytest.approx(0.5)


def test_ece_is_zero_for_calibrated_bins() -> None:
    # 10 predictions at 0.7 with 7 right, 10 at 0.9 with 9 right: perfectly calibrated.
    y = np.array([0] * 7 + [1] * 3 + [0] * 9 + [2])
    probs = np.vstack([_one_hot([0] * 10, confidence=0.7), _one_hot([0] * 10, confidence=0.9)])
    assert expected_calibration_error(probs, y, n_bins=10) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(probs, np.ones(20, dtype=int), n_bins=10) == pytest.approx(0.8)


def test_reliability_bins_cover_zero_to_one() -> None:
    result = classification_metrics(np.array([0]), _one_hot([0]), NAMES, n_bins=5)
    bins = result["reliability"]
    assert [b["lo"] for b in bins] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    assert bins[-1]["hi"] == 1.0
    assert bins[-1]["count"] == 1


def test_empty_evaluation_is_explicit() -> None:
    result = classification_metrics(np.zeros(0, dtype=int), np.zeros((0, 3)), NAMES)
    assert result["n"] == 0
    assert result["accuracy"] is None


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="class names"):
        classification_metrics(np.array([0]), _one_hot([0]), ["a", "b"])
    with pytest.raises(ValueError, match="class indices"):
        classification_metrics(np.array([3]), _one_hot([0]), NAMES)


def test_margin_and_entropy_rank_uncertainty() -> None:
    probs = np.array([[0.98, 0.01, 0.01], [0.5, 0.45, 0.05], [1 / 3, 1 / 3, 1 / 3]])
    margins = margin_scores(probs)
    assert margins == pytest.approx([0.97, 0.05, 0.0])
    entropy = entropy_scores(probs)
    assert entropy[2] == pytest.approx(np.log(3))
    assert entropy[0] < entropy[1] < entropy[2]


def test_label_quality_flags_the_wrong_label() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 10)
    probs = _one_hot(list(labels), confidence=0.9) + rng.uniform(0, 0.01, size=(30, 3))
    probs /= probs.sum(axis=1, keepdims=True)
    given = labels.copy()
    given[4] = 2  # a mislabelled image: the model is confident it is class 0
    scores = label_quality_scores(given, probs)
    assert scores.shape == (30,)
    assert int(np.argmin(scores)) == 4
