"""Labels and categories: set/clear/bulk/undo with an audit trail that always agrees with the current label."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, select

from core import auth
from core import db as core_db
from core.catalog import labels
from core.catalog.ingest import import_paths
from core.db import Database
from core.errors import CategoryError, NotFound, ProdcatError
from core.schema import AuditEvent, Category, Image, Label, LabelAction, LabelEvent, utcnow
from core.settings import get_settings
from tests.core.factories import FakeImage, Populated, build
from tests.imagegen import image_bytes

pytestmark = pytest.mark.both_databases


@pytest.fixture
def made(db: Database) -> Populated:
    """Six unlabelled images, the categories Shoes, Bags, Hats and one model version."""
    return build(db, [FakeImage(split=s) for s in ("train", "train", "val", "test", "train", "val")])


@pytest.fixture
def ids(made: Populated) -> list[int]:
    return [int(i) for i in made.image_ids]


def current(db: Database, image_id: int) -> str | None:
    with db.read() as session:
        label = session.get(Label, image_id)
        if label is None:
            return None
        category = session.get(Category, label.category_id)
        assert category is not None
        return category.name


def replay(db: Database, image_id: int) -> str | None:
    """The label an image ends up with if its audit events are applied in order."""
    with db.read() as session:
        events = session.scalars(select(LabelEvent).where(LabelEvent.image_id == image_id).order_by(LabelEvent.id))
        state: int | None = None
        for event in events:
            assert event.old_category_id == state, f"event #{event.id} starts from a label the image did not have"
            state = event.new_category_id
        if state is None:
            return None
        category = session.get(Category, state)
        assert category is not None
        return category.name


def test_set_change_and_clear_are_audited_newest_first(db: Database, made: Populated, ids: list[int]) -> None:
    assert made.version_id is not None
    seen = labels.SeenPrediction(model_version_id=made.version_id, category_id=made.id_of("Bags"), confidence=0.8)
    first = labels.set_label(db, ids[0], "Shoes", actor="alice", seen_prediction=seen)
    assert (first.old_category, first.new_category) == (None, "Shoes") and first.changed
    second = labels.set_label(db, ids[0], "Bags", actor="bob")
    assert (second.old_category, second.new_category) == ("Shoes", "Bags")
    cleared = labels.clear_label(db, ids[0], actor="carol")
    assert (cleared.old_category, cleared.new_category) == ("Bags", None)
    assert current(db, ids[0]) is None

    trail = labels.audit_trail(db, ids[0])
    assert [(r.actor, r.action, r.old_category, r.new_category) for r in trail] == [
        ("carol", "clear", "Bags", None),
        ("bob", "set", "Shoes", "Bags"),
        ("alice", "set", None, "Shoes"),
    ]
    assert trail[-1].predicted_category == "Bags" and trail[-1].predicted_confidence == pytest.approx(0.8)
    assert trail[-1].model_version_id == made.version_id


def test_setting_the_same_label_writes_no_event(db: Database, ids: list[int]) -> None:
    labels.set_label(db, ids[0], "Hats", actor="alice")
    again = labels.set_label(db, ids[0], "Hats", actor="alice")
    assert not again.changed and again.new_category == "Hats"
    assert len(labels.audit_trail(db, ids[0])) == 1


def test_category_accepted_by_id_and_by_digit_string(db: Database, ids: list[int]) -> None:
    hats = next(c for c in labels.list_categories(db) if c.name == "Hats")
    assert labels.set_label(db, ids[0], hats.id, actor="a").new_category == "Hats"
    assert labels.set_label(db, ids[1], str(hats.id), actor="a").new_category == "Hats"


@pytest.mark.parametrize(
    ("image", "category", "error", "named"),
    [
        (999_999, "Shoes", NotFound, "999999"),
        (0, "Sandals", NotFound, "Sandals"),
        (0, 4242, NotFound, "4242"),
        (0, "   ", CategoryError, "empty"),
    ],
)
def test_bad_input_is_refused_by_name_and_changes_nothing(
    db: Database, ids: list[int], image: int, category: str | int, error: type[Exception], named: str
) -> None:
    image_id = image or ids[0]
    with pytest.raises(error, match=named):
        labels.set_label(db, image_id, category, actor="alice")
    assert current(db, ids[0]) is None
    assert labels.audit_trail(db, ids[0]) == []


def test_archived_category_refuses_new_labels_but_keeps_old_ones(db: Database, ids: list[int]) -> None:
    labels.set_label(db, ids[0], "Hats", actor="alice")
    labels.archive_category(db, "Hats", actor="admin")
    with pytest.raises(CategoryError, match="'Hats' is archived"):
        labels.set_label(db, ids[1], "Hats", actor="alice")
    with pytest.raises(CategoryError, match="archived"):
        labels.bulk_relabel(db, ids[1:3], "Hats", actor="alice")
    assert current(db, ids[0]) == "Hats"
    assert "Hats" not in [c.name for c in labels.list_categories(db)]
    archived = {c.name: c for c in labels.list_categories(db, include_archived=True)}["Hats"]
    assert archived.archived and archived.labelled == 1
    labels.unarchive_category(db, "Hats", actor="admin")
    assert labels.set_label(db, ids[1], "Hats", actor="alice").changed


def test_bulk_relabel_one_event_per_changed_image(db: Database, ids: list[int]) -> None:
    labels.set_label(db, ids[0], "Bags", actor="alice")
    labels.set_label(db, ids[1], "Shoes", actor="alice")
    changes = labels.bulk_relabel(db, [ids[0], ids[1], ids[2], ids[2]], "Bags", actor="bob")
    # ids[0] already was Bags: no event for it; the duplicate id counts once.
    assert sorted((c.image_id, c.old_category, c.new_category) for c in changes) == [
        (ids[1], "Shoes", "Bags"),
        (ids[2], None, "Bags"),
    ]
    assert [r.action for r in labels.audit_trail(db, ids[2])] == ["bulk"]
    assert [current(db, i) for i in ids[:3]] == ["Bags", "Bags", "Bags"]


def test_bulk_relabel_with_an_unknown_id_changes_nothing(db: Database, ids: list[int]) -> None:
    with pytest.raises(NotFound, match="123456"):
        labels.bulk_relabel(db, [ids[0], 123456, ids[1]], "Shoes", actor="bob")
    assert current(db, ids[0]) is None and current(db, ids[1]) is None


def test_undo_steps_back_through_own_changes(db: Database, ids: list[int]) -> None:
    labels.set_label(db, ids[0], "Shoes", actor="alice")
    labels.set_label(db, ids[0], "Bags", actor="alice")
    labels.bulk_relabel(db, ids[1:4], "Hats", actor="alice")

    undone = labels.undo_last_change(db, actor="alice")  # the whole bulk change at once
    assert sorted(c.image_id for c in undone) == ids[1:4]
    assert [current(db, i) for i in ids[1:4]] == [None, None, None]
    assert [c.new_category for c in labels.undo_last_change(db, actor="alice")] == ["Shoes"]
    assert [c.new_category for c in labels.undo_last_change(db, actor="alice")] == [None]
    with pytest.raises(NotFound, match="nothing to undo"):
        labels.undo_last_change(db, actor="alice")

    # The originals stay in the trail; each undo is an event of its own.
    assert [r.action for r in labels.audit_trail(db, ids[0])] == ["undo", "undo", "set", "set"]
    for image_id in ids:
        assert replay(db, image_id) == current(db, image_id)


def test_undo_limited_to_given_events_leaves_the_same_named_colleagues_work_alone(db: Database, ids: list[int]) -> None:
    # Two browser sessions both signed "staff": each undo may only take back its own session's changes.
    recorded = [labels.set_label(db, ids[0], "Shoes", actor="staff").event_id]
    recorded += [c.event_id for c in labels.bulk_relabel(db, ids[1:3], "Hats", actor="staff")]
    theirs = labels.set_label(db, ids[3], "Bags", actor="staff").event_id  # newest, by the other session
    mine = [event_id for event_id in recorded if event_id is not None]
    assert mine == recorded and theirs is not None

    undone = labels.undo_last_change(db, actor="staff", only_event_ids=mine[1:2])  # one event names the batch
    assert sorted(c.image_id for c in undone) == ids[1:3]  # the whole bulk change, not the colleague's
    assert [current(db, i) for i in ids[:4]] == ["Shoes", None, None, "Bags"]
    assert [c.image_id for c in labels.undo_last_change(db, actor="staff", only_event_ids=mine)] == [ids[0]]
    with pytest.raises(NotFound, match="nothing to undo: 'staff' has no label change among the given changes"):
        labels.undo_last_change(db, actor="staff", only_event_ids=mine)
    with pytest.raises(NotFound, match="among the given changes"):
        labels.undo_last_change(db, actor="staff", only_event_ids=[])
    assert current(db, ids[3]) == "Bags"
    # Someone else's ids do not make their changes undoable under another name.
    with pytest.raises(NotFound, match="nothing to undo"):
        labels.undo_last_change(db, actor="alice", only_event_ids=[theirs])
    assert [c.image_id for c in labels.undo_last_change(db, actor="staff")] == [ids[3]]  # unrestricted: as before


def test_undo_refuses_when_someone_else_changed_the_image_since(db: Database, ids: list[int]) -> None:
    labels.set_label(db, ids[0], "Shoes", actor="alice")
    labels.set_label(db, ids[0], "Bags", actor="bob")
    with pytest.raises(CategoryError, match="changed since by 'bob'"):
        labels.undo_last_change(db, actor="alice")
    assert current(db, ids[0]) == "Bags"
    with pytest.raises(NotFound, match="nothing to undo"):
        labels.undo_last_change(db, actor="carol")


def test_rename_keeps_id_and_history_and_refuses_existing_names(db: Database, ids: list[int]) -> None:
    labels.set_label(db, ids[0], "Shoes", actor="alice")
    before = {c.name: c.id for c in labels.list_categories(db)}
    row = labels.rename_category(db, "Shoes", "Footwear", actor="admin")
    assert row.id == before["Shoes"] and row.labelled == 1
    assert current(db, ids[0]) == "Footwear"
    trail = labels.audit_trail(db, ids[0])
    assert trail[0].action == "rename" and "'Shoes' renamed to 'Footwear'" in trail[0].note
    with pytest.raises(CategoryError, match=r"'Bags'.*exists"):
        labels.rename_category(db, "Footwear", "Bags", actor="admin")
    with pytest.raises(NotFound, match="Shoes"):
        labels.rename_category(db, "Shoes", "Boots", actor="admin")
    assert replay(db, ids[0]) == "Footwear"


def test_merge_moves_every_label_with_an_audit_row_and_archives_source(db: Database, ids: list[int]) -> None:
    labels.bulk_relabel(db, ids[:3], "Hats", actor="alice")
    labels.set_label(db, ids[3], "Bags", actor="alice")
    moved = labels.merge_categories(db, "Hats", "Bags", actor="admin")
    assert moved == 3
    assert [current(db, i) for i in ids[:4]] == ["Bags"] * 4
    trail = labels.audit_trail(db, ids[0])
    # The old name stays visible: the source keeps its name, archived, pointing at the target.
    assert (trail[0].action, trail[0].old_category, trail[0].new_category) == ("merge", "Hats", "Bags")
    rows = {c.name: c for c in labels.list_categories(db, include_archived=True)}
    assert rows["Hats"].archived and rows["Hats"].merged_into == "Bags" and rows["Hats"].labelled == 0
    assert rows["Bags"].labelled == 4
    with pytest.raises(CategoryError, match="onto itself"):
        labels.merge_categories(db, "Bags", "Bags", actor="admin")
    with pytest.raises(CategoryError, match="archived"):
        labels.merge_categories(db, "Shoes", "Hats", actor="admin")
    # alice's last change (ids[3] -> Bags) was untouched by the merge and undoes; her bulk Hats change was
    # moved by admin's merge since, so undo refuses it rather than reverting into an archived category.
    assert [c.new_category for c in labels.undo_last_change(db, actor="alice")] == [None]
    with pytest.raises(CategoryError, match="changed since by 'admin'"):
        labels.undo_last_change(db, actor="alice")
    for image_id in ids:
        assert replay(db, image_id) == current(db, image_id)


def test_add_category_refuses_duplicates_and_counts(db: Database, ids: list[int]) -> None:
    row = labels.add_category(db, "  Scarves ", actor="admin")
    assert row.name == "Scarves" and row.labelled == 0 and not row.archived
    with pytest.raises(CategoryError, match="'Scarves' already exists"):
        labels.add_category(db, "Scarves", actor="admin")
    labels.bulk_relabel(db, ids, "Scarves", actor="a")
    counts = {c.name: c.labelled for c in labels.list_categories(db)}
    assert counts == {"Bags": 0, "Hats": 0, "Scarves": 6, "Shoes": 0}


def test_empty_actor_is_refused(db: Database, ids: list[int]) -> None:
    with pytest.raises(ProdcatError, match="actor is empty"):
        labels.set_label(db, ids[0], "Shoes", actor="  ")


def test_many_mixed_changes_replay_to_the_current_labels(db: Database, ids: list[int]) -> None:
    actions = [
        lambda: labels.set_label(db, ids[0], "Shoes", actor="a"),
        lambda: labels.bulk_relabel(db, ids[:4], "Bags", actor="b"),
        lambda: labels.clear_label(db, ids[1], actor="a"),
        lambda: labels.rename_category(db, "Bags", "Handbags", actor="c"),
        lambda: labels.undo_last_change(db, actor="a"),
        lambda: labels.merge_categories(db, "Handbags", "Hats", actor="c"),
        lambda: labels.set_label(db, ids[5], "Shoes", actor="b"),
    ]
    for action in actions:
        action()
    assert [current(db, i) for i in ids] == ["Hats", "Hats", "Hats", "Hats", None, "Shoes"]
    for image_id in ids:
        assert replay(db, image_id) == current(db, image_id)


def test_names_differing_only_in_case_or_spacing_are_one_category(db: Database, ids: list[int]) -> None:
    assert labels.clean_category_name(" Running \u00a0 Shoes ") == "Running Shoes"
    assert labels.clean_category_name("\u3000靴\u3000\u3000下") == "靴 下"
    with pytest.raises(CategoryError, match="control characters"):
        labels.clean_category_name("Running\tShoes")  # tabs and line breaks are still refused, not spaces
    shoes_id = next(c.id for c in labels.list_categories(db) if c.name == "Shoes")

    with pytest.raises(CategoryError, match="'shoes' is the same as the existing category 'Shoes'"):
        labels.add_category(db, "shoes", actor="admin")
    with pytest.raises(CategoryError, match="'SHOES' is the same as the existing category 'Shoes'"):
        labels.add_category(db, " SHOES ", actor="admin")
    labels.add_category(db, "Running Shoes", actor="admin")
    with pytest.raises(CategoryError, match="'running shoes' is the same as the existing category 'Running Shoes'"):
        labels.add_category(db, "running\u00a0\u00a0shoes", actor="admin")
    with pytest.raises(CategoryError, match="'shoes' is the same as the existing category 'Shoes'"):
        labels.rename_category(db, "Hats", "shoes", actor="admin")

    # A different case of a category's own name is a rename, keeping its id and labels.
    labels.set_label(db, ids[0], "Shoes", actor="alice")
    row = labels.rename_category(db, "Shoes", "SHOES", actor="admin")
    assert (row.id, row.name, row.labelled) == (shoes_id, "SHOES", 1)
    # Any case finds it again, for labelling as for renaming.
    assert labels.set_label(db, ids[1], "shoes", actor="alice").new_category == "SHOES"
    assert labels.rename_category(db, "shoes", "Shoes", actor="admin").id == shoes_id
    assert sorted(c.name for c in labels.list_categories(db)) == ["Bags", "Hats", "Running Shoes", "Shoes"]


def test_import_into_a_folder_named_in_another_case_labels_the_existing_category(
    db: Database, made: Populated, tmp_path: Path
) -> None:
    for folder, index in (("shoes", 0), ("SHOES", 1), ("Running\u00a0 Shoes", 2), ("running shoes", 3)):
        (tmp_path / "photos" / folder).mkdir(parents=True)
        (tmp_path / "photos" / folder / f"p{index}.png").write_bytes(image_bytes("Shoes", index, size=24))
    labels.add_category(db, "Running Shoes", actor="admin")
    result = import_paths(db, [tmp_path / "photos"], labels_from_folders=True, actor="alice")
    assert len(result.imported) == 4 and not result.refused
    counts = {c.name: c.labelled for c in labels.list_categories(db)}
    assert counts == {"Bags": 0, "Hats": 0, "Running Shoes": 2, "Shoes": 2}


def _add_events(db: Database, rows: list[dict[str, Any]]) -> None:
    now = utcnow()
    with db.write() as session:
        session.execute(insert(LabelEvent), [{"created_at": now, "note": "", **row} for row in rows])


def test_undo_is_right_among_many_events_of_other_actors(db: Database) -> None:
    made = build(db, [FakeImage(split="train") for _ in range(40)])
    ids = [int(i) for i in made.image_ids]
    shoes, bags = made.id_of("Shoes"), made.id_of("Bags")
    first = labels.set_label(db, ids[0], "Shoes", actor="alice")
    labels.bulk_relabel(db, ids[1:4], "Hats", actor="alice")
    # Thousands of other actors' events on other images, including undo events naming alice's events (only
    # her own undo takes her change back), an undo whose note alone names her change (notes are for people: undo
    # reads undoes_event_id), and alice's own imports, which undo steps over.
    others = ids[10:]
    noise: list[dict[str, Any]] = []
    for k in range(3000):
        image_id = others[k % len(others)]
        noise.append(
            dict(image_id=image_id, old_category_id=None, new_category_id=bags, actor=f"u{k % 7}", action="set")
        )
    for event_id in range(first.event_id or 0, (first.event_id or 0) + 4):
        noise.append(
            dict(
                image_id=others[0],
                new_category_id=shoes,
                actor="bob",
                action="undo",
                note=f"undo of event #{event_id} (set)",
                undoes_event_id=event_id,
            )
        )
    in_words_only = dict(image_id=ids[0], old_category_id=shoes, new_category_id=shoes, actor="alice", action="undo")
    noise.append({**in_words_only, "note": f"undo of event #{first.event_id} (set)"})
    noise += [dict(image_id=others[1], new_category_id=shoes, actor="alice", action="import") for _ in range(500)]
    _add_events(db, noise)
    labels.set_label(db, ids[4], "Bags", actor="alice")

    assert [(c.image_id, c.new_category) for c in labels.undo_last_change(db, actor="alice")] == [(ids[4], None)]
    assert sorted(c.image_id for c in labels.undo_last_change(db, actor="alice")) == ids[1:4]  # the whole batch
    assert [(c.image_id, c.new_category) for c in labels.undo_last_change(db, actor="alice")] == [(ids[0], None)]
    with pytest.raises(NotFound, match="nothing to undo"):
        labels.undo_last_change(db, actor="alice")
    for image_id in ids[:10]:
        assert current(db, image_id) is None and replay(db, image_id) is None


def test_undo_finds_the_last_change_through_the_actor_index(db: Database, ids: list[int]) -> None:
    """Undo holds the write lock: its lookup must not read the whole audit trail (no `SCAN label_events`)."""
    for k in range(10):  # older history that undo has no reason to read
        labels.set_label(db, ids[4], ("Shoes", "Bags")[k % 2], actor="alice")
    labels.bulk_relabel(db, ids[:3], "Hats", actor="alice")
    labels.set_label(db, ids[3], "Bags", actor="alice")
    labels.undo_last_change(db, actor="alice")  # so the lookup has an undo to step over

    statements: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if not executemany and statement.lstrip().upper().startswith("SELECT") and "label_events" in statement:
            statements.append((statement, parameters))

    loaded: list[int] = []

    def count(target: LabelEvent, context: Any) -> None:
        loaded.append(target.id)

    event.listen(db.write_engine, "before_cursor_execute", record)
    event.listen(LabelEvent, "load", count)
    try:
        changes = labels.undo_last_change(db, actor="alice")  # the bulk batch
    finally:
        event.remove(db.write_engine, "before_cursor_execute", record)
        event.remove(LabelEvent, "load", count)
    assert sorted(c.image_id for c in changes) == ids[:3]
    assert len(loaded) <= 1 + 3  # the newest undoable event and its batch: no reading of the whole history

    if not db.is_sqlite:
        return  # the plan below is SQLite's EXPLAIN QUERY PLAN; PostgreSQL picks by table statistics
    plans: list[str] = []
    with db.engine.connect() as connection:
        for statement, parameters in statements:
            rows = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
            plans.append(" | ".join(row[-1] for row in rows))
    assert statements and not [p for p in plans if re.search(r"\bSCAN label_events", p)], plans
    assert any("ix_label_events_actor_id (actor=?)" in p for p in plans), plans


# --- B6: a change carries the label the person saw --------------------------------------------------------------


def test_a_label_changed_in_another_tab_is_not_overwritten_and_the_person_is_told_who(
    db: Database, ids: list[int]
) -> None:
    labels.set_label(db, ids[0], "Shoes", actor="alice")
    # Both tabs showed the photo as Shoes; bob's click lands first.
    labels.set_label(db, ids[0], "Bags", actor="bob", expected_label="Shoes")
    with pytest.raises(labels.LabelConflict) as refused:
        labels.set_label(db, ids[0], "Hats", actor="carol", expected_label="Shoes")
    conflict = refused.value
    assert (conflict.image_id, conflict.expected, conflict.current, conflict.changed_by) == (
        ids[0],
        "Shoes",
        "Bags",
        "bob",
    )
    assert conflict.changed_at is not None and conflict.changed_at <= utcnow()
    assert "'Bags'" in str(conflict) and "bob" in str(conflict) and "you saw 'Shoes'" in str(conflict)
    assert current(db, ids[0]) == "Bags"
    assert [r.actor for r in labels.audit_trail(db, ids[0])] == ["bob", "alice"]
    # Once she has seen Bags, her choice goes through; the same label as now is no conflict either.
    assert labels.set_label(db, ids[0], "Hats", actor="carol", expected_label="Bags").changed
    assert not labels.set_label(db, ids[0], "Hats", actor="dan", expected_label=None).changed


def test_seen_unlabelled_category_ids_and_merges_compare_by_what_they_mean_today(db: Database, ids: list[int]) -> None:
    bags = next(c.id for c in labels.list_categories(db) if c.name == "Bags")
    with pytest.raises(labels.LabelConflict, match="is now unlabelled"):
        labels.set_label(db, ids[0], "Hats", actor="a", expected_label="Bags")
    labels.set_label(db, ids[0], bags, actor="a", expected_label=None)
    with pytest.raises(labels.LabelConflict):
        labels.set_label(db, ids[0], "Hats", actor="b", expected_label=None)
    assert labels.set_label(db, ids[0], "Shoes", actor="b", expected_label=bags).changed
    labels.add_category(db, "Sneakers", actor="a")
    labels.set_label(db, ids[1], "Sneakers", actor="a")
    labels.merge_categories(db, "Sneakers", "Shoes", actor="admin")
    # The grid still said Sneakers; that is Shoes today, so the change is no conflict.
    assert labels.set_label(db, ids[1], "Hats", actor="b", expected_label="Sneakers").changed
    assert labels.clear_label(db, ids[1], actor="b", expected_label="Hats").changed


def test_a_bulk_change_with_a_conflict_writes_nothing_and_names_every_conflicting_image(
    db: Database, ids: list[int]
) -> None:
    seen: dict[int, str | int | None] = {i: None for i in ids[:4]}
    labels.set_label(db, ids[1], "Shoes", actor="bob")
    labels.set_label(db, ids[3], "Hats", actor="bob")  # the same label the batch gives: no conflict
    labels.set_label(db, ids[2], "Bags", actor="eve")
    with pytest.raises(labels.LabelConflict) as refused:
        labels.bulk_relabel(db, ids[:4], "Hats", actor="alice", expected_labels=seen)
    assert [(c.image_id, c.current, c.changed_by) for c in refused.value.conflicts] == [
        (ids[1], "Shoes", "bob"),
        (ids[2], "Bags", "eve"),
    ]
    assert "2 of the 4 images changed since you saw them" in str(refused.value)
    assert [current(db, i) for i in ids[:4]] == [None, "Shoes", "Bags", "Hats"]
    # Re-applied without the two in the way: one undoable batch.
    changes = labels.bulk_relabel(db, [ids[0], ids[3]], "Hats", actor="alice", expected_labels=seen)
    assert [c.image_id for c in changes] == [ids[0]]


# --- Category lifecycle: delete -------------------------------------------------------------------------------


def test_a_category_nothing_names_is_deleted_outright_and_its_name_is_free(db: Database, ids: list[int]) -> None:
    labels.add_category(db, "Scraves", actor="admin")  # a typo
    done = labels.delete_category(db, "Scraves", actor="admin")
    assert (done.name, done.moved, done.moved_to, done.kept_for_history) == ("Scraves", 0, None, False)
    with db.read() as session:
        assert session.scalar(select(Category).where(Category.name.like("Scraves%"))) is None
    assert labels.add_category(db, "Scraves", actor="admin").name == "Scraves"


def test_a_category_with_labels_is_deleted_only_by_moving_them_and_history_keeps_its_name(
    db: Database, ids: list[int]
) -> None:
    labels.bulk_relabel(db, ids[:3], "Hats", actor="alice")
    with pytest.raises(CategoryError, match="'Hats' has 3 labelled images: move them"):
        labels.delete_category(db, "Hats", actor="admin")
    labels.archive_category(db, "Shoes", actor="admin")
    with pytest.raises(CategoryError, match="'Shoes' is archived"):
        labels.delete_category(db, "Hats", actor="admin", move_to="Shoes")
    assert [current(db, i) for i in ids[:3]] == ["Hats"] * 3

    done = labels.delete_category(db, "Hats", actor="admin", move_to="Bags")
    assert (done.moved, done.moved_to, done.kept_for_history) == (3, "Bags", True)
    assert [current(db, i) for i in ids[:3]] == ["Bags"] * 3
    [moved, labelled] = labels.audit_trail(db, ids[0])
    assert (moved.actor, moved.action, moved.new_category) == ("admin", "delete-category", "Bags")
    assert moved.old_category is not None
    assert re.fullmatch(r"Hats \(deleted #\d+\)", moved.old_category) and labelled.new_category == moved.old_category
    assert "'Hats' deleted" in moved.note
    assert [replay(db, i) for i in ids[:3]] == ["Bags"] * 3  # the audit trail still explains every label
    assert "Hats" not in [c.name for c in labels.list_categories(db, include_archived=True)]
    deleted = moved.old_category
    with pytest.raises(CategoryError, match="was deleted"):
        labels.unarchive_category(db, deleted, actor="admin")
    with pytest.raises(CategoryError, match="already deleted"):
        labels.delete_category(db, deleted, actor="admin")
    assert labels.add_category(db, "Hats", actor="admin").labelled == 0  # the name is free again


def test_confirming_a_label_is_audited_but_is_neither_a_change_nor_undoable(db: Database) -> None:
    from sqlalchemy import func

    from core.catalog.corrections import label_change_clause
    from core.catalog.labels import audit_trail, confirm_label, set_label, undo_last_change

    made = build(db, [FakeImage(split="train", label=None), FakeImage(split="train", label=None)])
    image_id, unlabelled = (int(i) for i in made.image_ids)
    set_label(db, image_id, "Shoes", actor="ann")
    kept = confirm_label(db, image_id, actor="bob", expected_label="Shoes")
    assert (kept.old_category, kept.new_category) == ("Shoes", "Shoes") and kept.event_id is not None
    trail = audit_trail(db, image_id)
    assert [(e.action, e.actor) for e in trail] == [("confirm", "bob"), ("set", "ann")]
    with db.read() as session:  # not a label change (the dashboard and the training plan do not count it)
        assert session.scalar(select(func.count()).select_from(LabelEvent).where(label_change_clause())) == 1
    # Bob has agreed with ann's label since: her undo would overturn his judgement, so it is refused, naming him.
    with pytest.raises(CategoryError, match="was confirmed since by 'bob'"):
        undo_last_change(db, actor="ann")
    with pytest.raises(NotFound, match="nothing to undo"):  # and a confirmation itself is nothing to undo
        undo_last_change(db, actor="bob")
    with pytest.raises(ProdcatError, match="no label to confirm"):
        confirm_label(db, unlabelled, actor="bob")


def test_a_skip_is_audited_with_the_person_but_is_no_change_and_undo_steps_over_it(
    db: Database, ids: list[int]
) -> None:
    from sqlalchemy import func

    from core.catalog.corrections import correction_clause, label_change_clause

    labels.set_label(db, ids[0], "Shoes", actor="ann")
    labels.set_label(db, ids[0], "Bags", actor="ann")  # a correction of her own first label
    before = utcnow()
    skipped = labels.record_skip(db, ids[0], actor="ann")
    labels.record_skip(db, ids[0], actor="bob")  # a colleague sets it aside too
    labels.record_skip(db, ids[1], actor="ann")  # an unlabelled photo

    trail = labels.audit_trail(db, ids[0])
    assert [(r.action, r.actor, r.old_category, r.new_category) for r in trail] == [
        ("skip", "bob", "Bags", "Bags"),
        ("skip", "ann", "Bags", "Bags"),
        ("set", "ann", "Shoes", "Bags"),
        ("set", "ann", None, "Shoes"),
    ]
    assert trail[1].event_id == skipped.event_id and before <= trail[1].time <= utcnow()
    assert [(r.action, r.old_category, r.new_category) for r in labels.audit_trail(db, ids[1])] == [
        ("skip", None, None)
    ]
    with db.read() as session:  # neither label changes nor corrections (dashboard, training plan)
        count = select(func.count()).select_from(LabelEvent)
        assert session.scalar(count.where(label_change_clause())) == 2
        assert session.scalar(count.where(correction_clause())) == 1
    # A label conflict names who changed the label, not who looked at it since.
    with pytest.raises(labels.LabelConflict) as refused:
        labels.set_label(db, ids[0], "Hats", actor="carol", expected_label="Shoes")
    assert refused.value.changed_by == "ann" and refused.value.conflicts[0].action == LabelAction.SET

    # Undo takes back ann's change before her skip (bob's skip is no objection), then the one before; never a skip.
    undone = labels.undo_last_change(db, actor="ann")
    assert [(c.image_id, c.old_category, c.new_category) for c in undone] == [(ids[0], "Bags", "Shoes")]
    assert labels.undo_last_change(db, actor="ann")[0].new_category is None
    with pytest.raises(NotFound, match="nothing to undo"):
        labels.undo_last_change(db, actor="ann")
    with pytest.raises(NotFound, match="nothing to undo"):
        labels.undo_last_change(db, actor="bob")
    assert current(db, ids[0]) is None and replay(db, ids[0]) is None
    with pytest.raises(NotFound, match="no image with id 999999"):
        labels.record_skip(db, 999999, actor="ann")


# --- The audit trail's meaning in columns: undoes_event_id, batch_id, a typed action -------------------------------


def _events(db: Database, image_ids: list[int]) -> list[Any]:
    """The label events of those images as rows (id, action, note, undoes_event_id, batch_id), oldest first."""
    e = LabelEvent
    with db.read() as session:
        query = select(e.id, e.action, e.note, e.undoes_event_id, e.batch_id).where(e.image_id.in_(image_ids))
        return list(session.execute(query.order_by(e.id)).all())


def test_undo_and_batches_are_columns_and_the_notes_stay_readable(db: Database, ids: list[int]) -> None:
    single = labels.set_label(db, ids[0], "Shoes", actor="alice")
    first = labels.bulk_relabel(db, ids[1:4], "Hats", actor="alice")
    second = labels.bulk_relabel(db, ids[4:6], "Bags", actor="alice")
    undone = labels.undo_last_change(db, actor="alice")  # the second batch, in one step
    assert sorted(c.image_id for c in undone) == ids[4:6]

    by_id = {e.id: e for e in _events(db, ids)}
    assert by_id[single.event_id or 0].batch_id is None and by_id[single.event_id or 0].action is LabelAction.SET
    first_batches = {by_id[c.event_id or 0].batch_id for c in first}
    second_batches = {by_id[c.event_id or 0].batch_id for c in second}
    assert len(first_batches) == 1 and len(second_batches) == 1 and first_batches != second_batches
    assert None not in first_batches | second_batches
    assert by_id[first[0].event_id or 0].note == "bulk relabel of 3 images"  # for people; no machine tag in it
    undos = [by_id[c.event_id or 0] for c in undone]
    assert {u.undoes_event_id for u in undos} == {c.event_id for c in second}
    assert len({u.batch_id for u in undos}) == 1 and undos[0].batch_id not in second_batches | {None}
    assert all(u.note == f"undo of event #{u.undoes_event_id} (bulk)" for u in undos)
    trail = labels.audit_trail(db, ids[4])
    assert (trail[0].action, trail[0].undoes_event_id) == (LabelAction.UNDO, trail[1].event_id)

    # Rename and merge write one batch each.
    labels.rename_category(db, "Hats", "Caps", actor="admin")
    labels.merge_categories(db, "Caps", "Bags", actor="admin")
    moves = [e for e in _events(db, ids[1:4]) if e.action in (LabelAction.RENAME, LabelAction.MERGE)]
    assert len(moves) == 6 and len({(e.action, e.batch_id) for e in moves}) == 2
    assert None not in {e.batch_id for e in moves}


def test_a_misspelt_action_is_refused_before_anything_is_written(db: Database, ids: list[int]) -> None:
    with pytest.raises(ValueError, match="relabel"), db.write() as session:
        labels.apply_label(session, ids[0], 1, actor="alice", action="relabel")
    assert current(db, ids[0]) is None and _events(db, [ids[0]]) == []


# --- Roles, enforced in core --------------------------------------------------------------------------------------


@pytest.fixture
def signed_in(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Database:
    """Sign-in on (PRODCAT_AUTH=builtin) with accounts root (admin), lou and lea (labellers), vic (viewer); six
    unlabelled images and the categories Shoes, Bags, Hats."""
    monkeypatch.setenv("PRODCAT_AUTH", "builtin")
    get_settings.cache_clear()
    core_db.close_all()
    db = core_db.open_database(get_settings())
    assert db.settings.auth == "builtin"
    auth.add_account(db, "root", "admin", None, actor="")  # the first admin needs no actor
    for name, role in (("lou", "labeller"), ("lea", "labeller"), ("vic", "viewer")):
        auth.add_account(db, name, role, None, actor="root")
    build(db, [FakeImage(split="train") for _ in range(6)])
    return db


def _image_ids(db: Database) -> list[int]:
    with db.read() as session:
        return sorted(session.scalars(select(Image.id)))


def _audit_rows(db: Database) -> list[tuple[str, str, str, dict[str, Any]]]:
    with db.read() as session:
        rows = session.scalars(select(AuditEvent).where(AuditEvent.action != "accounts").order_by(AuditEvent.id))
        return [(e.actor, e.action, e.subject, e.detail) for e in rows]


def test_a_viewer_may_not_change_labels_and_nothing_changes(signed_in: Database) -> None:
    db, ids = signed_in, _image_ids(signed_in)
    labels.set_label(db, ids[0], "Shoes", actor="lou")
    before = _events(db, ids)
    for attempt in (
        lambda: labels.set_label(db, ids[0], "Bags", actor="vic"),
        lambda: labels.clear_label(db, ids[0], actor="vic"),
        lambda: labels.confirm_label(db, ids[0], actor="vic"),
        lambda: labels.record_skip(db, ids[0], actor="vic"),
        lambda: labels.bulk_relabel(db, ids[:3], "Bags", actor="vic"),
        lambda: labels.undo_last_change(db, actor="vic"),
        lambda: labels.add_category(db, "Socks", actor="vic"),
    ):
        with pytest.raises(auth.PermissionDenied, match="vic is a viewer"):
            attempt()
    assert current(db, ids[0]) == "Shoes" and [current(db, i) for i in ids[1:3]] == [None, None]
    assert [e.id for e in _events(db, ids)] == [e.id for e in before]
    assert "Socks" not in [c.name for c in labels.list_categories(db)]


def test_a_labeller_labels_and_undoes_own_changes_but_may_not_edit_categories(signed_in: Database) -> None:
    db, ids = signed_in, _image_ids(signed_in)
    assert labels.set_label(db, ids[0], "Shoes", actor="lou").changed
    assert len(labels.bulk_relabel(db, ids[1:3], "Hats", actor="lou")) == 2
    assert labels.add_category(db, "Socks", actor="lou").name == "Socks"  # while labelling
    with pytest.raises(NotFound, match="nothing to undo"):  # another labeller's changes are not hers to undo
        labels.undo_last_change(db, actor="lea")
    assert sorted(c.image_id for c in labels.undo_last_change(db, actor="lou")) == ids[1:3]

    for attempt in (
        lambda: labels.archive_category(db, "Shoes", actor="lou"),
        lambda: labels.rename_category(db, "Shoes", "Footwear", actor="lou"),
        lambda: labels.merge_categories(db, "Shoes", "Bags", actor="lou"),
        lambda: labels.delete_category(db, "Socks", actor="lou"),
    ):
        with pytest.raises(auth.PermissionDenied, match="rename, merge, archive or delete categories"):
            attempt()
    names = {c.name: c for c in labels.list_categories(db, include_archived=True)}
    assert set(names) == {"Shoes", "Bags", "Hats", "Socks"} and not any(c.archived for c in names.values())
    assert current(db, ids[0]) == "Shoes"


def test_an_unknown_or_disabled_actor_is_refused(signed_in: Database) -> None:
    db, ids = signed_in, _image_ids(signed_in)
    with pytest.raises(auth.PermissionDenied, match="'mallory' is not an enabled account"):
        labels.set_label(db, ids[0], "Shoes", actor="mallory")
    auth.disable_account(db, "lou", actor="root")
    with pytest.raises(auth.PermissionDenied, match="'lou' is not an enabled account"):
        labels.set_label(db, ids[0], "Shoes", actor="lou")
    assert current(db, ids[0]) is None and _events(db, [ids[0]]) == []


def test_an_admins_category_edits_leave_audit_rows_naming_the_admin(signed_in: Database) -> None:
    db, ids = signed_in, _image_ids(signed_in)
    labels.set_label(db, ids[0], "Hats", actor="lou")
    socks = labels.add_category(db, "Socks", actor="lou")
    hats = labels.archive_category(db, "Hats", actor="root")
    assert hats.archived
    labels.unarchive_category(db, "Hats", actor="root")
    labels.rename_category(db, "Hats", "Caps", actor="root")
    labels.merge_categories(db, "Caps", "Bags", actor="root")
    labels.delete_category(db, "Socks", actor="root")
    edits, hats_id, socks_id = "edit_categories", f"category {hats.id}", f"category {socks.id}"
    merged = {"change": "merge", "name": "Caps", "into": _id(db, "Bags"), "into_name": "Bags", "moved": 1}
    deleted = {"change": "delete", "name": "Socks", "moved": 0, "moved_to": None, "kept_for_history": False}
    assert _audit_rows(db) == [
        ("lou", "add_category", socks_id, {"change": "add", "name": "Socks"}),
        ("root", edits, hats_id, {"change": "archive", "name": "Hats"}),
        ("root", edits, hats_id, {"change": "unarchive", "name": "Hats"}),
        ("root", edits, hats_id, {"change": "rename", "old": "Hats", "new": "Caps"}),
        ("root", edits, hats_id, merged),
        ("root", edits, socks_id, deleted),
    ]
    assert current(db, ids[0]) == "Bags"


def _id(db: Database, name: str) -> int:
    with db.read() as session:
        return int(session.scalar(select(Category.id).where(Category.name == name)) or 0)
