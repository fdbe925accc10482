"""Exceptions the pure ML library raises on purpose; `core` translates them into user-facing errors."""

from __future__ import annotations


class CheckpointInvalid(ValueError):
    """A checkpoint or its JSON sidecar is missing, corrupt, not safetensors, or does not match its architecture."""


class TrainingStopped(Exception):
    """Raised inside a training loop when `should_stop()` returned True (the user cancelled)."""


class NotEnoughData(ValueError):
    """Too few images (or classes) to train or calibrate: the message says how many are needed."""


class WeightsInvalid(ValueError):
    """A pretrained weights file is missing, unreadable, truncated or made for another architecture."""


class WeightsUnavailable(RuntimeError):
    """The pretrained weights source that was asked for explicitly cannot be used here (offline, not installed)."""
