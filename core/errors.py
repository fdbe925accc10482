"""Exceptions `core` raises on purpose. Each message says what went wrong and what to do; pages show it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime


class ProdcatError(Exception):
    """Base of every refusal a user can act on (pages catch it and show `st.error(str(exc))`)."""


class ImageRefused(ProdcatError):
    """A file is not an image we accept. `name` is the file as the user knows it, `reason` why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason
        self.image_id: int | None = None  # set when the file is a stored catalogue image


class ArchiveRefused(ProdcatError):
    """A whole archive is refused (encrypted, too many entries, not a zip...)."""


class NotFound(ProdcatError):
    """An image, category, model version or job id that does not exist."""


class CategoryError(ProdcatError):
    """Category name empty, too long, duplicate, archived, or a merge onto itself."""


class TrainingRefused(ProdcatError):
    """Training cannot start: too little data, a job already queued or running, bad parameters."""


class CheckpointError(ProdcatError):
    """A checkpoint or its sidecar is missing, corrupt, or not a safetensors file."""


class JobCancelled(ProdcatError):
    """Raised inside a training run when the user asked to cancel it."""


class DatabaseBusy(ProdcatError):
    """Another program held the database's write lock for longer than a writer waits (core.db.WRITE_WAIT_S)."""


class DeviceUnavailable(ProdcatError):
    """PRODCAT_DEVICE names hardware this machine does not have (`cuda` without CUDA, `cuda:1` with one GPU)."""


class DuplicateRefused(ProdcatError):
    """"Keep this one" cannot run: the kept image is not in the group, or the group has one image."""


@dataclass(frozen=True)
class ConflictingLabel:
    """One image whose label changed after the person saw it: what they saw, what it is now, who changed it, when."""

    image_id: int
    expected: str | None  # the label the person saw (None: unlabelled)
    current: str | None  # the label now (None: unlabelled)
    changed_by: str | None  # actor of the image's latest label event (None: no event recorded)
    changed_at: datetime | None
    action: str | None  # that event's action (set, bulk, merge, undo...)

    def describe(self) -> str:
        """`image 12 is now 'Bags' (changed by bob, 2024-05-01 10:12 UTC; you saw 'Shoes')`."""
        now = repr(self.current) if self.current is not None else "unlabelled"
        seen = repr(self.expected) if self.expected is not None else "it unlabelled"
        when = f", {self.changed_at:%Y-%m-%d %H:%M} UTC" if self.changed_at is not None else ""
        who = f" (changed by {self.changed_by}{when}; you saw {seen})" if self.changed_by else f" (you saw {seen})"
        return f"image {self.image_id} is now {now}{who}"


class LabelConflict(ProdcatError):
    """A label change was refused because an image's label changed since the person saw it; nothing was written.

    `conflicts` has one entry per image in the way; `image_id`, `current`, `changed_by` and `changed_at` are the
    first one's, for the single-image case.
    """

    def __init__(self, message: str, conflicts: Sequence[ConflictingLabel]) -> None:
        super().__init__(message)
        self.conflicts = list(conflicts)
        first = self.conflicts[0]
        self.image_id = first.image_id
        self.expected = first.expected
        self.current = first.current
        self.changed_by = first.changed_by
        self.changed_at = first.changed_at
