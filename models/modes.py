"""Training modes, shared by the ML library and the application without importing torch."""

from __future__ import annotations

from enum import StrEnum


class TrainMode(StrEnum):
    """How a retrain fits: QUICK refits the classifier head on cached backbone features, FULL fine-tunes every layer."""

    QUICK = "quick"
    FULL = "full"
