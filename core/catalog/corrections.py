"""What counts as a correction: the one definition behind the training plan and the dashboard's corrections per day.

A *label change* is a person's judgement about one image (actions set, bulk, clear) that still stands. Imports,
renames and merges are batch bookkeeping, not judgements. An undo takes an earlier change back: the undo itself
is not a change, and the change it took back no longer counts either (together they changed nothing).

A *look* (actions confirm: a person kept the label shown; skip: a person set the image aside in keyboard review) is
recorded with who and when, old = new: it changes nothing, so it is no label change, no correction and no undo step,
and it is never the event that "changed" a label.

A *correction* is a label change that either changed an existing label (to another category or to none) or chose
a category other than the prediction the person was shown. Accepting the model's prediction, or giving a first
label with no prediction shown, is labelling, not correcting.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, and_, exists, select
from sqlalchemy.orm import aliased

from core.schema import LabelAction, LabelEvent

PERSON_ACTIONS: tuple[LabelAction, ...] = (LabelAction.SET, LabelAction.BULK, LabelAction.CLEAR)
LOOK_ACTIONS: tuple[LabelAction, ...] = (LabelAction.CONFIRM, LabelAction.SKIP)


def _undone() -> ColumnElement[bool]:
    """The event was taken back by a later undo (an undo event names it in `undoes_event_id`, which is indexed)."""
    undo = aliased(LabelEvent)
    return exists(select(undo.id).where(undo.undoes_event_id == LabelEvent.id))


def label_change_clause() -> ColumnElement[bool]:
    """WHERE term on `LabelEvent`: a person's label change that still stands (see the module docstring)."""
    return and_(LabelEvent.action.in_(PERSON_ACTIONS), ~_undone())


def correction_clause() -> ColumnElement[bool]:
    """WHERE term on `LabelEvent`: a label change that changed an existing label or overrode the shown prediction."""
    changed_existing = LabelEvent.old_category_id.is_not(None) & (
        LabelEvent.new_category_id.is_(None) | (LabelEvent.new_category_id != LabelEvent.old_category_id)
    )
    overrode = (
        LabelEvent.predicted_category_id.is_not(None)
        & LabelEvent.new_category_id.is_not(None)
        & (LabelEvent.new_category_id != LabelEvent.predicted_category_id)
    )
    return and_(label_change_clause(), changed_existing | overrode)
