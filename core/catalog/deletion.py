"""Deleting images: their rows (labels, predictions and checks go with them), an audit row each, then their files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from core.auth import Action, check
from core.catalog.labels import clean_actor
from core.catalog.store import original_path, thumbnail_path
from core.db import Database
from core.errors import NotFound, ProdcatError
from core.schema import Category, Image, ImageEvent, Label


@dataclass(frozen=True)
class DeletedImage:
    """What was deleted: enough to trace it afterwards (its audit row holds the same)."""

    image_id: int
    name: str
    sha256: str
    label: str | None
    event_id: int
    files_removed: int


def delete_images(db: Database, image_ids: Sequence[int], *, actor: str, reason: str) -> list[DeletedImage]:
    """Delete these images in one transaction with an `image_events` row each ("delete", actor, reason and the
    label it had), then remove their stored original and thumbnail. Unknown ids are refused before anything
    changes. Files still named by another row are kept (one row per sha256 today, but test factories share files).
    Near-duplicate groups they leave are kept right (`_regroup`).
    """
    actor = clean_actor(actor)
    ids = list(dict.fromkeys(int(i) for i in image_ids))
    if not ids:
        raise ProdcatError("no images given to delete")
    with db.write() as session:
        check(session, db.settings.auth, actor, Action.DELETE_IMAGES)
        rows = session.execute(
            select(Image, Category.name)
            .outerjoin(Label, Label.image_id == Image.id)
            .outerjoin(Category, Category.id == Label.category_id)
            .where(Image.id.in_(ids))
        ).all()
        if missing := sorted(set(ids) - {image.id for image, _ in rows}):
            raise NotFound(f"no image with id {', '.join(map(str, missing))}: nothing was deleted")
        events = [_event(image, label, actor, reason) for image, label in rows]
        session.add_all(events)
        paths = [(image.stored_path, image.thumb_path) for image, _ in rows]
        groups = [image.duplicate_group_id for image, _ in rows if image.duplicate_group_id is not None]
        session.execute(delete(Image).where(Image.id.in_(ids)))  # labels, events, predictions cascade
        _regroup(session, groups)
        session.flush()
        deleted = [
            (image.id, image.original_name, image.sha256, label, event.id)
            for (image, label), event in zip(rows, events, strict=True)
        ]
    removed = [_remove_files(db, stored, thumb) for stored, thumb in paths]
    return [DeletedImage(*d, files_removed=n) for d, n in zip(deleted, removed, strict=True)]


def _regroup(session: Session, group_ids: Sequence[int]) -> None:
    """Keep the stored near-duplicate groups right after deleting some of their images: a group left with one
    image is no group (its id cleared); one that lost its earliest image takes the next earliest's id."""
    for group_id in sorted(set(group_ids)):
        left = sorted(session.scalars(select(Image.id).where(Image.duplicate_group_id == group_id)))
        if len(left) == 1:
            session.execute(update(Image).where(Image.id == left[0]).values(duplicate_group_id=None))
        elif left and left[0] != group_id:
            session.execute(
                update(Image).where(Image.duplicate_group_id == group_id).values(duplicate_group_id=left[0])
            )


def _event(image: Image, label: str | None, actor: str, reason: str) -> ImageEvent:
    label_text = f"label was {label!r}" if label is not None else "unlabelled"
    return ImageEvent(
        image_id=image.id,
        sha256=image.sha256,
        original_name=image.original_name,
        action="delete",
        actor=actor,
        note=f"{reason}; {label_text}; split {image.split}",
    )


@dataclass(frozen=True)
class _Paths:
    stored_path: str
    thumb_path: str


def _remove_files(db: Database, stored: str, thumb: str) -> int:
    """Remove an image's files unless another row still names them; returns how many were removed."""
    with db.read() as session:
        in_use = session.scalar(
            select(Image.id).where((Image.stored_path == stored) | (Image.thumb_path == thumb)).limit(1)
        )
    if in_use is not None:
        return 0
    removed = 0
    for path in (original_path(db.settings, _Paths(stored, thumb)), thumbnail_path(db.settings, _Paths(stored, thumb))):
        if path.is_file():
            path.unlink()
            removed += 1
    return removed
