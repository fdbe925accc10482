"""Train/val/test assignment fixed per image from its content hash (pure, deterministic)."""

from __future__ import annotations

from collections.abc import Sequence

from core.schema import Split

_SPLITS = (Split.TRAIN, Split.VAL, Split.TEST)


def split_for_hash(sha256_hex: str, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> Split:
    """The split of an image with this SHA-256: the first 64 bits as a uniform number in [0, 1) against
    the cumulative train/val/test shares. The same bytes always land in the same split on every machine.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative shares summing to 1, got {tuple(fractions)}")
    try:
        position = int(sha256_hex[:16], 16) / 2**64
    except ValueError:
        raise ValueError(f"not a hex digest: {sha256_hex!r}") from None
    if len(sha256_hex) < 16:
        raise ValueError(f"hex digest too short: {sha256_hex!r}")
    cumulative = 0.0
    for split, share in zip(_SPLITS, fractions, strict=True):
        cumulative += share
        if position < cumulative:
            return split
    # Rounding can leave the top sliver uncovered: give it to the last split with a non-zero share.
    return next(s for s, f in zip(reversed(_SPLITS), reversed(tuple(fractions)), strict=True) if f > 0)
