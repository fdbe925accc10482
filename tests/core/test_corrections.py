"""One definition of a correction: the training plan and the dashboard count the same events, bookkeeping never."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core.catalog.labels import (
    SeenPrediction,
    bulk_relabel,
    clear_label,
    merge_categories,
    rename_category,
    set_label,
    undo_last_change,
)
from core.db import Database
from core.ml.training import training_plan
from core.views.dashboard import corrections_per_day
from tests.core.factories import FakeImage, build

pytestmark = pytest.mark.both_databases

CATALOGUE = [
    FakeImage(label="Shoes"),  # 0
    FakeImage(label="Shoes"),  # 1
    FakeImage(label="Hats"),  # 2
    FakeImage(label=None),  # 3
    FakeImage(label=None),  # 4
    FakeImage(label=None),  # 5
    FakeImage(label="Bags"),  # 6
]


def test_training_plan_and_dashboard_count_the_same_corrections(db: Database) -> None:
    made = build(db, CATALOGUE)  # labels arrive as "import" events, before the active version was made
    ids = [int(i) for i in made.image_ids]
    version = int(made.version_id or 0)

    def seen(name: str) -> SeenPrediction:
        return SeenPrediction(version, made.id_of(name), 0.9)

    assert training_plan(db).corrections_since_active == 0
    set_label(db, ids[3], "Hats", actor="alice", seen_prediction=seen("Hats"))  # accepted: labelling
    set_label(db, ids[4], "Bags", actor="alice", seen_prediction=seen("Shoes"))  # overrode the model: correction
    set_label(db, ids[5], "Shoes", actor="alice")  # first label, no prediction shown: labelling
    set_label(db, ids[0], "Bags", actor="alice")  # changed a label: correction
    clear_label(db, ids[2], actor="alice")  # removed a label: correction
    bulk_relabel(db, [ids[1], ids[6]], "Hats", actor="bob")  # two labels changed: two corrections
    set_label(db, ids[0], "Hats", actor="carol")  # a change ...
    undo_last_change(db, actor="carol")  # ... taken back: neither the change nor the undo counts
    rename_category(db, "Shoes", "Footwear", actor="admin")  # bookkeeping
    merge_categories(db, "Bags", "Hats", actor="admin")  # bookkeeping, though it moves labels

    assert training_plan(db).corrections_since_active == 5
    today = datetime.now(UTC).date()
    frame = corrections_per_day(db, days=3, today=today)
    assert frame[["label_changes", "corrections"]].iloc[-1].tolist() == [7, 5]
    assert frame[["label_changes", "corrections"]].iloc[:-1].to_numpy().sum() == 0


def test_a_bulk_change_records_what_the_grid_showed_so_bulk_accepts_are_not_corrections(db: Database) -> None:
    from core.catalog.labels import audit_trail

    made = build(db, CATALOGUE)
    ids = [int(i) for i in made.image_ids]
    version = int(made.version_id or 0)
    shown = {
        ids[3]: SeenPrediction(version, made.id_of("Hats"), 0.9),
        ids[4]: SeenPrediction(version, made.id_of("Hats"), 0.8),
        ids[5]: SeenPrediction(version, made.id_of("Bags"), 0.7),
    }
    # The grid showed Hats, Hats, Bags; the person selects all three and applies Hats.
    bulk_relabel(db, [ids[3], ids[4], ids[5]], "Hats", actor="alice", seen_predictions=shown)

    assert training_plan(db).corrections_since_active == 1  # only image 5: the model said Bags
    last = audit_trail(db, ids[5])[-1]
    assert (last.action, last.new_category, last.predicted_category) == ("bulk", "Hats", "Bags")
    assert last.predicted_confidence is not None and abs(last.predicted_confidence - 0.7) < 1e-9


def test_a_change_counts_until_an_undo_event_names_it_in_its_column(db: Database) -> None:
    from sqlalchemy import insert

    from core.schema import LabelAction, LabelEvent, utcnow

    made = build(db, CATALOGUE)
    ids = [int(i) for i in made.image_ids]
    change = set_label(db, ids[0], "Bags", actor="alice")  # changed a label: a correction
    assert training_plan(db).corrections_since_active == 1
    # Notes are for people: an undo event that names the change only in its note takes nothing back.
    bags, note = made.id_of("Bags"), f"undo of event #{change.event_id} (set)"
    in_words_only = dict(image_id=ids[0], old_category_id=bags, new_category_id=bags, actor="alice", note=note)
    with db.write() as session:
        session.execute(insert(LabelEvent), [{**in_words_only, "action": LabelAction.UNDO, "created_at": utcnow()}])
    assert training_plan(db).corrections_since_active == 1
    [undo] = undo_last_change(db, actor="alice")
    assert undo.image_id == ids[0] and training_plan(db).corrections_since_active == 0
