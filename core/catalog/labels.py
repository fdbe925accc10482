"""Labels and categories: set, change, clear, bulk relabel, undo; add, rename, merge, archive, delete; the audit trail.

Every label change writes the `labels` row and its `label_events` row in the same transaction, so the
current label and the audit trail can never disagree. Every state-changing function checks inside that transaction
that the actor's role may do it (core.auth: labelling and undo need a labeller, adding a category a labeller, other
category edits an admin); category edits also append an `audit_events` row naming the actor.

Concurrent writers: SQLite has one writer at a time (core.db), so a transaction's reads stay true until it commits.
PostgreSQL writers run side by side, so what a change reads it first locks, always in one order (categories by id,
then images by id, so two writers never wait for each other in a circle): a label change locks its images' rows
(`FOR NO KEY UPDATE`: two changes of one image run one after the other and the second reads the label the first
wrote) after a share lock on the category it labels into (it cannot be archived or merged meanwhile); a category edit
locks the category's row, then the images whose labels it moves. New category names are serialised by a
transaction-scoped advisory lock, with the unique name as the last word (`INSERT ... ON CONFLICT DO NOTHING`).
"""

from __future__ import annotations

import enum
import re
import unicodedata
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Table, bindparam, delete, exists, func, insert, select, update
from sqlalchemy.orm import Session, aliased

from core.auth import Action, authorized_write, record
from core.catalog.corrections import LOOK_ACTIONS
from core.catalog.merges import Merges
from core.db import Database, dialect_insert, in_chunks, is_postgresql
from core.errors import CategoryError, ConflictingLabel, LabelConflict, NotFound, ProdcatError
from core.schema import (
    Category,
    Image,
    ImageCheck,
    Label,
    LabelAction,
    LabelEvent,
    ModelVersion,
    Prediction,
    utcnow,
)

MAX_CATEGORY_NAME = 200
# pg_advisory_xact_lock key held while a transaction checks a new category name and inserts it (PostgreSQL only).
_CATEGORY_NAMES_LOCK = 0x70726F64_63617473  # "prodcats"


@dataclass(frozen=True)
class SeenPrediction:
    """What the model showed the person when they labelled (stored in the audit row)."""

    model_version_id: int
    category_id: int
    confidence: float


# Runs of spaces of any kind (Unicode "Zs": space, no-break space, ideographic space...) read as one space.
# Tabs and line breaks are not among them: inside a name they are refused as control characters.
_SPACE_RUN = re.compile(r"[ \u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")


def clean_category_name(name: str) -> str:
    """Trim and validate a category name; names are shown as text, so any printable character is fine.

    Runs of spaces (no-break spaces included) become one space, so 'Running  Shoes' is 'Running Shoes'.
    """
    cleaned = _SPACE_RUN.sub(" ", unicodedata.normalize("NFC", str(name))).strip()
    if not cleaned:
        raise CategoryError("category name is empty: type a name such as 'Shoes'")
    if len(cleaned) > MAX_CATEGORY_NAME:
        raise CategoryError(f"category name is {len(cleaned)} characters long; the limit is {MAX_CATEGORY_NAME}")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in cleaned):
        raise CategoryError(f"category name {cleaned!r} contains control characters")
    return cleaned


def _category_key(name: str) -> str:
    """What two names must share to be the same category: case and runs of spaces do not count."""
    spaced = _SPACE_RUN.sub(" ", unicodedata.normalize("NFC", str(name))).strip()
    return unicodedata.normalize("NFC", spaced.casefold())


def _same_name_category(session: Session, cleaned: str, *, other_than: int | None = None) -> Category | None:
    """The category called `cleaned` up to case and spacing (an exact match first, else the oldest), or None.

    `other_than` leaves one category out (a rename may change the case of its own name). Category counts are
    small, so a miss scans the names: SQL's lower() would fold ASCII only.
    """
    exact = session.scalar(select(Category).where(Category.name == cleaned))
    if exact is not None and exact.id != other_than:
        return exact
    key = _category_key(cleaned)
    for category_id, name in session.execute(select(Category.id, Category.name).order_by(Category.id)):
        if category_id != other_than and _category_key(name) == key:
            return session.get(Category, category_id)
    return None


def find_category(session: Session, name_or_id: str | int) -> Category:
    """A category by id or name (case and spacing aside, the exact name first); raises NotFound naming it."""
    if isinstance(name_or_id, int):
        category = session.get(Category, name_or_id)
    else:
        category = _same_name_category(session, clean_category_name(str(name_or_id)))
    if category is None:
        raise NotFound(f"no category {name_or_id!r}: see `categories list` for the names")
    return category


def get_or_create_category(session: Session, name: str) -> Category:
    """The live category of that name, created if new. Refuses archived ones (un-archive is explicit).

    A name that differs from an existing category's only in case or spacing is that category: an import
    from a folder `shoes` labels into an existing `Shoes`.

    Two imports creating the same new category at once get the same row: on PostgreSQL the second waits for the
    first's name check and insert to commit (`_lock_category_names`), and the unique name decides in any case (the
    INSERT does nothing when the name exists, then the row is read back).
    """
    cleaned = clean_category_name(name)
    category = _same_name_category(session, cleaned)
    if category is None and _lock_category_names(session):
        category = _same_name_category(session, cleaned)  # created by a writer that committed while we waited
    if category is None:
        new_row = dialect_insert(session, Category).values(name=cleaned, created_at=utcnow())
        session.execute(new_row.on_conflict_do_nothing())
        category = session.scalars(select(Category).where(Category.name == cleaned)).one()
    _lock_categories(session, use=[category])
    if category.archived_at is not None:
        raise CategoryError(f"category {category.name!r} is archived: un-archive it or choose another category")
    return category


def _lock_category_names(session: Session) -> bool:
    """Hold the advisory lock on new category names until this transaction ends (PostgreSQL: adding, creating and
    renaming categories then check a name and write it one at a time, case and spacing aside, which a unique index
    on the exact name alone cannot do). Returns False on SQLite, whose single writer already holds every lock."""
    if not is_postgresql(session):
        return False
    session.execute(select(func.pg_advisory_xact_lock(_CATEGORY_NAMES_LOCK)))
    return True


def _lock_categories(session: Session, *, use: Iterable[Category] = (), change: Iterable[Category] = ()) -> None:
    """Row-lock categories on PostgreSQL (no-op on SQLite), in id order, and refresh the objects from the rows.

    `use`: FOR SHARE, taken by those who label into a category or need it to stay as it is (many at once); `change`:
    FOR NO KEY UPDATE, taken by those who rename, archive, merge or delete it (they wait for the labellers in flight,
    and later labellers wait for them, then see what they did). Foreign keys to the row are not blocked.
    """
    if not is_postgresql(session):
        return
    exclusive = {c.id: True for c in change}
    modes = {c.id: False for c in use} | exclusive
    for category_id in sorted(modes):
        query = select(Category).where(Category.id == category_id).execution_options(populate_existing=True)
        query = query.with_for_update(key_share=True) if modes[category_id] else query.with_for_update(read=True)
        if session.scalars(query).one_or_none() is None:
            raise NotFound(f"category #{category_id} was deleted meanwhile: nothing changed")


def _lock_images(session: Session, image_ids: Iterable[int]) -> set[int]:
    """The ids among `image_ids` that are images; on PostgreSQL their rows are locked (FOR NO KEY UPDATE, in id order)
    until the transaction ends, so concurrent label changes of one image run one after the other, each reading the
    label the one before wrote. SQLite's single writer needs no row locks."""
    found: set[int] = set()
    for chunk in in_chunks(sorted({int(i) for i in image_ids})):
        query = select(Image.id).where(Image.id.in_(chunk)).order_by(Image.id)
        found.update(session.scalars(query.with_for_update(key_share=True)))
    return found


def apply_label(
    session: Session,
    image_id: int,
    category_id: int | None,
    *,
    actor: str,
    action: LabelAction | str,
    note: str = "",
    seen: SeenPrediction | None = None,
) -> LabelEvent | None:
    """Set (or clear, with None) the label of one image inside the caller's write transaction.

    A primitive: the caller has checked that `actor` may do this (core.auth). Returns the appended audit event, or
    None when the label already had that value.
    """
    action = LabelAction(action)  # a misspelt action fails here, before anything is written
    if not _lock_images(session, [image_id]):
        raise NotFound(f"no image with id {image_id}")
    current = session.get(Label, image_id, populate_existing=True)
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


# --- Label changes -------------------------------------------------------------------------------------------

# Actions a person can take back with `undo_last_change`. Imports, merges and renames are batch
# bookkeeping, not someone's judgement about one image, so undo steps over them.
UNDOABLE_ACTIONS = (LabelAction.SET, LabelAction.CLEAR, LabelAction.BULK)


def _new_batch_id() -> str:
    """The `batch_id` shared by the events one change writes together."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class LabelChange:
    """One image's label before and after a change; `event_id` is None when nothing changed."""

    image_id: int
    old_category: str | None
    new_category: str | None
    event_id: int | None

    @property
    def changed(self) -> bool:
        return self.event_id is not None


@dataclass(frozen=True)
class AuditRow:
    """One line of an image's label history, with names resolved."""

    event_id: int
    time: datetime
    actor: str
    action: LabelAction
    old_category: str | None
    new_category: str | None
    predicted_category: str | None
    predicted_confidence: float | None
    model_version_id: int | None
    note: str
    undoes_event_id: int | None = None  # an undo: the event it took back
    batch_id: str | None = None  # shared by the events one bulk change, rename, merge or delete wrote


@dataclass(frozen=True)
class CategoryRow:
    """A category with the number of images currently labelled with it."""

    id: int
    name: str
    labelled: int
    archived: bool
    archived_at: datetime | None = None
    merged_into: str | None = None


def clean_actor(actor: str) -> str:
    """Actors are shown in the audit trail, so an empty one is refused rather than stored."""
    cleaned = str(actor or "").strip()
    if not cleaned:
        raise ProdcatError("actor is empty: say who makes the change (e.g. --actor alice)")
    return cleaned[:200]


def resolve_category(session: Session, value: str | int) -> Category:
    """A category by id (int) or name (str); a string of digits that is no category's name is taken as an id."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise CategoryError(f"category must be a name or an id, got {value!r}")
    if isinstance(value, int):
        return find_category(session, value)
    try:
        return find_category(session, value)
    except NotFound:
        if value.strip().isdigit():
            return find_category(session, int(value.strip()))
        raise


def _live_category(session: Session, value: str | int) -> Category:
    """The category to label into, share-locked (PostgreSQL) so it stays live until the change commits."""
    category = resolve_category(session, value)
    _lock_categories(session, use=[category])
    if category.archived_at is not None:
        where = ""
        if category.merged_into_id is not None:
            target = session.get(Category, category.merged_into_id)
            where = f" (merged into {target.name!r})" if target is not None else ""
        raise CategoryError(f"category {category.name!r} is archived{where}: it cannot receive new labels")
    return category


def _name(session: Session, category_id: int | None) -> str | None:
    if category_id is None:
        return None
    category = session.get(Category, category_id)
    return category.name if category is not None else None


def _change(session: Session, image_id: int, event: LabelEvent | None, current: int | None) -> LabelChange:
    if event is None:
        name = _name(session, current)
        return LabelChange(image_id, name, name, None)
    return LabelChange(image_id, _name(session, event.old_category_id), _name(session, event.new_category_id), event.id)


# --- What the person saw: refuse to overwrite a label that changed since (two tabs, two people) ------------------


class NotGiven(enum.Enum):
    """The default of `expected_label`: the caller did not say what the person saw, so nothing is checked."""

    NOT_GIVEN = "not given"


NOT_GIVEN = NotGiven.NOT_GIVEN
SeenLabel = str | int | None  # the label a person saw: a category name or id; None = the image was unlabelled
_NO_SUCH_CATEGORY = -1  # a seen name no category has today: never equal to a current label


def _seen_category_id(session: Session, seen: SeenLabel, merges: Merges) -> int | None:
    """The category id a seen label stands for today (a category merged since counts as the one it went into)."""
    if seen is None:
        return None
    try:
        return merges.resolve(resolve_category(session, seen).id)
    except NotFound:
        return _NO_SUCH_CATEGORY


def _seen_name(seen: SeenLabel, names: Mapping[int, str]) -> str | None:
    if seen is None or isinstance(seen, str):
        return seen
    return names.get(int(seen), f"category #{seen}")


def _conflict(
    session: Session, image_id: int, seen: SeenLabel, now: int | None, names: Mapping[int, str]
) -> ConflictingLabel:
    """Describe one image whose label is not what the person saw, from its latest label event that changed something
    (a confirmation or a skip since is no change: it did not make the label what it is)."""
    last = session.scalars(
        select(LabelEvent)
        .where(LabelEvent.image_id == image_id, LabelEvent.action.not_in(LOOK_ACTIONS))
        .order_by(LabelEvent.id.desc())
        .limit(1)
    ).first()
    return ConflictingLabel(
        image_id=image_id,
        expected=_seen_name(seen, names),
        current=names.get(now) if now is not None else None,
        changed_by=last.actor if last is not None else None,
        changed_at=last.created_at if last is not None else None,
        action=last.action if last is not None else None,
    )


def _check_seen(session: Session, seen: Mapping[int, SeenLabel], target_id: int | None) -> None:
    """Raise LabelConflict (before anything is written) for images whose label is neither what the person saw nor
    the label they are giving it: someone else changed it meanwhile. An image already carrying the requested label
    is no conflict: both people agree and nothing is overwritten."""
    if not seen:
        return
    current = _current_labels(session, list(seen))
    merges = Merges.of(session)
    names = _names(session)
    conflicts = [
        _conflict(session, image_id, label, current.get(image_id), names)
        for image_id, label in seen.items()
        if current.get(image_id) not in (_seen_category_id(session, label, merges), target_id)
    ]
    _refuse_conflicts(conflicts, len(seen))


def _refuse_conflicts(conflicts: Sequence[ConflictingLabel], out_of: int) -> None:
    """Raise LabelConflict naming the images (`out_of`: how many the change was for), unless there are none."""
    if not conflicts:
        return
    shown = "; ".join(c.describe() for c in conflicts[:5]) + (" ..." if len(conflicts) > 5 else "")
    if out_of == 1:
        message = f"{shown}. Nothing changed: look at it again and choose the label to keep."
    else:
        message = (
            f"{len(conflicts)} of the {out_of} images changed since you saw them: {shown}. Nothing was "
            "relabelled: look at those again (or leave them out) and apply the change once more."
        )
    raise LabelConflict(message, conflicts)


def set_label(
    db: Database,
    image_id: int,
    category: str | int,
    *,
    actor: str,
    seen_prediction: SeenPrediction | None = None,
    note: str = "",
    expected_label: SeenLabel | NotGiven = NOT_GIVEN,
) -> LabelChange:
    """Label one image (or change its label), writing the label and its audit event in one transaction.

    `category` is an existing, live category's name or id. Setting the label it already has changes nothing
    and returns a LabelChange whose `event_id` is None. `expected_label` is the label the person saw (a category
    name or id, None for unlabelled): if the image's label has changed since (another tab, another person), nothing
    is written and LabelConflict says who changed it to what, and when.
    """
    actor = clean_actor(actor)
    with authorized_write(db, actor, Action.LABEL) as session:
        target = _live_category(session, category)
        _lock_images(session, [image_id])  # before reading the label: a concurrent change of it commits first
        if expected_label is not NOT_GIVEN:
            _check_seen(session, {int(image_id): expected_label}, target.id)
        event = apply_label(
            session, int(image_id), target.id, actor=actor, action=LabelAction.SET, note=note, seen=seen_prediction
        )
        return _change(session, int(image_id), event, target.id)


def confirm_label(
    db: Database,
    image_id: int,
    *,
    actor: str,
    seen_prediction: SeenPrediction | None = None,
    expected_label: SeenLabel | NotGiven = NOT_GIVEN,
) -> LabelChange:
    """Record that a person looked at an image and kept its label: a `confirm` audit event (old = new = the label),
    so "confirmed by a person" is a state the trail can show. The label is unchanged; the event is not a label
    change, a correction or an undo step. Refuses an unlabelled image; `expected_label` as in `set_label`.
    """
    actor = clean_actor(actor)
    with authorized_write(db, actor, Action.LABEL) as session:
        if not _lock_images(session, [image_id]):
            raise NotFound(f"no image with id {image_id}")
        if expected_label is not NOT_GIVEN:
            _check_seen(session, {int(image_id): expected_label}, None)
        current = session.get(Label, int(image_id), populate_existing=True)
        if current is None:
            raise ProdcatError(f"image {image_id} has no label to confirm: choose its category instead")
        return _record_look(session, int(image_id), current.category_id, LabelAction.CONFIRM, actor, seen_prediction)


def record_skip(
    db: Database, image_id: int, *, actor: str, seen_prediction: SeenPrediction | None = None
) -> LabelChange:
    """Record that a person set an image aside in keyboard review: a `skip` audit event (old = new = its label, or
    none), with who, when and what the model showed. Like a confirmation it changes nothing: no label change, no
    correction, never undone, and it does not stand in the way of anyone's undo."""
    actor = clean_actor(actor)
    with authorized_write(db, actor, Action.LABEL) as session:
        if not _lock_images(session, [image_id]):
            raise NotFound(f"no image with id {image_id}")
        current = session.get(Label, int(image_id), populate_existing=True)
        category_id = current.category_id if current is not None else None
        return _record_look(session, int(image_id), category_id, LabelAction.SKIP, actor, seen_prediction)


def _record_look(
    session: Session,
    image_id: int,
    category_id: int | None,
    action: LabelAction,
    actor: str,
    seen: SeenPrediction | None,
) -> LabelChange:
    """Append a look (corrections.LOOK_ACTIONS: old = new, nothing changes) to the audit trail."""
    event = LabelEvent(
        image_id=image_id,
        old_category_id=category_id,
        new_category_id=category_id,
        actor=actor,
        action=action,
        created_at=utcnow(),
        model_version_id=seen.model_version_id if seen else None,
        predicted_category_id=seen.category_id if seen else None,
        predicted_confidence=seen.confidence if seen else None,
    )
    session.add(event)
    session.flush()
    name = _name(session, category_id)
    return LabelChange(image_id, name, name, event.id)


def clear_label(
    db: Database, image_id: int, *, actor: str, note: str = "", expected_label: SeenLabel | NotGiven = NOT_GIVEN
) -> LabelChange:
    """Make one image unlabelled again (audited; the earlier label stays in the trail). `expected_label` as in
    `set_label`."""
    actor = clean_actor(actor)
    with authorized_write(db, actor, Action.LABEL) as session:
        _lock_images(session, [image_id])
        if expected_label is not NOT_GIVEN:
            _check_seen(session, {int(image_id): expected_label}, None)
        event = apply_label(session, int(image_id), None, actor=actor, action=LabelAction.CLEAR, note=note)
        return _change(session, int(image_id), event, None)


@dataclass(frozen=True)
class LabelMove:
    """One image's label change for `apply_moves`: from `old` to `new` category id (None: unlabelled)."""

    image_id: int
    old: int | None
    new: int | None
    note: str
    seen: SeenPrediction | None = None
    undoes: int | None = None  # an undo move: the event it takes back


def apply_moves(
    session: Session, moves: Sequence[LabelMove], *, actor: str, action: LabelAction, batch_id: str | None
) -> list[int]:
    """Batch form of `apply_label` for thousands of images: a few executemany statements instead of a
    flush per image. The caller has checked that each move starts from the image's current label (and
    that the actor may make it). Returns the new event ids in the order of `moves`.

    On PostgreSQL the images are row-locked here and each move checked against the label now (LabelConflict when
    another writer changed one after the caller read it); callers that locked before reading pass this check."""
    if not moves:
        return []
    if is_postgresql(session):
        ids = [m.image_id for m in moves]
        _lock_images(session, ids)
        current = _current_labels(session, ids)
        stale = [m for m in moves if current.get(m.image_id) != m.old]
        if stale:
            names = _names(session)
            conflicts = [_conflict(session, m.image_id, m.old, current.get(m.image_id), names) for m in stale]
            _refuse_conflicts(conflicts, len(ids))
    now = utcnow()
    labels_table, events_table = Label.__table__, LabelEvent.__table__
    assert isinstance(labels_table, Table) and isinstance(events_table, Table)  # declarative: one Table each
    # Core executemany, not ORM bulk: the ORM's INSERT..RETURNING path is quadratic in the row count.
    cleared = [m.image_id for m in moves if m.new is None]
    added = [m for m in moves if m.old is None and m.new is not None]
    changed = [m for m in moves if m.old is not None and m.new is not None]
    for chunk in in_chunks(cleared):
        session.execute(delete(labels_table).where(labels_table.c.image_id.in_(chunk)))
    if added:
        session.execute(
            insert(labels_table),
            [{"image_id": m.image_id, "category_id": m.new, "labelled_by": actor, "labelled_at": now} for m in added],
        )
    if changed:
        session.execute(
            update(labels_table)
            .where(labels_table.c.image_id == bindparam("b_image_id"))
            .values(category_id=bindparam("b_category_id"), labelled_by=actor, labelled_at=now),
            [{"b_image_id": m.image_id, "b_category_id": m.new} for m in changed],
        )
    # INSERT ... RETURNING: each image appears once per batch, so its image id names its new event.
    returned = session.execute(
        insert(events_table).returning(events_table.c.image_id, events_table.c.id),
        [
            {
                "image_id": m.image_id,
                "old_category_id": m.old,
                "new_category_id": m.new,
                "actor": actor,
                "action": action,
                "created_at": now,
                "note": m.note,
                "model_version_id": m.seen.model_version_id if m.seen else None,
                "predicted_category_id": m.seen.category_id if m.seen else None,
                "predicted_confidence": m.seen.confidence if m.seen else None,
                "undoes_event_id": m.undoes,
                "batch_id": batch_id,
            }
            for m in moves
        ],
    )
    pairs: Sequence[tuple[int, int]] = returned.all()  # (image id, event id)
    new_ids = {int(image_id): int(event_id) for image_id, event_id in pairs}
    # Objects loaded earlier in this session may describe the old labels.
    session.expire_all()
    return [new_ids[m.image_id] for m in moves]


@dataclass(frozen=True)
class BatchChange:
    """One image's change in a batch written by `apply_batch`: from `old` to `new` (category ids; None = unlabelled)."""

    image_id: int
    old: int | None
    new: int | None
    seen: SeenPrediction | None = None


def apply_batch(session: Session, changes: Sequence[BatchChange], *, actor: str, note: str) -> list[int]:
    """Write many label changes inside the caller's write transaction as ONE bulk batch: action "bulk", one event per
    image with `note` and one shared `batch_id`, so `undo_last_change` takes the whole batch back in one step.

    Each change must start from the image's current label (the caller read it in this transaction), and the caller
    has checked that `actor` may label (core.auth). Returns the new event ids in the order of `changes`.
    """
    moves = [LabelMove(c.image_id, c.old, c.new, note, c.seen) for c in changes]
    return apply_moves(session, moves, actor=clean_actor(actor), action=LabelAction.BULK, batch_id=_new_batch_id())


def _current_labels(session: Session, image_ids: Sequence[int]) -> dict[int, int]:
    found: dict[int, int] = {}
    for chunk in in_chunks(image_ids):
        rows = session.execute(select(Label.image_id, Label.category_id).where(Label.image_id.in_(chunk))).all()
        found.update((image_id, category_id) for image_id, category_id in rows)
    return found


def _names(session: Session) -> dict[int, str]:
    return {category_id: name for category_id, name in session.execute(select(Category.id, Category.name))}


def bulk_relabel(
    db: Database,
    image_ids: Iterable[int],
    category: str | int,
    *,
    actor: str,
    seen_predictions: Mapping[int, SeenPrediction | None] | None = None,
    expected_labels: Mapping[int, SeenLabel] | None = None,
) -> list[LabelChange]:
    """Give many images the same label in ONE transaction: one `bulk` event per image that actually changed.

    Unknown image ids refuse the whole batch (naming them) before anything is written. Returns only the
    changes made; images that already had that label are left alone. `seen_predictions` (image id -> what the
    grid showed) goes into each audit row, as with `set_label`, so overriding a prediction in bulk counts as a
    correction and accepting it in bulk does not.

    `expected_labels` (image id -> the label the grid showed, None for unlabelled) guards against overwriting work
    done meanwhile: if any of those images changed since, the WHOLE batch is refused with a LabelConflict naming
    every such image, and nothing is written. A person who selected 40 photos meant those 40 as they saw them; a
    batch applied to 39 would leave them unsure which one was skipped and why. The page shows the conflicts, and
    the person re-applies with them left out (or after looking again). Images missing from the mapping are not
    checked.
    """
    actor = clean_actor(actor)
    ids = list(dict.fromkeys(int(i) for i in image_ids))  # de-duplicated, order kept
    if not ids:
        return []
    with authorized_write(db, actor, Action.LABEL) as session:
        target = _live_category(session, category)
        found = _lock_images(session, ids)
        missing = [i for i in ids if i not in found]
        if missing:
            shown = ", ".join(str(i) for i in missing[:20]) + (" ..." if len(missing) > 20 else "")
            raise NotFound(f"no image with id {shown}: nothing was relabelled")
        if expected_labels:
            _check_seen(session, {i: expected_labels[i] for i in ids if i in expected_labels}, target.id)
        current = _current_labels(session, ids)
        # One batch id on every event lets undo take the whole bulk change back at once.
        note = f"bulk relabel of {len(ids)} images"
        seen = seen_predictions or {}
        moves = [LabelMove(i, current.get(i), target.id, note, seen.get(i)) for i in ids if current.get(i) != target.id]
        event_ids = apply_moves(session, moves, actor=actor, action=LabelAction.BULK, batch_id=_new_batch_id())
        names = _names(session)
        return [
            LabelChange(m.image_id, names.get(m.old) if m.old else None, target.name, event_id)
            for m, event_id in zip(moves, event_ids, strict=True)
        ]


def _undone_by(actor: str) -> ColumnElement[bool]:
    """WHERE term on `LabelEvent`: one of `actor`'s undo events took it back (found through the undoes_event_id
    index)."""
    undo = aliased(LabelEvent)
    return exists(select(undo.id).where(undo.undoes_event_id == LabelEvent.id, undo.actor == actor))


def undo_last_change(db: Database, *, actor: str, only_event_ids: Collection[int] | None = None) -> list[LabelChange]:
    """Take back the actor's most recent label change that is not undone yet (a whole batch for a bulk change).

    `only_event_ids` limits the search to those events (e.g. the changes made in one browser session, so
    people who share a name never undo each other's work); a bulk change found through one of its events is
    still undone as a whole. Writes new `undo` events, each naming the event it takes back in `undoes_event_id`;
    the original events stay. Repeating it steps further back. Only the actor's own changes are ever undone.
    Refuses (changing nothing) when there is nothing to undo, when someone else has changed the image since, or
    when the old category has been archived since.
    """
    actor = clean_actor(actor)
    restricted = only_event_ids is not None
    allowed = sorted({int(i) for i in only_event_ids or ()})
    undoable = (LabelEvent.actor == actor, LabelEvent.action.in_(UNDOABLE_ACTIONS), ~_undone_by(actor))
    with authorized_write(db, actor, Action.LABEL) as session:
        # Newest first, stopping at the first event not undone: the write lock is held here, so this must not
        # read the actor's whole history (the (actor, id) index, or the allowed ids by primary key, newest
        # chunk first).
        last: LabelEvent | None = None
        chunks: list[Sequence[int] | None] = list(reversed(list(in_chunks(allowed)))) if restricted else [None]
        for chunk in chunks:
            where = undoable if chunk is None else (LabelEvent.id.in_(chunk), *undoable)
            last = session.scalars(select(LabelEvent).where(*where).order_by(LabelEvent.id.desc()).limit(1)).first()
            if last is not None:
                break
        if last is None:
            among = " among the given changes" if restricted else ""
            raise NotFound(f"nothing to undo: {actor!r} has no label change{among} left that is not undone")
        bulk = last.action == LabelAction.BULK
        if bulk and last.batch_id is not None:
            # The whole batch (indexed by its id), even where `only_event_ids` named only some of it.
            events = list(
                session.scalars(
                    select(LabelEvent)
                    .where(
                        LabelEvent.batch_id == last.batch_id,
                        LabelEvent.actor == actor,
                        LabelEvent.action == LabelAction.BULK,
                        ~_undone_by(actor),
                    )
                    .order_by(LabelEvent.id)
                )
            )
        else:
            events = [last]
        _lock_for_undo(session, events, actor)
        _check_undoable(session, events, actor)
        moves = [
            LabelMove(
                e.image_id, e.new_category_id, e.old_category_id, f"undo of event #{e.id} ({e.action})", undoes=e.id
            )
            for e in events
        ]
        batch_id = _new_batch_id() if bulk else None  # the undo of a batch is one batch too
        event_ids = apply_moves(session, moves, actor=actor, action=LabelAction.UNDO, batch_id=batch_id)
        names = _names(session)
        return [
            LabelChange(m.image_id, names.get(m.old) if m.old else None, names.get(m.new) if m.new else None, eid)
            for m, eid in zip(moves, event_ids, strict=True)
        ]


def _lock_for_undo(session: Session, events: Sequence[LabelEvent], actor: str) -> None:
    """PostgreSQL: lock the categories the undo labels back into (share) and the images (in the order every label
    change takes them), then refuse when the actor undid one of the events meanwhile (in another tab): the events
    were found before the locks. SQLite's single writer found them under its lock already."""
    if not is_postgresql(session):
        return
    old_ids = sorted({e.old_category_id for e in events if e.old_category_id is not None})
    _lock_categories(session, use=session.scalars(select(Category).where(Category.id.in_(old_ids))).all())
    _lock_images(session, [e.image_id for e in events])
    for chunk in in_chunks([e.id for e in events]):
        undone = session.scalars(
            select(LabelEvent.undoes_event_id).where(LabelEvent.undoes_event_id.in_(chunk), LabelEvent.actor == actor)
        )
        first = undone.first()
        if first is not None:
            raise CategoryError(f"event #{first} was undone meanwhile (in another tab?): nothing changed")


def _check_undoable(session: Session, events: Sequence[LabelEvent], actor: str) -> None:
    """Refuse the undo (naming the first image in the way) unless every event is still the image's latest word."""
    by_image = {e.image_id: e for e in events}
    image_ids = list(by_image)
    first_id = min(e.id for e in events)
    for chunk in in_chunks(image_ids):
        later = session.scalars(
            select(LabelEvent)
            .where(
                LabelEvent.image_id.in_(chunk),
                LabelEvent.id > first_id,
                LabelEvent.actor != actor,
                LabelEvent.action != LabelAction.SKIP,  # setting an image aside says nothing about its label
            )
            .order_by(LabelEvent.id.desc())
        )
        for other in later:
            event = by_image[other.image_id]
            if other.id > event.id:
                when = other.created_at.strftime("%Y-%m-%d %H:%M")
                # A confirmation blocks too: the undo would overturn a label another person has since agreed with.
                done = "confirmed" if other.action == LabelAction.CONFIRM else "changed"
                raise CategoryError(
                    f"cannot undo event #{event.id}: image {event.image_id} was {done} since by "
                    f"{other.actor!r} ({other.action}, {when} UTC)"
                )
    current = _current_labels(session, image_ids)
    for event in events:
        if current.get(event.image_id) != event.new_category_id:
            raise CategoryError(f"cannot undo event #{event.id}: image {event.image_id} has been relabelled since")
    for old_id in {e.old_category_id for e in events} - {None}:
        old = session.get(Category, old_id)
        if old is not None and old.archived_at is not None:
            raise CategoryError(
                f"cannot undo: category {old.name!r} has been archived since; label the images by hand instead"
            )


def audit_trail(db: Database, image_id: int) -> list[AuditRow]:
    """Every label event of one image, newest first, with category names resolved."""
    old, new, predicted = aliased(Category), aliased(Category), aliased(Category)
    with db.read() as session:
        if session.get(Image, int(image_id)) is None:
            raise NotFound(f"no image with id {image_id}")
        rows = session.execute(
            select(LabelEvent, old.name, new.name, predicted.name)
            .outerjoin(old, old.id == LabelEvent.old_category_id)
            .outerjoin(new, new.id == LabelEvent.new_category_id)
            .outerjoin(predicted, predicted.id == LabelEvent.predicted_category_id)
            .where(LabelEvent.image_id == int(image_id))
            .order_by(LabelEvent.id.desc())
        ).all()
        # Built inside the session: read() rolls back on exit, which expires the loaded objects.
        return [
            AuditRow(
                event_id=event.id,
                time=event.created_at,
                actor=event.actor,
                action=event.action,
                old_category=old_name,
                new_category=new_name,
                predicted_category=predicted_name,
                predicted_confidence=event.predicted_confidence,
                model_version_id=event.model_version_id,
                note=event.note,
                undoes_event_id=event.undoes_event_id,
                batch_id=event.batch_id,
            )
            for event, old_name, new_name, predicted_name in rows
        ]


# --- Categories ----------------------------------------------------------------------------------------------


def _category_row(session: Session, category: Category) -> CategoryRow:
    labelled = session.scalar(select(func.count()).select_from(Label).where(Label.category_id == category.id)) or 0
    return CategoryRow(
        id=category.id,
        name=category.name,
        labelled=int(labelled),
        archived=category.archived_at is not None,
        archived_at=category.archived_at,
        merged_into=_name(session, category.merged_into_id),
    )


def add_category(db: Database, name: str, *, actor: str) -> CategoryRow:
    """Create a new, empty category; refuses a name that is taken (archived ones included), case and spacing aside."""
    actor = clean_actor(actor)
    cleaned = clean_category_name(name)
    with authorized_write(db, actor, Action.ADD_CATEGORY) as session:
        _lock_category_names(session)  # PostgreSQL: two people adding one name at once get one category
        existing = _same_name_category(session, cleaned)
        if existing is not None:
            state = " (archived: `categories unarchive` brings it back)" if existing.archived_at else ""
            if existing.name == cleaned:
                raise CategoryError(f"category {cleaned!r} already exists{state}")
            raise CategoryError(f"{cleaned!r} is the same as the existing category {existing.name!r}{state}")
        category = Category(name=cleaned)
        session.add(category)
        session.flush()
        record(session, actor, Action.ADD_CATEGORY, f"category {category.id}", change="add", name=cleaned)
        return _category_row(session, category)


def _bulk_events(
    session: Session,
    image_ids: Sequence[int],
    old_id: int,
    new_id: int,
    *,
    actor: str,
    action: LabelAction,
    note: str,
    when: datetime,
) -> None:
    """One audit row per image in a single executemany (a merge of 50,000 labels stays one quick statement), all
    sharing one batch id."""
    batch_id = _new_batch_id()
    rows = [
        {
            "image_id": image_id,
            "old_category_id": old_id,
            "new_category_id": new_id,
            "actor": actor,
            "action": action,
            "created_at": when,
            "note": note,
            "batch_id": batch_id,
        }
        for image_id in image_ids
    ]
    if rows:
        session.execute(insert(LabelEvent), rows)


def rename_category(db: Database, old: str | int, new: str, *, actor: str) -> CategoryRow:
    """Rename a category in place: its id, labels and history stay attached.

    There is no table of category events, so each labelled image gets a `rename` audit row (old and new
    category the same id, the note naming both names): an image's history then explains why the label it
    was given under the old name now reads differently.
    """
    actor = clean_actor(actor)
    cleaned = clean_category_name(new)
    with authorized_write(db, actor, Action.EDIT_CATEGORIES) as session:
        _lock_category_names(session)
        category = resolve_category(session, old)
        _lock_categories(session, change=[category])
        if category.name == cleaned:
            return _category_row(session, category)
        # Another category of that name, case and spacing aside; changing the case of its own name is fine.
        clash = _same_name_category(session, cleaned, other_than=category.id)
        if clash is not None:
            why = (
                "a category with that name exists"
                if clash.name == cleaned
                else f"{cleaned!r} is the same as the existing category {clash.name!r}"
            )
            raise CategoryError(
                f"cannot rename {category.name!r} to {cleaned!r}: {why} (use `categories merge` to combine them)"
            )
        old_name, category.name = category.name, cleaned
        now = utcnow()
        note = f"category {old_name!r} renamed to {cleaned!r}"
        image_ids = session.scalars(select(Label.image_id).where(Label.category_id == category.id)).all()
        _bulk_events(
            session, image_ids, category.id, category.id, actor=actor, action=LabelAction.RENAME, note=note, when=now
        )
        subject = f"category {category.id}"
        record(session, actor, Action.EDIT_CATEGORIES, subject, change="rename", old=old_name, new=cleaned)
        session.flush()
        return _category_row(session, category)


def merge_categories(db: Database, source: str | int, target: str | int, *, actor: str) -> int:
    """Move every label of `source` to `target` (one `merge` audit row each), then archive `source`.

    `source` keeps its name and records `merged_into_id`, so old audit rows still show where a label came
    from. Returns the number of labels moved.
    """
    actor = clean_actor(actor)
    with authorized_write(db, actor, Action.EDIT_CATEGORIES) as session:
        src = resolve_category(session, source)
        dst = resolve_category(session, target)
        _lock_categories(session, change=[src], use=[dst] if dst.id != src.id else [])
        if src.id == dst.id:
            raise CategoryError(f"cannot merge {src.name!r} onto itself: choose a different target category")
        if dst.archived_at is not None:
            raise CategoryError(f"cannot merge into {dst.name!r}: it is archived")
        if src.merged_into_id is not None:
            raise CategoryError(f"{src.name!r} was already merged into {_name(session, src.merged_into_id)!r}")
        now = utcnow()
        note = f"category {src.name!r} merged into {dst.name!r}"
        moved = _move_labels(session, src.id, dst.id, actor=actor, action=LabelAction.MERGE, note=note, when=now)
        src.archived_at = now
        src.merged_into_id = dst.id
        detail = {"name": src.name, "into": dst.id, "into_name": dst.name, "moved": moved}
        record(session, actor, Action.EDIT_CATEGORIES, f"category {src.id}", change="merge", **detail)
        session.flush()
        return moved


def _move_labels(
    session: Session, source_id: int, target_id: int, *, actor: str, action: LabelAction, note: str, when: datetime
) -> int:
    """Move every label of one category to another with one audit row each; returns how many moved.

    The caller holds the source category's row lock, so nobody labels into it meanwhile. On PostgreSQL the images are
    locked first, as every label change does; the UPDATE's RETURNING names exactly the labels it moved (not one a
    relabel took away just before), and each of those gets its audit row.
    """
    if is_postgresql(session):
        in_source = select(Image.id).join(Label, Label.image_id == Image.id).where(Label.category_id == source_id)
        session.scalars(in_source.order_by(Image.id).with_for_update(of=Image, key_share=True)).all()
    # labelled_by/labelled_at keep the person who judged the image; the move itself is in the events.
    moved = session.scalars(
        update(Label)
        .where(Label.category_id == source_id)
        .values(category_id=target_id)
        .returning(Label.image_id)
        .execution_options(synchronize_session=False)
    ).all()
    image_ids = sorted(moved)
    _bulk_events(session, image_ids, source_id, target_id, actor=actor, action=action, note=note, when=when)
    session.expire_all()  # Label objects loaded earlier in this session may still name the source category
    return len(image_ids)


def archive_category(db: Database, name: str | int, *, actor: str) -> CategoryRow:
    """Stop a category from receiving new labels; the images already labelled with it keep their label."""
    actor = clean_actor(actor)
    with authorized_write(db, actor, Action.EDIT_CATEGORIES) as session:
        category = resolve_category(session, name)
        _lock_categories(session, change=[category])
        if category.archived_at is not None:
            raise CategoryError(f"category {category.name!r} is already archived")
        category.archived_at = utcnow()
        record(session, actor, Action.EDIT_CATEGORIES, f"category {category.id}", change="archive", name=category.name)
        session.flush()
        return _category_row(session, category)


def unarchive_category(db: Database, name: str | int, *, actor: str) -> CategoryRow:
    """Let an archived category receive labels again (not one that was merged: its labels live elsewhere)."""
    actor = clean_actor(actor)
    with authorized_write(db, actor, Action.EDIT_CATEGORIES) as session:
        category = resolve_category(session, name)
        _lock_categories(session, change=[category])
        if category.archived_at is None:
            raise CategoryError(f"category {category.name!r} is not archived")
        if category.deleted_at is not None:
            raise CategoryError(f"category {category.name!r} was deleted; add a new category instead")
        if category.merged_into_id is not None:
            raise CategoryError(
                f"category {category.name!r} was merged into {_name(session, category.merged_into_id)!r}; "
                "add a new category instead"
            )
        category.archived_at = None
        subject = f"category {category.id}"
        record(session, actor, Action.EDIT_CATEGORIES, subject, change="unarchive", name=category.name)
        session.flush()
        return _category_row(session, category)


@dataclass(frozen=True)
class DeletedCategory:
    """What `delete_category` did: labels moved (and where), and whether the row was kept for the audit trail."""

    name: str
    moved: int
    moved_to: str | None
    kept_for_history: bool  # True: renamed "<name> (deleted #<id>)" and archived, since audit rows or models name it


def _deleted_name(name: str, category_id: int) -> str:
    suffix = f" (deleted #{category_id})"
    return name[: MAX_CATEGORY_NAME - len(suffix)] + suffix


def _still_named(session: Session, category_id: int) -> bool:
    """Whether any row still refers to the category: audit events, predictions, label checks, merges, model classes."""
    refs = (
        select(LabelEvent.id).where(
            (LabelEvent.old_category_id == category_id)
            | (LabelEvent.new_category_id == category_id)
            | (LabelEvent.predicted_category_id == category_id)
        ),
        select(Label.image_id).where(Label.category_id == category_id),
        select(Prediction.id).where(Prediction.category_id == category_id),
        select(ImageCheck.id).where(
            (ImageCheck.label_category_id == category_id) | (ImageCheck.suggested_category_id == category_id)
        ),
        select(Category.id).where(Category.merged_into_id == category_id),
    )
    if any(session.scalar(select(exists(ref))) for ref in refs):
        return True
    classes: Iterable[list[Any] | None] = session.scalars(select(ModelVersion.class_category_ids))
    return any(category_id in {int(c) for c in ids or ()} for ids in classes)


def delete_category(db: Database, name: str | int, *, actor: str, move_to: str | int | None = None) -> DeletedCategory:
    """Delete a category. One with labelled images is refused unless `move_to` names a live category: its labels then
    move there first, one `delete-category` audit row each.

    A category nothing refers to goes for good. One that audit rows, predictions or model versions still name keeps
    its row, so every old audit row still reads with a name: it is archived, marked deleted and renamed
    "<name> (deleted #<id>)" (the name is free for a new category); with `move_to` it also counts as merged into it,
    so an older model's predictions of it resolve to `move_to` (core.ml.versions.Merges).
    """
    actor = clean_actor(actor)
    with authorized_write(db, actor, Action.EDIT_CATEGORIES) as session:
        category = resolve_category(session, name)
        if category.deleted_at is None:
            others = [resolve_category(session, move_to)] if move_to is not None else []
            _lock_categories(session, change=[category], use=[c for c in others if c.id != category.id])
        if category.deleted_at is not None:  # before the lock, or by another admin while this one waited for it
            raise CategoryError(f"category {category.name!r} is already deleted")
        target = _live_category(session, move_to) if move_to is not None else None
        if target is not None and target.id == category.id:
            raise CategoryError(f"cannot move the labels of {category.name!r} onto itself: choose another category")
        labelled = session.scalar(select(func.count()).select_from(Label).where(Label.category_id == category.id))
        if labelled and target is None:
            raise CategoryError(
                f"category {category.name!r} has {labelled} labelled images: move them to another category first "
                f"(`categories delete {category.name!r} --move-to OTHER`); nothing was deleted"
            )
        now, original = utcnow(), category.name
        moved = 0
        if target is not None:
            note = f"category {original!r} deleted; its labels moved to {target.name!r}"
            moved = _move_labels(session, category.id, target.id, actor=actor, action=LabelAction.DELETE_CATEGORY,
                                 note=note, when=now)  # fmt: skip
        kept = _still_named(session, category.id)
        detail = {"name": original, "moved": moved, "moved_to": target.id if target else None, "kept_for_history": kept}
        record(session, actor, Action.EDIT_CATEGORIES, f"category {category.id}", change="delete", **detail)
        if kept:
            category.name = _deleted_name(original, category.id)
            category.archived_at = category.archived_at or now
            category.deleted_at = now
            category.merged_into_id = target.id if target is not None else category.merged_into_id
        else:
            session.delete(category)
        session.flush()
        return DeletedCategory(original, moved, target.name if target is not None else None, kept)


def list_categories(db: Database, *, include_archived: bool = False) -> list[CategoryRow]:
    """Categories by name with their labelled-image counts (one GROUP BY query); deleted ones are never listed."""
    counts = select(Label.category_id, func.count().label("n")).group_by(Label.category_id).subquery()
    merged = aliased(Category)
    query = (
        select(Category, func.coalesce(counts.c.n, 0), merged.name)
        .outerjoin(counts, counts.c.category_id == Category.id)
        .outerjoin(merged, merged.id == Category.merged_into_id)
        .order_by(Category.name)
    )
    query = query.where(Category.deleted_at.is_(None))
    if not include_archived:
        query = query.where(Category.archived_at.is_(None))
    with db.read() as session:
        rows: Sequence[tuple[Category, int, str | None]] = session.execute(query).all()
        return [
            CategoryRow(
                id=category.id,
                name=category.name,
                labelled=int(n),
                archived=category.archived_at is not None,
                archived_at=category.archived_at,
                merged_into=merged_name,
            )
            for category, n, merged_name in rows
        ]


def usable_category_name(db: Database, name: str) -> str:
    """The cleaned name of the category an upload or import will label with, checked before any file is read: a
    CategoryError (too long, empty, archived, merged: saying which to choose instead) refuses the whole batch up
    front, so one bad name neither refuses every file one by one nor stores any of them unlabelled."""
    cleaned = clean_category_name(name)
    for row in list_categories(db, include_archived=True):
        if row.archived and row.name.casefold() == cleaned.casefold():
            if row.merged_into:
                how = f"it was merged into {row.merged_into!r}: choose that one"
            else:
                how = "un-archive it (Categories & data), or choose another category"
            raise CategoryError(f"the category {row.name!r} is archived; {how}")
    return cleaned


def get_or_add_category(db: Database, name: str, *, actor: str) -> str:
    """The live category a name typed into a labelling control means: an existing one (case and spacing aside),
    else a new one created now by `actor`. Raises the ProdcatError that says why not (empty, too long, archived, or a
    role that may not add categories)."""
    cleaned = usable_category_name(db, name)
    for row in list_categories(db):
        if row.name.casefold() == cleaned.casefold():
            return row.name
    return add_category(db, cleaned, actor=actor).name
