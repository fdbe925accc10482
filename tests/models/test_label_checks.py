"""Label checks over features: out-of-sample probabilities find flipped labels, outliers and neighbours by distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.errors import NotEnoughData
from models.label_checks import (
    UnitRows,
    cross_validated_probs,
    find_label_problems,
    nearest_neighbours,
    outlier_scores,
)
from models.training import TrainConfig

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _blobs(n_per_class: int = 60, classes: int = 4, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well separated Gaussian clusters, one per class: the right label of every row is known."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4.0, size=(classes, dim))
    labels = np.repeat(np.arange(classes), n_per_class)
    return (centres[labels] + rng.normal(0, 1.0, size=(len(labels), dim))).astype(np.float32), labels


def test_flipped_labels_get_the_lowest_quality_and_their_true_class_as_suggestion() -> None:
    features, truth = _blobs()
    given = truth.copy()
    flipped = np.arange(0, len(given), 24)  # 10 flips, spread over every class
    given[flipped] = (given[flipped] + 1) % 4
    cv = cross_validated_probs(features, given, num_classes=4, folds=5)
    found = find_label_problems(given, cv.probs)
    assert cv.folds == 5 and cv.probs.shape == (240, 4)
    assert set(np.argsort(found.quality)[: len(flipped)]) == set(flipped)  # the flips rank first, all of them
    assert (found.suggested[flipped] == truth[flipped]).all()
    assert found.issue[flipped].all() and found.issue.sum() <= 2 * len(flipped)
    assert 5 <= found.estimated_issues <= 20


def test_out_of_sample_means_a_row_never_sees_its_own_label() -> None:
    # A single mislabelled point sitting inside another class's cluster: a head that saw its label could fit it,
    # the K-fold head that did not see it calls it by its cluster.
    features, truth = _blobs(n_per_class=20, classes=2)
    given = truth.copy()
    given[3] = 1
    cv = cross_validated_probs(features, given, num_classes=2, folds=4)
    assert cv.probs[3, 0] > 0.9


def test_too_few_labels_are_refused_and_tiny_sets_shrink_the_folds() -> None:
    with pytest.raises(NotEnoughData, match="at least 4 labelled images in at least 2 categories"):
        cross_validated_probs(np.zeros((3, 2)), np.array([0, 1, 0]), num_classes=2)
    with pytest.raises(NotEnoughData):
        cross_validated_probs(np.zeros((10, 2)), np.zeros(10, dtype=int), num_classes=2)
    features, labels = _blobs(n_per_class=3, classes=2)
    assert cross_validated_probs(features, labels, num_classes=2, folds=5).folds == 3


def test_a_class_with_no_labels_in_the_check_does_not_break_the_issue_count() -> None:
    features, labels = _blobs(n_per_class=30, classes=3)
    cv = cross_validated_probs(features, labels, num_classes=5, folds=3)  # classes 3 and 4 have no labels yet
    found = find_label_problems(labels, cv.probs)
    assert found.issue.sum() == 0 and found.estimated_issues == 0 and (found.suggested < 3).all()


def test_outlier_scores_rank_the_point_far_from_everything_first() -> None:
    features, _ = _blobs(n_per_class=30, classes=3)
    odd = np.full((1, features.shape[1]), 0.0, dtype=np.float32)
    odd[0, 0] = -50.0  # a direction no cluster points in
    pool = np.concatenate([features, odd])
    scores = outlier_scores(pool, pool, k=5, same_rows=True)
    assert int(np.argmax(scores)) == len(pool) - 1
    assert np.isnan(outlier_scores(pool[:2], pool[:0])).all()  # nothing labelled to compare with


def test_nearest_neighbours_are_the_same_cluster_most_similar_first() -> None:
    features, labels = _blobs(n_per_class=30, classes=3)
    rows, sims = nearest_neighbours(features[0], features, k=10)
    assert rows[0] == 0 and sims[0] == pytest.approx(1.0, abs=1e-5)
    assert (labels[rows] == labels[0]).all() and (np.diff(sims) <= 1e-9).all()


def test_outlier_scores_are_mean_cosine_distances_to_the_k_nearest_and_reuse_kept_references() -> None:
    rng = np.random.default_rng(3)
    refs, queries = rng.normal(size=(300, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sims = unit(queries).astype(np.float64) @ unit(refs).T.astype(np.float64)
    expected = 1.0 - np.sort(sims, axis=1)[:, -7:].mean(axis=1)
    assert np.allclose(outlier_scores(queries, refs, k=7), expected, atol=1e-5)
    kept = UnitRows(refs)  # normalised once, scored against batch after batch (a prediction refresh)
    assert np.allclose(outlier_scores(queries, kept, k=7), expected, atol=1e-5)
    # Against themselves, a row is not its own neighbour: an exact twin scores 0, a lone row does not.
    twins = np.concatenate([queries[:1], queries[:1], refs[:50]])
    alone = outlier_scores(twins, twins, k=1, same_rows=True)
    assert alone[0] == pytest.approx(0.0, abs=1e-6) and alone[1] == pytest.approx(0.0, abs=1e-6)
    assert (alone[2:] > 0.01).all()


@needs_cuda
def test_on_a_gpu_the_head_fit_and_outlier_scores_give_the_cpu_answers() -> None:
    features, labels = _blobs(n_per_class=200, classes=5, dim=64)
    on_cpu = cross_validated_probs(features, labels, num_classes=5, folds=4, config=TrainConfig(device="cpu"))
    on_gpu = cross_validated_probs(features, labels, num_classes=5, folds=4, config=TrainConfig(device="cuda"))
    assert on_gpu.l2 == on_cpu.l2
    assert np.abs(on_gpu.probs - on_cpu.probs).max() < 1e-3
    cpu_scores = outlier_scores(features, features, same_rows=True)
    gpu_scores = outlier_scores(features, UnitRows(features, "cuda"), same_rows=True)
    assert np.allclose(gpu_scores, cpu_scores, atol=1e-5)
