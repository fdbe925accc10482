"""The Alembic migrations build exactly the schema the ORM describes, and upgrade a database that holds data."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, text

from core.db import MIGRATIONS_DIR, Database
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
