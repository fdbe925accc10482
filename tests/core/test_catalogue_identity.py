"""The database and the data directory know each other: a missing or swapped database is refused with an
explanation (never an empty catalogue over another's originals and checkpoints); new and older catalogues get an id."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import delete, select
from typer.testing import CliRunner

from core import db as core_db
from core.catalog.labels import add_category, list_categories
from core.catalogue_identity import IDENTITY_FILE, KEY
from core.errors import CatalogueRefused
from core.schema import MetaValue
from core.settings import Settings


def stored_id(db: core_db.Database) -> str | None:
    with db.read() as session:
        return session.scalar(select(MetaValue.value).where(MetaValue.key == KEY))


def recorded_id(settings: Settings) -> str | None:
    path = settings.data_dir / IDENTITY_FILE
    return json.loads(path.read_text())[KEY] if path.exists() else None


def database_file(settings: Settings) -> Path:
    return settings.data_dir / "prodcat.sqlite3"


def remove_database(settings: Settings) -> None:
    core_db.close_all()
    for path in settings.data_dir.glob("prodcat.sqlite3*"):
        path.unlink()


def keep_files(settings: Settings, originals: int = 3) -> None:
    """What a catalogue leaves in its data directory: content-addressed originals and a model checkpoint."""
    for n in range(originals):
        original = settings.images_dir / f"{n:02x}" / f"{n:02x}{'0' * 62}.png"
        original.parent.mkdir(parents=True, exist_ok=True)
        original.write_bytes(b"\x89PNG original")
    settings.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    (settings.checkpoints_dir / "v1.safetensors").write_bytes(b"weights")


@pytest.mark.both_databases
def test_a_new_catalogue_gets_one_id_in_its_database_and_its_data_directory(db: core_db.Database) -> None:
    catalogue = stored_id(db)
    assert catalogue and recorded_id(db.settings) == catalogue
    core_db.close_all()
    again = core_db.open_database(db.settings)
    assert stored_id(again) == catalogue == recorded_id(db.settings)  # opening again changes nothing


@pytest.mark.parametrize("identity_file", ["kept", "from before ids"])
def test_a_deleted_database_is_refused_and_no_empty_one_is_created(db: core_db.Database, identity_file: str) -> None:
    settings = db.settings
    add_category(db, "Shoes", actor="ana")
    keep_files(settings)
    catalogue = recorded_id(settings)
    assert catalogue is not None
    if identity_file == "from before ids":
        (settings.data_dir / IDENTITY_FILE).unlink()
    remove_database(settings)

    with pytest.raises(CatalogueRefused) as refused:
        core_db.open_database(settings)
    message = str(refused.value)
    assert message.startswith(
        "the database file prodcat.sqlite3 is missing, but the data directory 'data' holds 3 original images and 1 "
        "checkpoint"
    )
    assert (catalogue in message) == (identity_file == "kept")
    assert "Restore that catalogue's database" in message and "set PRODCAT_DATA_DIR to another folder" in message
    assert str(settings.data_dir) not in message
    assert not database_file(settings).exists()  # nothing was created over the originals
    assert len(list(settings.images_dir.rglob("*.png"))) == 3


def another_database(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    """The URL of a new, migrated, empty database that is not the test's own (dropped after the test)."""
    if backend == "postgresql":
        cluster = request.getfixturevalue("postgres_cluster")
        name = cluster.create_database()  # a copy of the migrated template
        request.addfinalizer(lambda: cluster.drop_database(name))
        return cluster.url(name)
    blank = core_db.Database(Settings(data_dir=tmp_path / "blank"))
    core_db.upgrade(blank)
    blank.dispose()
    return blank.url


@pytest.mark.both_databases
def test_a_new_empty_database_over_a_catalogues_files_is_refused(
    db: core_db.Database, database_backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Where the database is not a file (PostgreSQL), or PRODCAT_DATABASE_URL was changed: a new, empty database.
    keep_files(db.settings, originals=2000)
    url = another_database(request, database_backend, tmp_path)
    settings = Settings(data_dir=db.settings.data_dir, database_url=url)
    with pytest.raises(
        CatalogueRefused,
        match=r"^the database is new and empty, but the data directory 'data' holds "
        r"2000 original images and 1 checkpoint and belongs to catalogue [0-9a-f-]{36}: its database "
        r"went missing \(deleted or moved\?\)",
    ):
        core_db.open_database(settings)


@pytest.mark.both_databases
def test_another_catalogues_database_is_refused(
    db: core_db.Database, database_backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    add_category(db, "Shoes", actor="ana")
    other = core_db.open_database(
        Settings(data_dir=tmp_path / "other", database_url=another_database(request, database_backend, tmp_path))
    )
    add_category(other, "Bags", actor="bo")
    theirs = stored_id(other)
    swapped = Settings(data_dir=db.settings.data_dir, database_url=other.url)
    core_db.close_all()

    with pytest.raises(CatalogueRefused) as refused:
        core_db.open_database(swapped)
    assert str(refused.value).startswith(
        f"the database belongs to catalogue {theirs}, but the data directory 'data' holds 0 original images and 0 "
        f"checkpoints and belongs to catalogue {recorded_id(swapped)}: it was swapped for another catalogue's database"
    )
    assert recorded_id(swapped) != theirs


def test_a_database_file_swapped_in_place_is_refused(db: core_db.Database, tmp_path: Path) -> None:
    other = core_db.open_database(Settings(data_dir=tmp_path / "other"))
    add_category(other, "Bags", actor="bo")
    theirs = stored_id(other)
    remove_database(db.settings)
    shutil.copy(tmp_path / "other" / "prodcat.sqlite3", database_file(db.settings))
    with pytest.raises(CatalogueRefused, match=f"^the database belongs to catalogue {theirs}, but"):
        core_db.open_database(db.settings)


def test_the_cli_refuses_in_one_line(db: core_db.Database) -> None:
    import core.cli  # noqa: F401 (registers the commands)
    from core.cli.app import app

    keep_files(db.settings)
    remove_database(db.settings)
    result = CliRunner().invoke(app, ["stats"])
    assert result.exit_code == 1 and result.output.startswith("Error: the database file prodcat.sqlite3 is missing")
    assert "Traceback" not in result.output and not database_file(db.settings).exists()


@pytest.mark.both_databases
@pytest.mark.parametrize("identity_file", ["missing", "kept"])
def test_a_catalogue_from_before_ids_adopts_one(db: core_db.Database, identity_file: str) -> None:
    # A database with rows but no id: made before ids existed (upgraded by migration 0013), or a backup from then
    # restored into a data directory that already has its catalogue.json.
    settings = db.settings
    add_category(db, "Shoes", actor="ana")
    keep_files(settings)
    catalogue = recorded_id(settings)
    with db.write() as session:
        session.execute(delete(MetaValue))
    if identity_file == "missing":
        (settings.data_dir / IDENTITY_FILE).unlink()
    core_db.close_all()

    reopened = core_db.open_database(settings)
    adopted = stored_id(reopened)
    assert adopted and adopted == recorded_id(settings)
    assert (adopted == catalogue) == (identity_file == "kept")
    assert [c.name for c in list_categories(reopened)] == ["Shoes"]


@pytest.mark.both_databases
def test_a_new_data_directory_for_an_existing_database_records_its_id(db: core_db.Database, tmp_path: Path) -> None:
    # A worker on another machine: the shared database, its own empty data directory.
    catalogue = stored_id(db)
    elsewhere = Settings(data_dir=tmp_path / "worker-data", database_url=db.settings.resolved_database_url)
    assert stored_id(core_db.open_database(elsewhere)) == catalogue == recorded_id(elsewhere)


def test_a_refused_worker_exits_with_one_line(db: core_db.Database) -> None:
    keep_files(db.settings)
    remove_database(db.settings)
    worker = subprocess.run(
        [sys.executable, "-m", "core.jobs.worker", "--once"],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PRODCAT_DATA_DIR": str(db.settings.data_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 2 and "cannot start: the database file prodcat.sqlite3 is missing" in worker.stderr
    assert "Traceback" not in worker.stderr and not database_file(db.settings).exists()
