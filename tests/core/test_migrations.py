"""The Alembic migrations build exactly the schema the ORM describes, and upgrade a database that holds data."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, text

from core.db import MIGRATIONS_DIR, Database
from core.errors import NotFound
from core.schema import Base
from core.settings import Settings


def _config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url)
    return config


def _database_at(settings: Settings, revision: str) -> tuple[str, Engine]:
    """A SQLite file migrated up to `revision` only, holding one image row (id 1) written as that revision had it."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{settings.data_dir / 'old.db'}"
    command.upgrade(_config(url), revision)
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO images (sha256, stored_path, thumb_path, width, height, format, file_size, "
                "original_name, source, split, created_at, uploaded_by) VALUES ('ab', 'a', 't', 1, 1, 'PNG', 1, "
                "'old.png', '', 'test', '2026-01-01 00:00:00', 'x')"
            )
        )
    return url, engine


@pytest.fixture
def empty_url(settings: Settings, database_backend: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of an empty database of the test's backend (a SQLite file, or a new PostgreSQL database)."""
    if database_backend == "sqlite":
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        yield f"sqlite:///{settings.data_dir / 'empty.db'}"
        return
    cluster = request.getfixturevalue("postgres_cluster")
    name = cluster.create_database(template=None)
    yield cluster.url(name)
    cluster.drop_database(name)


@pytest.mark.both_databases
def test_every_migration_runs_up_and_down_with_data_on_each_database(empty_url: str) -> None:
    config = _config(empty_url.replace("%", "%%"))
    command.upgrade(config, "0009")
    engine = create_engine(empty_url)
    at = datetime(2026, 1, 1)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO categories (name, created_at) VALUES ('Shoes', :t)"), {"t": at})
        connection.execute(
            text(
                "INSERT INTO images (sha256, stored_path, thumb_path, width, height, format, file_size, "
                "original_name, source, split, created_at, uploaded_by) VALUES ('ab', 'a', 't', 1, 1, 'PNG', 1, "
                "'old.png', '', 'test', :t, 'x')"
            ),
            {"t": at},
        )
        connection.execute(
            text(
                "INSERT INTO label_events (image_id, old_category_id, new_category_id, actor, action, created_at, note)"
                " VALUES (1, NULL, 1, 'alice', 'set', :t, ''), (1, 1, NULL, 'alice', 'undo', :t, :undo),"
                " (1, NULL, 1, 'bob', 'bulk', :t, 'bulk relabel of 1 images (batch 0123456789ab)')"
            ),
            {"t": at, "undo": "undo of event #1 (set)"},
        )
    command.upgrade(config, "head")
    with engine.connect() as connection:
        events = connection.execute(text("SELECT id, undoes_event_id, batch_id FROM label_events ORDER BY id")).all()
        foreign_keys = inspect(connection).get_foreign_keys("model_versions")
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert [tuple(e) for e in events] == [(1, None, None), (2, 1, None), (3, None, "0123456789ab")]
    job_keys = [fk["referred_table"] for fk in foreign_keys if fk["constrained_columns"] == ["job_id"]]
    assert job_keys == ["training_jobs"]  # 0001 left it to an ALTER TABLE that never ran on PostgreSQL (0011)
    assert differences == []
    command.downgrade(config, "base")
    with engine.connect() as connection:
        assert set(inspect(connection).get_table_names()) <= {"alembic_version"}
    command.upgrade(config, "head")  # and up again from nothing
    engine.dispose()


@pytest.mark.both_databases
def test_a_migrated_database_matches_the_orm_models(db: Database) -> None:
    with db.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []  # a model changed without a migration (or the other way round) shows up here


def test_upgrading_a_database_with_images_from_the_first_revision_keeps_them(settings: Settings) -> None:
    url, engine = _database_at(settings, "0001")
    command.upgrade(_config(url), "head")
    with engine.connect() as connection:
        row = connection.execute(text("SELECT original_name, split, phash FROM images")).one()
        indexes = {r[1] for r in connection.execute(text("PRAGMA index_list('images')"))}
    engine.dispose()
    assert tuple(row) == ("old.png", "test", None)  # kept, split unchanged, no hash invented
    assert "ix_images_phash" in indexes


def test_upgrading_from_0002_adds_the_undo_index_without_touching_the_audit_trail(settings: Settings) -> None:
    url, engine = _database_at(settings, "0002")
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO categories (name, created_at) VALUES ('Shoes', '2026-01-01 00:00:00')"))
        connection.execute(
            text(
                "INSERT INTO label_events (image_id, old_category_id, new_category_id, actor, action, created_at, note)"
                " VALUES (1, NULL, 1, 'alice', 'set', '2026-01-01 00:00:00', 'kept')"
            )
        )
    command.upgrade(_config(url), "head")
    with engine.connect() as connection:
        event = connection.execute(text("SELECT id, actor, action, note FROM label_events")).one()
        columns = [r[2] for r in connection.execute(text("PRAGMA index_info('ix_label_events_actor_id')"))]
        plan = connection.execute(
            text("EXPLAIN QUERY PLAN SELECT id FROM label_events WHERE actor = 'alice' ORDER BY id DESC LIMIT 1")
        ).all()
    command.downgrade(_config(url), "0002")
    with engine.connect() as connection:
        after_downgrade = {r[1] for r in connection.execute(text("PRAGMA index_list('label_events')"))}
    engine.dispose()
    assert tuple(event) == (1, "alice", "set", "kept")
    assert columns == ["actor", "id"]
    assert "ix_label_events_actor_id" in plan[0][-1]  # undo's lookup walks the index, newest first
    assert "ix_label_events_actor_id" not in after_downgrade and "ix_label_events_image_id" in after_downgrade


def test_upgrading_from_0004_adds_empty_content_hashes_and_the_image_events_table(settings: Settings) -> None:
    url, engine = _database_at(settings, "0004")
    command.upgrade(_config(url), "head")
    with engine.connect() as connection:
        row = connection.execute(text("SELECT split, phash, box_dhash_h, box_dhash_v, box_phash FROM images")).one()
        tables = {r[0] for r in connection.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))}
    command.downgrade(_config(url), "0004")
    with engine.connect() as connection:
        columns = {r[1] for r in connection.execute(text("PRAGMA table_info('images')"))}
        after = {r[0] for r in connection.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))}
    engine.dispose()
    assert tuple(row) == ("test", None, None, None, None)  # split kept; hashes left for `duplicates scan`
    assert "image_events" in tables and "image_events" not in after
    assert "box_phash" not in columns and "split" in columns


def test_upgrading_from_0005_adds_unchecked_empty_duplicate_groups_and_keeps_the_hashes(settings: Settings) -> None:
    url, engine = _database_at(settings, "0005")
    with engine.begin() as connection:
        connection.execute(text("UPDATE images SET box_dhash_h = 1, box_dhash_v = -2, box_phash = 3"))
    command.upgrade(_config(url), "head")
    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT original_name, split, box_phash, duplicate_group_id, duplicates_checked FROM images")
        ).one()
        indexes = {r[1] for r in connection.execute(text("PRAGMA index_list('images')"))}
    command.downgrade(_config(url), "0005")
    with engine.connect() as connection:
        columns = {r[1] for r in connection.execute(text("PRAGMA table_info('images')"))}
        kept = connection.execute(text("SELECT original_name, box_phash FROM images")).one()
    engine.dispose()
    # Kept with its hashes; no group and not checked: `duplicates scan` groups the catalogue once.
    assert tuple(row) == ("old.png", "test", 3, None, 0)
    assert {"ix_images_duplicate_group", "ix_images_duplicates_checked"} <= indexes
    assert not {"duplicate_group_id", "duplicates_checked"} & columns and tuple(kept) == ("old.png", 3)


def test_upgrading_from_0006_adds_no_deleted_categories(settings: Settings) -> None:
    url, engine = _database_at(settings, "0006")
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO categories (name, created_at) VALUES ('Shoes', '2026-01-01 00:00:00')"))
    command.upgrade(_config(url), "head")
    with engine.connect() as connection:
        row = connection.execute(text("SELECT name, archived_at, deleted_at FROM categories")).one()
    command.downgrade(_config(url), "0006")
    with engine.connect() as connection:
        columns = {r[1] for r in connection.execute(text("PRAGMA table_info('categories')"))}
    engine.dispose()
    assert tuple(row) == ("Shoes", None, None)
    assert "deleted_at" not in columns and "name" in columns


def test_upgrading_from_0009_reads_undo_and_batch_notes_into_columns(settings: Settings) -> None:
    url, engine = _database_at(settings, "0009")
    # Written as the code before 0010 wrote them: meaning only in the notes (and equal times for one batch).
    t = [f"2026-01-01 00:00:0{k}" for k in range(10)]
    events = [
        # id, image, old, new, actor, action, time, note
        (1, 1, None, 1, "alice", "set", t[1], ""),
        (2, 1, 1, None, "alice", "undo", t[2], "undo of event #1 (set)"),
        (3, 2, None, 2, "alice", "bulk", t[3], "bulk relabel of 2 images (batch 0123456789ab)"),
        (4, 3, None, 2, "alice", "bulk", t[3], "bulk relabel of 2 images (batch 0123456789ab)"),
        (5, 2, 2, None, "alice", "undo", t[4], "undo of event #3 (bulk)"),
        (6, 3, 2, None, "alice", "undo", t[4], "undo of event #4 (bulk)"),
        (7, 2, None, 1, "bob", "undo", t[5], "undo of event #1 (set)"),  # names another image's event: not linked
        (8, 2, 1, 2, "carol", "merge", t[6], "category 'Shoes' merged into 'Bags'"),
        (9, 3, None, 2, "carol", "import", t[7], "photos/bags"),
        (10, 3, 2, 2, "carol", "rename", t[8], "category 'Bags' renamed to 'Totes'"),
        (11, 1, None, 2, "dan", "bulk", t[9], "bulk relabel of 1 images"),  # no tag: a batch of its own
    ]
    keys = ("id", "image", "old", "new", "actor", "action", "time", "note")
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO categories (name, created_at) VALUES ('Shoes', :t), ('Bags', :t)"), {"t": t[0]}
        )
        for sha in ("cd", "ef"):
            connection.execute(
                text(
                    "INSERT INTO images (sha256, stored_path, thumb_path, width, height, format, file_size, "
                    "original_name, source, split, created_at, uploaded_by) "
                    "VALUES (:sha, 'a', 't', 1, 1, 'PNG', 1, 'x.png', '', 'train', :t, 'x')"
                ),
                {"sha": sha, "t": t[0]},
            )
        connection.execute(
            text(
                "INSERT INTO label_events (id, image_id, old_category_id, new_category_id, actor, action, created_at, "
                "note) VALUES (:id, :image, :old, :new, :actor, :action, :time, :note)"
            ),
            [dict(zip(keys, e, strict=True)) for e in events],
        )
    command.upgrade(_config(url), "head")
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT id, action, note, undoes_event_id, batch_id FROM label_events ORDER BY id")
        ).all()
        indexes = {r[1] for r in connection.execute(text("PRAGMA index_list('label_events')"))}
        fks = connection.execute(text("PRAGMA foreign_key_list('label_events')")).all()
    command.downgrade(_config(url), "0009")
    with engine.connect() as connection:
        columns = {r[1] for r in connection.execute(text("PRAGMA table_info('label_events')"))}
        notes: Sequence[str] = connection.execute(text("SELECT note FROM label_events ORDER BY id")).scalars().all()
    engine.dispose()

    assert [r.note for r in rows] == [e[-1] for e in events]  # the notes stay, for people
    assert {r.id: r.undoes_event_id for r in rows if r.undoes_event_id is not None} == {2: 1, 5: 3, 6: 4}
    batch = {r.id: r.batch_id for r in rows}
    assert batch[3] == batch[4] == "0123456789ab"  # the tag the note carried
    assert batch[5] == batch[6] and batch[5] not in (None, batch[3])  # the undo of that batch is one batch too
    assert batch[8] and batch[10] and batch[11] and len({batch[8], batch[10], batch[11], batch[3], batch[5]}) == 5
    assert batch[1] is batch[2] is batch[7] is batch[9] is None  # one image's changes: no batch
    assert {"ix_label_events_undoes_event_id", "ix_label_events_batch_id"} <= indexes
    assert any(fk[2] == "label_events" and fk[3] == "undoes_event_id" and fk[4] == "id" for fk in fks)
    assert not {"undoes_event_id", "batch_id"} & columns and notes == [e[-1] for e in events]


def test_after_0010_undo_reads_the_converted_columns(settings: Settings) -> None:
    """An undo written before 0010 still counts as taken back afterwards: undo does not step over it again."""
    from core.catalog import labels
    from core.db import open_database

    url, engine = _database_at(settings, "0009")
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO categories (name, created_at) VALUES ('Shoes', '2026-01-01 00:00:00')"))
        connection.execute(
            text(
                "INSERT INTO label_events (image_id, old_category_id, new_category_id, actor, action, created_at, note)"
                " VALUES (1, NULL, 1, 'alice', 'set', '2026-01-01 00:00:01', ''),"
                " (1, 1, NULL, 'alice', 'undo', '2026-01-01 00:00:02', 'undo of event #1 (set)')"
            )
        )
    engine.dispose()
    db = open_database(settings.model_copy(update={"database_url": url}))
    with pytest.raises(NotFound, match="nothing to undo"):
        labels.undo_last_change(db, actor="alice")


def test_upgrading_from_0013_adds_an_empty_indexed_sku_and_downgrading_drops_it(settings: Settings) -> None:
    url, engine = _database_at(settings, "0013")
    command.upgrade(_config(url), "head")
    with engine.begin() as connection:
        row = connection.execute(text("SELECT original_name, split, sku FROM images")).one()
        connection.execute(text("UPDATE images SET sku = 'TSH-0042'"))
        plan = connection.execute(text("EXPLAIN QUERY PLAN SELECT id FROM images WHERE sku = 'TSH-0042'")).all()
    command.downgrade(_config(url), "0013")
    with engine.connect() as connection:
        columns = {r[1] for r in connection.execute(text("PRAGMA table_info('images')"))}
        indexes = {r[1] for r in connection.execute(text("PRAGMA index_list('images')"))}
        kept = connection.execute(text("SELECT original_name, split FROM images")).one()
    engine.dispose()
    assert tuple(row) == ("old.png", "test", None)  # an image from before has no SKU
    assert "ix_images_sku" in plan[0][-1]
    assert "sku" not in columns and "ix_images_sku" not in indexes and tuple(kept) == ("old.png", "test")
