"""Accept the model's predictions in bulk: label every unlabelled image of a filtered set whose active-version
prediction is at least so confident with its predicted category, as one undoable batch (or preview how many)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Select, select
from sqlalchemy.orm import Session

from core.auth import Action, authorized_write
from core.catalog.labels import BatchChange, SeenPrediction, apply_batch, clean_actor, resolve_category
from core.catalog.merges import ClassGroups, Merges
from core.db import Database
from core.errors import NotFound, ProdcatError
from core.schema import Category, Image, Label, ModelVersion, Prediction, Split, VersionStatus
from core.views.review import search_condition


@dataclass(frozen=True)
class AcceptedPredictions:
    """What accepting predictions did (or, with `dry_run`, would do): how many images got which category."""

    version_id: int
    min_confidence: float
    dry_run: bool
    count: int
    per_category: dict[str, int]
    image_ids: list[int] = field(repr=False)
    event_ids: list[int] = field(repr=False)  # empty on a dry run; a page adds them to its session's undo list
    skipped_archived: int = 0  # predicted as a category archived since: left unlabelled

    def describe(self) -> str:
        """`12 photos labelled with their predictions >= 90% (Shoes 8, Bags 4)`, worded as a preview on a dry run."""
        verb = "would be labelled" if self.dry_run else "labelled"
        photos = f"{self.count} photo{'' if self.count == 1 else 's'}"
        split = ", ".join(f"{name} {n}" for name, n in self.per_category.items())
        text = f"{photos} {verb} with their predictions >= {percent_text(self.min_confidence)}"
        text += f" ({split})" if split else ""
        if self.skipped_archived:
            text += f"; {self.skipped_archived} predicted as an archived category left unlabelled"
        return text


def percent_text(fraction: float) -> str:
    """0.9 -> "90%", 0.925 -> "92.5%"."""
    return f"{fraction * 100:.4g}%"


@dataclass(frozen=True)
class _Candidate:
    image_id: int
    category_id: int  # today's category (merges followed)
    confidence: float


def accept_predictions(
    db: Database,
    *,
    min_confidence: float,
    actor: str,
    dry_run: bool = False,
    category: str | int | None = None,
    split: Split | str | None = None,
    search: str | None = None,
) -> AcceptedPredictions:
    """Label every UNLABELLED image that matches the filters and whose active-version prediction has confidence >=
    `min_confidence` (0..1) with its predicted category, in one transaction: one "bulk" audit row each (the note says
    "accepted predictions >= 90%", the prediction shown is recorded, so these are not corrections), undone as one step
    by `core.catalog.labels.undo_last_change`. With `dry_run` nothing is written: the result is the preview.

    Filters as in `core.views.review.review_queue`: `category` (the predicted category, merges followed), `split`,
    `search` (image id or part of the file name). Confidence is the stored calibrated top-1 confidence. Images predicted
    as a category archived since are left unlabelled and counted in `skipped_archived`.

    Labelling needs a role that may label (core.auth, checked inside the write transaction); a dry run only reads,
    so anyone may preview.
    """
    actor = clean_actor(actor)
    threshold = _threshold(min_confidence)
    with db.read() if dry_run else authorized_write(db, actor, Action.LABEL) as session:
        version_id, classes = _active_classes(session)
        rows = session.execute(_query(session, version_id, classes, threshold, category, split, search)).all()
        candidates, skipped = _candidates(session, classes, rows)
        names = dict(session.execute(select(Category.id, Category.name)).all())
        event_ids: list[int] = []
        if candidates and not dry_run:
            changes = [
                BatchChange(c.image_id, None, c.category_id, SeenPrediction(version_id, c.category_id, c.confidence))
                for c in candidates
            ]
            note = f"accepted predictions >= {percent_text(threshold)}"
            event_ids = apply_batch(session, changes, actor=actor, note=note)
    counts = Counter(names[c.category_id] for c in candidates)
    return AcceptedPredictions(
        version_id=version_id,
        min_confidence=threshold,
        dry_run=dry_run,
        count=len(candidates),
        per_category=dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        image_ids=[c.image_id for c in candidates],
        event_ids=event_ids,
        skipped_archived=skipped,
    )


def _threshold(min_confidence: float) -> float:
    value = float(min_confidence)
    if not 0.0 < value <= 1.0:
        raise ProdcatError(f"minimum confidence {min_confidence!r} is out of range: use a fraction such as 0.9 for 90%")
    return value


def _active_classes(session: Session) -> tuple[int, ClassGroups]:
    row = session.execute(
        select(ModelVersion.id, ModelVersion.class_category_ids).where(ModelVersion.status == VersionStatus.ACTIVE)
    ).first()
    if row is None:
        raise NotFound("no active model yet: train one before accepting its predictions")
    return int(row[0]), Merges.of(session).classes(row[1])


def _query(
    session: Session,
    version_id: int,
    classes: ClassGroups,
    threshold: float,
    category: str | int | None,
    split: Split | str | None,
    search: str | None,
) -> Select[int, int, float]:
    """(image id, predicted category id, confidence) of the unlabelled matching images, by id."""
    conds: list[ColumnElement[bool]] = [Label.image_id.is_(None), Prediction.confidence >= threshold]
    if category is not None:
        wanted = classes.merges.resolve(resolve_category(session, category).id)
        conds.append(Prediction.category_id.in_(classes.sources_of(wanted)))
    if split is not None:
        if str(split) not in {s.value for s in Split}:
            raise ProdcatError(f"unknown split {split!r}: choose {', '.join(s.value for s in Split)}")
        conds.append(Image.split == str(split))
    if (found := search_condition(search)) is not None:
        conds.append(found)
    return (
        select(Image.id, Prediction.category_id, Prediction.confidence)
        .join(Prediction, (Prediction.image_id == Image.id) & (Prediction.model_version_id == version_id))
        .outerjoin(Label, Label.image_id == Image.id)
        .where(*conds)
        .order_by(Image.id)
    )


def _candidates(session: Session, classes: ClassGroups, rows: Any) -> tuple[list[_Candidate], int]:
    """The rows whose predicted category (merges followed) is live today, and how many were not."""
    live = set(session.scalars(select(Category.id).where(Category.archived_at.is_(None))))
    kept = [_Candidate(int(i), classes.merges.resolve(c), float(p)) for i, c, p in rows]
    usable = [c for c in kept if c.category_id in live]
    return usable, len(kept) - len(usable)
