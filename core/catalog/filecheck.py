"""The data directory's image files against the `images` rows: what a killed import or worker left behind.

An import stores files before the rows naming them and removes them again when a batch fails, so only a killed
process (or a power cut) leaves stored files without rows, or the temporary file of a write it did not finish
(`.tmp-<pid>-<thread>-<name>`). `check_files` finds those, and rows whose files are gone; `remove_strays` deletes
the strays (never a file a row names). Files younger than the grace period are left alone: an import running now
writes its batch's files up to a second or so before their rows commit, and `store_image` refreshes the time of a
stray it reuses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy import select

from core.auth import Action, authorize
from core.catalog.labels import clean_actor
from core.catalog.store import TEMP_PREFIX
from core.db import Database, in_chunks
from core.schema import Image

# Strays younger than this are left alone (an import may be about to commit their rows).
GRACE_SECONDS = 3600.0
_FOLDERS = ("images", "thumbs")


@dataclass(frozen=True)
class MissingFile:
    """A row whose original or thumbnail is not in the data directory."""

    image_id: int
    kind: Literal["original", "thumbnail"]
    path: str  # relative to the data directory


@dataclass(frozen=True)
class FileCheck:
    """What `check_files` found; paths relative to the data directory, sorted."""

    missing: tuple[MissingFile, ...]
    strays: tuple[str, ...]  # stored files no row names, older than the grace period
    leftovers: tuple[str, ...]  # temporary files of unfinished writes, older than the grace period
    recent: int  # strays and leftovers younger than the grace period, left alone
    files: int  # files looked at
    rows: int  # image rows looked at

    @property
    def clean(self) -> bool:
        return not (self.missing or self.strays or self.leftovers)


def _files(root: Path) -> Iterator[tuple[str, float]]:
    """Every file under images/ and thumbs/ (both shard layouts) as (relative POSIX path, modification time)."""
    for folder in _FOLDERS:
        for dirpath, _dirs, names in os.walk(root / folder):
            for name in names:
                path = Path(dirpath) / name
                try:
                    mtime = path.lstat().st_mtime
                except FileNotFoundError:  # removed meanwhile (a deletion, a temp file renamed)
                    continue
                yield path.relative_to(root).as_posix(), mtime


def check_files(db: Database, *, grace_seconds: float = GRACE_SECONDS) -> FileCheck:
    """Compare the files under images/ and thumbs/ with the rows (reads only)."""
    root = db.settings.data_dir
    with db.read() as session:
        rows = session.execute(select(Image.id, Image.stored_path, Image.thumb_path)).all()
    named = {path for _id, original, thumb in rows for path in (original, thumb)}
    cutoff = time.time() - grace_seconds
    strays: list[str] = []
    leftovers: list[str] = []
    recent = 0
    seen: set[str] = set()
    for rel, mtime in _files(root):
        seen.add(rel)
        if rel in named:
            continue
        if mtime > cutoff:
            recent += 1
        elif Path(rel).name.startswith(TEMP_PREFIX):
            leftovers.append(rel)
        else:
            strays.append(rel)
    missing = [
        MissingFile(int(image_id), "original" if index == 0 else "thumbnail", path)
        for image_id, original, thumb in rows
        for index, path in enumerate((original, thumb))
        if path not in seen and not (root / path).is_file()  # a row may name a file outside images/ and thumbs/
    ]
    return FileCheck(tuple(missing), tuple(sorted(strays)), tuple(sorted(leftovers)), recent, len(seen), len(rows))


def remove_strays(db: Database, found: FileCheck, *, actor: str) -> int:
    """Delete the strays and leftovers `found` lists, each checked again against the rows just before (an import may
    have stored the same bytes since); returns how many were removed. An admin's action (it deletes files)."""
    actor = clean_actor(actor)
    authorize(db, actor, Action.DELETE_IMAGES)
    candidates = list(found.strays) + list(found.leftovers)
    removed = 0
    for chunk in in_chunks(candidates):
        still_unnamed = set(chunk) - _named(db, chunk)
        for rel in sorted(still_unnamed):
            try:
                (db.settings.data_dir / rel).unlink()
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _named(db: Database, paths: Sequence[str]) -> set[str]:
    with db.read() as session:
        rows = session.execute(
            select(Image.stored_path, Image.thumb_path).where(
                Image.stored_path.in_(paths) | Image.thumb_path.in_(paths)
            )
        ).all()
    return {path for row in rows for path in row}
