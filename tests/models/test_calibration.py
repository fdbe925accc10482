"""Temperature scaling recovers a known temperature and handles degenerate input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.calibration import apply_temperature, fit_temperature


def _sample(temperature: float, n: int = 4000, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / temperature): the true temperature is known."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n, classes))
    probs = torch.softmax(torch.from_numpy(logits) / temperature, dim=1).numpy()
    labels = np.array([rng.choice(classes, p=p) for p in probs])
    return logits.astype(np.float32), labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_recovers_a_known_temperature(true_t: float) -> None:
    logits, labels = _sample(true_t)
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.1)


def test_empty_input_gives_one() -> None:
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=np.int64)) == 1.0


def test_result_is_clamped() -> None:
    # Always right with huge margins: the NLL keeps falling as T shrinks, so it must stop at the floor.
    logits = np.tile(np.array([[1.0, 0.0, 0.0]]), (20, 1))
    assert fit_temperature(logits, np.zeros(20, dtype=np.int64)) == pytest.approx(0.05)
    # Always wrong: the NLL keeps falling as T grows (towards uniform), so it must stop at the ceiling.
    assert fit_temperature(logits, np.ones(20, dtype=np.int64)) == pytest.approx(20.0)


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="do not match"):
        fit_temperature(np.zeros((3, 2)), np.zeros(4, dtype=np.int64))


def test_apply_temperature_softens() -> None:
    probs = apply_temperature(np.array([[2.0, 0.0]]), 2.0)
    assert probs.sum() == pytest.approx(1.0)
    assert probs[0, 0] == pytest.approx(1 / (1 + np.exp(-1.0)), rel=1e-5)
