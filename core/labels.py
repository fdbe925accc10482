"""Labels and categories: set, change, clear, bulk relabel, undo; add, rename, merge, archive; the audit trail.

Every label change writes the `labels` row and its `label_events` row in the same transaction, so the
current label and the audit trail can never disagree.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import CategoryError, NotFound
from core.schema import Category, Image, Label, LabelEvent, utcnow

MAX_CATEGORY_NAME = 200


@dataclass(frozen=True)
class SeenPrediction:
    """What the model showed the person when they labelled (stored in the audit row)."""

    model_version_id: int
    category_id: int
    confidence: float


def clean_category_name(name: str) -> str:
    """Trim and validate a category name; names are shown as text, so any printable character is fine."""
    cleaned = unicodedata.normalize("NFC", str(name)).strip()
    if not cleaned:
        raise CategoryError("category name is empty: type a name such as 'Shoes'")
    if len(cleaned) > MAX_CATEGORY_NAME:
        raise CategoryError(f"category name is {len(cleaned)} characters long; the limit is {MAX_CATEGORY_NAME}")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in cleaned):
        raise CategoryError(f"category name {cleaned!r} contains control characters")
    return cleaned


def find_category(session: Session, name_or_id: str | int) -> Category:
    """A category by id or exact name; raises NotFound naming what was asked for."""
    if isinstance(name_or_id, int):
        category = session.get(Category, name_or_id)
    else:
        category = session.scalar(select(Category).where(Category.name == clean_category_name(str(name_or_id))))
    if category is None:
        raise NotFound(f"no category {name_or_id!r}: see `categories list` for the names")
    return category


def get_or_create_category(session: Session, name: str) -> Category:
    """The live category of that name, created if new. Refuses archived ones (un-archive is explicit)."""
    cleaned = clean_category_name(name)
    category = session.scalar(select(Category).where(Category.name == cleaned))
    if category is None:
        category = Category(name=cleaned)
        session.add(category)
        session.flush()
    elif category.archived_at is not None:
        raise CategoryError(f"category {cleaned!r} is archived: un-archive it or choose another category")
    return category


def apply_label(
    session: Session,
    image_id: int,
    category_id: int | None,
    *,
    actor: str,
    action: str,
    note: str = "",
    seen: SeenPrediction | None = None,
) -> LabelEvent | None:
    """Set (or clear, with None) the label of one image inside the caller's write transaction.

    Returns the appended audit event, or None when the label already had that value.
    """
    if session.get(Image, image_id) is None:
        raise NotFound(f"no image with id {image_id}")
    current = session.get(Label, image_id)
    old = current.category_id if current is not None else None
    if old == category_id:
        return None
    now = utcnow()
    if category_id is None:
        session.delete(current)
    elif current is None:
        session.add(Label(image_id=image_id, category_id=category_id, labelled_by=actor, labelled_at=now))
    else:
        current.category_id = category_id
        current.labelled_by = actor
        current.labelled_at = now
    event = LabelEvent(
        image_id=image_id,
        old_category_id=old,
        new_category_id=category_id,
        actor=actor,
        action=action,
        created_at=now,
        note=note,
        model_version_id=seen.model_version_id if seen else None,
        predicted_category_id=seen.category_id if seen else None,
        predicted_confidence=seen.confidence if seen else None,
    )
    session.add(event)
    session.flush()
    return event
