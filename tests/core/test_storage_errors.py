"""Database and disk failures reach people as one clear line (core.errors.StorageError), never as SQL, parameters or
server paths: real read-only, locked, full and damaged SQLite databases, through the CLI and as the translation."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import IntegrityError, OperationalError
from typer.testing import CliRunner

from core.db import Database
from core.errors import StorageError, as_storage_error
from core.labels import list_categories
from tests.imagegen import write_image_folder

REPO = Path(__file__).resolve().parents[2]
LEAKS = ("Traceback", "[SQL", "INSERT", "SELECT", "parameters", "sqlalchemy", "sqlite3.")


def assert_clean(message: str, data_dir: Path) -> None:
    """A person's message: no SQL, parameters, tracebacks or absolute server paths (the folder name is fine)."""
    for leak in (*LEAKS, str(data_dir), str(data_dir.parent)):
        assert leak not in message, (leak, message)


def driver_error(url: str, sql: str, *, on_connect: str | None = None) -> Exception:
    """The exception SQLAlchemy raises for `sql` on a real SQLite database at `url`."""
    engine = create_engine(url)
    if on_connect:
        event.listen(engine, "connect", lambda dbapi, _record: dbapi.execute(on_connect))
    try:
        with engine.begin() as conn:
            conn.execute(text(sql), {"name": "Hats"})
    except Exception as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError(f"{sql} did not fail")


def test_real_database_failures_become_storage_errors_that_say_what_to_do(db: Database, tmp_path: Path) -> None:
    path = db.settings.data_dir / "prodcat.sqlite3"
    insert = "INSERT INTO categories (name, created_at) VALUES (:name, CURRENT_TIMESTAMP)"
    read_only = driver_error(f"sqlite:///file:{path}?mode=ro&uri=true", insert)
    with db.engine.connect() as conn:
        pages = conn.execute(text("PRAGMA page_count")).scalar()
    db.dispose()
    huge_row = "INSERT INTO categories (name, created_at) VALUES (hex(randomblob(40000)) || :name, CURRENT_TIMESTAMP)"
    full = driver_error(f"sqlite:///{path}", huge_row, on_connect=f"PRAGMA max_page_count = {pages}")
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        locked = driver_error(f"sqlite:///{path}?timeout=0", insert)
    finally:
        locker.rollback()
        locker.close()
    garbage = tmp_path / "not-a-database.sqlite3"
    garbage.write_bytes(b"these are not the bytes of a database " * 100)
    damaged = driver_error(f"sqlite:///{garbage}", "SELECT * FROM categories WHERE name = :name")
    twice = "INSERT INTO categories (id, name, created_at) VALUES (1, :name, '2026-01-01'), (1, 'b', '2026-01-01')"
    duplicate = driver_error(f"sqlite:///{path}", twice)
    bad_sql = driver_error(f"sqlite:///{path}", "SELEC :name")

    expected = {
        read_only: "the database is read-only: check the permissions of the data directory 'data'",
        full: "the disk holding the data directory 'data' is full: free some space",
        locked: "the database is busy: another program",
        damaged: "the database file in the data directory 'data' is damaged or is not a prodcat database",
        OSError(errno.ENOSPC, "No space left on device", str(path)): "the disk holding the data directory 'data'",
        OSError(errno.EROFS, "Read-only file system", str(path)): "the database is read-only: check the permissions",
    }
    for error, start in expected.items():
        refusal = as_storage_error(error)
        assert isinstance(refusal, StorageError) and str(refusal).startswith(start), (error, refusal)
        assert_clean(str(refusal), db.settings.data_dir)
    assert "INSERT INTO categories" in str(read_only) and "Hats" in str(read_only)  # what people were shown before
    # Bugs are not storage failures: they keep their traceback (SQLite reports a syntax error as OperationalError).
    assert isinstance(duplicate, IntegrityError) and as_storage_error(duplicate) is None
    assert isinstance(bad_sql, OperationalError) and as_storage_error(bad_sql) is None
    assert as_storage_error(ValueError("x")) is None
    assert as_storage_error(FileNotFoundError(errno.ENOENT, "No such file", "/srv/photos/a.jpg")) is None


def run_cli_without_root_powers(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m core.cli ARGS` as a process that file permissions apply to (root ignores them: drop its override)."""
    command = [sys.executable, "-m", "core.cli", *args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: file permissions cannot be made to apply")
        command = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *command]
    env = {**os.environ, "PRODCAT_DATA_DIR": str(data_dir)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_on_a_read_only_database_file_ends_with_one_clean_line(db: Database) -> None:
    data_dir = db.settings.data_dir
    db.dispose()
    database = data_dir / "prodcat.sqlite3"
    database.chmod(0o444)
    try:
        result = run_cli_without_root_powers(data_dir, "categories", "add", "Hats")
    finally:
        database.chmod(0o644)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "Error: the database is read-only: check the permissions of the data directory 'data' and of the database "
        "file in it"
    ), result.stderr
    assert lines[0].endswith("(details in the data directory's logs/cli.log)")
    assert_clean(result.stderr + result.stdout, data_dir)
    details = (data_dir / "logs" / "cli.log").read_text()
    assert "attempt to write a readonly database" in details and "INSERT INTO categories" in details
    assert list_categories(db) == []


def test_cli_import_onto_a_full_disk_ends_with_one_clean_line(db: Database, tmp_path: Path) -> None:
    import core.cli  # noqa: F401 (registers the commands)
    from core.cli_app import app

    photos = write_image_folder(tmp_path / "photos", per_category=15, size=24)
    with db.engine.connect() as conn:
        pages = conn.execute(text("PRAGMA page_count")).scalar()
    db.dispose()
    for engine in (db.engine, db.write_engine):  # the database file may not grow: SQLite's own "disk is full"
        event.listen(engine, "connect", lambda dbapi, _record: dbapi.execute(f"PRAGMA max_page_count = {pages}"))
    result = CliRunner().invoke(app, ["import", str(photos), "--labels-from-folders"])
    assert result.exit_code == 1, result.output
    assert "Error: the disk holding the data directory 'data' is full: free some space" in result.output
    assert_clean(result.output, db.settings.data_dir)
    assert "database or disk is full" in (db.settings.logs_dir / "cli.log").read_text()
