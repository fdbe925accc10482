"""Exceptions `core` raises on purpose. Each message says what went wrong and what to do; pages show it."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import exc as sa_exc


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


class StorageError(ProdcatError):
    """The database or the disk of the data directory refused: locked, read-only, full, an I/O error, unreachable.

    Made from the driver's error by `as_storage_error`; its message says what to do and never holds SQL, parameters
    or paths (the data directory is named by its folder name only). The full error belongs in the server log.
    """


# Driver messages (lower case; SQLite, PostgreSQL/psycopg, the OS) -> what a person reads. {place} is the data
# directory's folder name. The first match wins.
_STORAGE_MESSAGES: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        (
            "database is locked",
            "database is busy",
            "database table is locked",
            "lock timeout",
            "deadlock detected",
            "queuepool limit",
        ),
        "the database is busy: another program (an import, a worker, a backup?) holds it locked; nothing was "
        "changed, try again in a moment",
    ),
    (
        ("read-only transaction", "read-only sql transaction"),
        "the database is read-only: PRODCAT_DATABASE_URL must name a writable server and a role that may write; "
        "nothing was changed",
    ),
    (
        ("readonly database", "read-only", "read only file system"),
        "the database is read-only: check the permissions of the data directory '{place}' and of the database file "
        "in it (prodcat must be able to write both); nothing was changed",
    ),
    (
        ("database or disk is full", "no space left", "disk quota", "could not extend file"),
        "the disk holding the data directory '{place}' is full: free some space, then try again; the step that "
        "failed was not saved",
    ),
    (
        ("disk i/o error", "input/output error"),
        "the disk holding the data directory '{place}' reported an I/O error: check the disk, then try again",
    ),
    (
        ("unable to open database file",),
        "the database file in the data directory '{place}' cannot be opened: check that the folder exists and that "
        "prodcat may read and write it",
    ),
    (
        ("malformed", "file is not a database", "database corrupt"),
        "the database file in the data directory '{place}' is damaged or is not a prodcat database: restore it from "
        "a backup",
    ),
    (
        (
            "connection refused",
            "could not connect",
            "connection failed",
            "server closed the connection",
            "terminating connection",
            "no route to host",
            "timeout expired",
        ),
        "the database server cannot be reached: check that it is running and what PRODCAT_DATABASE_URL names, then "
        "try again",
    ),
)
# EFBIG: a file may grow no further (the file system's or the process's size limit, RLIMIT_FSIZE): for a person it
# is a full disk, like ENOSPC and EDQUOT.
_DISK_ERRNOS = {
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "disk quota",
    errno.EFBIG: "no space left",
    errno.EROFS: "read only file system",
    errno.EIO: "input/output error",
}


def as_storage_error(exc: BaseException, place: str = "") -> StorageError | None:
    """The StorageError a person should see for a database or disk failure, or None when `exc` is not one (a bug:
    let it propagate). `place` is the data directory's folder name (default: the configured one's).

    Recognised by the driver's message (SQLite's and PostgreSQL's: locked, read-only, full, I/O, cannot open, damaged,
    unreachable) in SQLAlchemy's and the drivers' errors and pool timeouts, and OSErrors of a full, read-only or
    failing disk. Anything else is not a StorageError: SQLite reports a syntax error or a missing table as an
    OperationalError too, and an IntegrityError or a ProgrammingError is a bug.
    """
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, OSError):
        text = _DISK_ERRNOS.get(exc.errno or 0, "")
    elif isinstance(exc, sa_exc.SQLAlchemyError | sqlite3.Error) and not isinstance(
        exc, sa_exc.IntegrityError | sa_exc.ProgrammingError | sqlite3.IntegrityError | sqlite3.ProgrammingError
    ):
        text = str(getattr(exc, "orig", None) or exc)  # the driver's own message, without SQL and parameters
    else:
        return None
    text = text.lower()
    for needles, message in _STORAGE_MESSAGES:
        if any(needle in text for needle in needles):
            return StorageError(message.format(place=place or _data_dir_name()))
    return None


def _data_dir_name() -> str:
    try:
        from core.settings import get_settings

        return get_settings().data_dir.name
    except Exception:  # settings that do not validate: say "data directory" without a name
        return "data"


class CatalogueRefused(ProdcatError):
    """The database and the data directory belong to different catalogues, or the database went missing from a data
    directory that holds a catalogue's files (core.catalogue_identity)."""


class DeviceUnavailable(ProdcatError):
    """PRODCAT_DEVICE names hardware this machine does not have (`cuda` without CUDA, `cuda:1` with one GPU)."""


class DuplicateRefused(ProdcatError):
    """ "Keep this one" cannot run: the kept image is not in the group, or the group has one image."""


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
