"""Evaluation and review scores as pure functions over arrays: accuracy, F1, confusion, calibration, label quality."""

from __future__ import annotations

from typing import Any, overload

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


@overload
def _check(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
@overload
def _check(probs: np.ndarray, y: None = None) -> tuple[np.ndarray, None]: ...
def _check(probs: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {probs.shape}")
    if y is None:
        return probs, None
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    if y.shape[0] != probs.shape[0]:
        raise ValueError(f"{y.shape[0]} labels but {probs.shape[0]} probability rows")
    if y.size and (y.min() < 0 or y.max() >= probs.shape[1]):
        raise ValueError(f"labels must be class indices in [0, {probs.shape[1]}), got range {y.min()}..{y.max()}")
    return probs, y


ECE_BINS = 15  # equal-width confidence bins of every calibration figure: the stored ECE and the dashboard's chart


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, *, n_bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Equal-width bins of top-label confidence: per bin {lo, hi, count, accuracy, confidence} (empty bins have 0s).

    Bin i holds (lo, hi]; confidence 0 goes to the first bin.
    """
    confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct, dtype=np.float64).reshape(-1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    right = np.bincount(index, weights=correct, minlength=n_bins)
    conf = np.bincount(index, weights=confidence, minlength=n_bins)
    safe = np.maximum(count, 1)
    return [
        {
            "lo": float(edges[i]),
            "hi": float(edges[i + 1]),
            "count": int(count[i]),
            "accuracy": float(right[i] / safe[i]) if count[i] else 0.0,
            "confidence": float(conf[i] / safe[i]) if count[i] else 0.0,
        }
        for i in range(n_bins)
    ]


def calibration_error(confidence: np.ndarray, correct: np.ndarray, *, n_bins: int = ECE_BINS) -> float | None:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins (None for no data)."""
    bins = calibration_bins(confidence, correct, n_bins=n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return None
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / total)


def reliability_bins(probs: np.ndarray, y: np.ndarray, *, n_bins: int = ECE_BINS) -> list[dict[str, float]]:
    """`calibration_bins` of probability rows (N, C) against true class indices."""
    probs, y = _check(probs, y)
    confidence = probs.max(axis=1) if probs.size else np.zeros(0)
    correct = (probs.argmax(axis=1) == y) if probs.size else np.zeros(0, dtype=bool)
    return calibration_bins(confidence, correct, n_bins=n_bins)


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, *, n_bins: int = ECE_BINS) -> float:
    """`calibration_error` of probability rows against true class indices (0 for no data)."""
    probs, y = _check(probs, y)
    if y.size == 0:
        return 0.0
    return float(calibration_error(probs.max(axis=1), probs.argmax(axis=1) == y, n_bins=n_bins) or 0.0)


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, class_names: list[str], *, n_bins: int = ECE_BINS
) -> dict[str, Any]:
    """JSON-serialisable evaluation of `probs` (N, C) against true class indices.

    Keys: n, accuracy, macro_f1 (over classes present in truth or predictions), per_class {name: precision,
    recall, f1, support}, confusion_matrix (rows true, columns predicted, in class_names order), ece, reliability.
    """
    probs, y = _check(probs, y_true)
    if probs.shape[1] != len(class_names):
        raise ValueError(f"probs have {probs.shape[1]} columns but {len(class_names)} class names were given")
    labels = list(range(len(class_names)))
    n = int(y.shape[0])
    if n == 0:
        return {
            "n": 0, "accuracy": None, "macro_f1": None,
            "per_class": {name: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for name in class_names},
            "confusion_matrix": [[0] * len(class_names) for _ in class_names],
            "ece": None, "reliability": reliability_bins(probs, y, n_bins=n_bins),
        }  # fmt: skip
    pred = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, average=None, zero_division=0
    )
    present = sorted(set(y.tolist()) | set(pred.tolist()))
    return {
        "n": n,
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).astype(int).tolist(),
        "ece": expected_calibration_error(probs, y, n_bins=n_bins),
        "reliability": reliability_bins(probs, y, n_bins=n_bins),
    }


def margin_scores(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row: small margins are the model's hardest calls (1.0 for one class)."""
    probs, _ = _check(probs)
    if probs.shape[1] < 2:
        return np.ones(probs.shape[0])
    top2 = np.sort(probs, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def entropy_scores(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row: high entropy = uncertain prediction."""
    probs, _ = _check(probs)
    clipped = np.clip(probs, 1e-12, 1.0)
    return -(probs * np.log(clipped)).sum(axis=1)


def label_quality_scores(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """cleanlab's per-image label quality in [0, 1] (low = the given label is likely wrong); needs >= 2 classes."""
    from cleanlab.rank import get_label_quality_scores

    probs, y = _check(probs, labels)
    if y.size == 0:
        return np.zeros(0)
    return np.asarray(get_label_quality_scores(y, probs), dtype=np.float64)
