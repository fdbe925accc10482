"""Splits come from the content hash: deterministic, in the configured proportions, and validated."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from core.catalog.splits import split_for_hash
from core.schema import Split


def _hashes(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


def test_split_is_a_pure_function_of_the_hash() -> None:
    hashes = _hashes(200)
    first = [split_for_hash(h, (0.8, 0.1, 0.1)) for h in hashes]
    assert first == [split_for_hash(h, (0.8, 0.1, 0.1)) for h in hashes]
    assert set(first) == {Split.TRAIN, Split.VAL, Split.TEST}
    # The same bytes uploaded by anyone, anywhere, land in the same split.
    sha = hashlib.sha256(b"the same photo").hexdigest()
    assert split_for_hash(sha, (0.8, 0.1, 0.1)) == split_for_hash(sha.lower(), [0.8, 0.1, 0.1])


def test_proportions_follow_the_fractions() -> None:
    counts = Counter(split_for_hash(h, (0.7, 0.2, 0.1)) for h in _hashes(20_000))
    assert abs(counts[Split.TRAIN] / 20_000 - 0.7) < 0.02
    assert abs(counts[Split.VAL] / 20_000 - 0.2) < 0.02
    assert abs(counts[Split.TEST] / 20_000 - 0.1) < 0.02


def test_boundaries_and_degenerate_fractions() -> None:
    assert split_for_hash("0" * 64, (0.8, 0.1, 0.1)) == Split.TRAIN
    assert split_for_hash("f" * 64, (0.8, 0.1, 0.1)) == Split.TEST
    assert split_for_hash("f" * 64, (0.9, 0.1, 0.0)) == Split.VAL  # an empty test share is never chosen
    assert {split_for_hash(h, (1.0, 0.0, 0.0)) for h in _hashes(500)} == {Split.TRAIN}


@pytest.mark.parametrize(
    ("sha", "fractions", "message"),
    [
        ("a" * 64, (0.5, 0.5, 0.5), "summing to 1"),
        ("a" * 64, (1.2, -0.1, -0.1), "non-negative"),
        ("a" * 64, (0.5, 0.5), "three"),
        ("not-a-hash", (0.8, 0.1, 0.1), "not a hex digest"),
        ("abc", (0.8, 0.1, 0.1), "too short"),
    ],
)
def test_bad_arguments_are_refused_clearly(sha: str, fractions: tuple[float, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_for_hash(sha, fractions)
