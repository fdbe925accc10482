"""Database and disk failures reach people as one clear line (core.errors.StorageError), never as SQL, parameters or
server paths: real read-only, locked, full and damaged SQLite databases, through the CLI and as the translation."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from typer.testing import CliRunner

from core.catalog.ingest import import_paths, stored_before
from core.catalog.labels import list_categories
from core.catalog.store import StoredFiles
from core.db import Database
from core.errors import StorageError, as_storage_error
from core.schema import Image
from core.settings import Settings
from tests.imagegen import image_bytes, write_image_folder

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
        OSError(errno.EFBIG, "File too large", str(path)): "the disk holding the data directory 'data' is full",
        OSError(errno.EDQUOT, "Disk quota exceeded", str(path)): "the disk holding the data directory 'data' is full",
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
    from core.cli.app import app

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


# --- a disk that fills up during an import (issue 13 point 5) -------------------------------------------------


@contextmanager
def file_size_limit(limit: int) -> Iterator[Callable[[int], None]]:
    """No file of this process may grow past `limit` bytes (RLIMIT_FSIZE): a write beyond fails with EFBIG, as a
    write onto a full disk fails with ENOSPC, on the real file system and without root. Yields a setter to change the
    limit inside the block; SIGXFSZ is ignored (Python's default), so the write fails instead of killing the process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def set_limit(new: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (new, hard))

    set_limit(limit)
    try:
        yield set_limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def files_and_rows(db: Database) -> tuple[set[str], set[str]]:
    """Every file under images/ and thumbs/ (temporary ones included), and the files the image rows point to."""
    root = db.settings.data_dir
    files = {p.relative_to(root).as_posix() for d in ("images", "thumbs") for p in (root / d).rglob("*") if p.is_file()}
    with db.read() as session:
        rows = {path for row in session.execute(select(Image.stored_path, Image.thumb_path)) for path in row}
    return files, rows


def shoe_photos(folder: Path, count: int, first_seed: int) -> Path:
    """`count` distinct small PNGs shoe_00.png ... in `folder` (made here)."""
    folder.mkdir()
    for i in range(count):
        (folder / f"shoe_{i:02}.png").write_bytes(image_bytes("Shoes", first_seed + i, size=24))
    return folder


def batches_of_four(monkeypatch: pytest.MonkeyPatch) -> None:
    """The importer writes a transaction every 4 images (never sooner for time), so a test can fail the second."""
    import core.catalog.ingest.importer as importer

    monkeypatch.setattr(importer, "BATCH_ROWS", 4)
    monkeypatch.setattr(importer, "BATCH_SECONDS", 3600.0)


def test_a_disk_that_fills_during_an_import_keeps_what_was_stored_and_leaves_no_file_without_a_row(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.cli  # noqa: F401 (registers the commands)
    from core.cli.app import app

    # 1. A photo too big for what is left of the disk: refused by name with the reason, the others imported and listed.
    photos = write_image_folder(tmp_path / "photos", per_category=4, size=24)
    noise = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    PILImage.fromarray(noise).save(photos / "Bags" / "bag_big.png")  # ~1.1 MB of incompressible pixels
    db.dispose()  # the migrations' write-ahead log is folded into the database file and removed
    with file_size_limit(512 * 1024):
        cli = CliRunner().invoke(app, ["import", str(photos), "--labels-from-folders"])
    assert cli.exit_code == 0, cli.output
    assert "12 imported, 0 duplicates, 1 refused" in cli.output
    disk_full = f"the disk holding the data directory '{db.settings.data_dir.name}' is full: free some space"
    assert f"Bags/bag_big.png: could not be stored: {disk_full}" in " ".join(cli.output.split())
    files, rows = files_and_rows(db)
    assert files == rows and len(rows) == 2 * 12

    # 2. The database cannot grow either from the second batch on: that batch's transaction fails as a whole.
    later = shoe_photos(tmp_path / "later", 12, first_seed=100)
    batches_of_four(monkeypatch)
    wal = db.settings.data_dir / "prodcat.sqlite3-wal"
    reported: list[str] = []
    with file_size_limit(512 * 1024) as set_limit, pytest.raises(OperationalError) as failure:

        def progress(done: int, _total: int | None, name: str) -> None:
            reported.append(name)
            if done == 4:  # the first batch is committed: from now on the write-ahead log may not grow
                set_limit(wal.stat().st_size)

        import_paths(db, [later], category="Shoes", actor="ana", progress=progress)
    refusal = as_storage_error(failure.value)
    assert refusal is not None and str(refusal).startswith("the disk holding the data directory 'data'"), refusal
    assert_clean(str(refusal), db.settings.data_dir)
    # What the progress reported as stored is what is stored; the failed batch's files (and those in flight) are gone.
    assert reported == [f"later/shoe_{i:02}.png" for i in range(4)]
    partial = stored_before(failure.value)  # the error carries the report of the batches committed before it
    assert partial is not None and [item.name for item in partial.imported] == reported
    with db.read() as session:
        stored_later = session.scalars(select(Image.original_name).where(Image.original_name.like("later/%"))).all()
    assert sorted(stored_later) == reported
    files, rows = files_and_rows(db)
    assert files == rows and len(rows) == 2 * 16
    assert db.integrity_ok()

    # 3. Space again: the same import completes, the files stored before count as duplicates.
    again = import_paths(db, [later], category="Shoes", actor="ana")
    assert (len(again.imported), len(again.duplicates), again.refused) == (8, 4, [])
    files, rows = files_and_rows(db)
    assert files == rows and len(rows) == 2 * 24


def test_cli_import_stopped_by_a_full_disk_reports_what_it_stored_before_the_error(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.catalog.ingest.importer as importer
    import core.cli  # noqa: F401 (registers the commands)
    from core.cli.app import app

    photos = shoe_photos(tmp_path / "photos", 12, first_seed=200)
    batches_of_four(monkeypatch)
    db.dispose()
    wal = db.settings.data_dir / "prodcat.sqlite3-wal"
    write_batch = importer.Importer.write_batch
    with file_size_limit(512 * 1024) as set_limit:

        def first_batch_then_a_full_disk(self: importer.Importer) -> None:
            write_batch(self)
            if wal.exists():  # from the second batch on, the write-ahead log may not grow
                set_limit(wal.stat().st_size)

        monkeypatch.setattr(importer.Importer, "write_batch", first_batch_then_a_full_disk)
        cli = CliRunner().invoke(app, ["import", str(photos), "--category", "Shoes"])
    assert cli.exit_code == 1, cli.output
    assert "The import stopped on an error. Stored before it:\n4 imported, 0 duplicates, 0 refused" in cli.output
    # SQLite reports a write-ahead log that may not grow (EFBIG) as an I/O error, a full disk (ENOSPC) as full.
    assert "Error: the disk holding the data directory 'data' " in cli.output
    assert_clean(cli.output, db.settings.data_dir)
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 4
    files, rows = files_and_rows(db)
    assert files == rows and len(rows) == 2 * 4


# --- each batch's files reach the disk before its rows (issue 13 point 3) ------------------------------------------


def test_an_import_flushes_each_batchs_files_to_the_disk_before_its_rows_commit(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut cannot be caused here; what makes a row survive one with its file is the order: the batch's files
    are complete and flushed (the real flush runs) before any row naming them is committed."""
    import core.catalog.ingest.importer as importer

    photos = shoe_photos(tmp_path / "photos", 10, first_seed=300)
    batches_of_four(monkeypatch)
    flush = importer.flush_stored
    flushed: list[list[str]] = []

    def checked_flush(settings: Settings, stored: Iterable[StoredFiles]) -> None:
        stored = list(stored)
        with db.read() as session:  # nothing of this batch is committed yet
            assert not session.scalars(select(Image.id).where(Image.sha256.in_([s.sha256 for s in stored]))).all()
        for files in stored:
            assert files.original.stat().st_size > 0 and files.thumb.stat().st_size > 0
        flush(settings, stored)
        flushed.append([files.original.name for files in stored])

    monkeypatch.setattr(importer, "flush_stored", checked_flush)
    result = import_paths(db, [photos], category="Shoes", actor="ana")
    assert len(result.imported) == 10
    assert [len(batch) for batch in flushed] == [4, 4, 2]
    with db.read() as session:
        stored_names = {Path(p).name for p in session.scalars(select(Image.stored_path))}
    assert stored_names == {name for batch in flushed for name in batch}


def test_a_batch_the_disk_fails_to_flush_is_not_committed_and_its_files_are_removed(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.catalog.ingest.importer as importer

    photos = shoe_photos(tmp_path / "photos", 8, first_seed=400)
    batches_of_four(monkeypatch)
    flush = importer.flush_stored
    calls = 0

    def failing_second_flush(settings: Settings, stored: Iterable[StoredFiles]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # what syncfs reports when the disk lost a write (Linux 5.8+)
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(settings.data_dir))
        flush(settings, stored)

    monkeypatch.setattr(importer, "flush_stored", failing_second_flush)
    with pytest.raises(OSError) as failure:
        import_paths(db, [photos], category="Shoes", actor="ana")
    refusal = as_storage_error(failure.value)
    assert refusal is not None and "'data'" in str(refusal), refusal
    assert_clean(str(refusal), db.settings.data_dir)
    partial = stored_before(failure.value)
    assert partial is not None and len(partial.imported) == 4
    files, rows = files_and_rows(db)
    assert files == rows and len(rows) == 2 * 4
