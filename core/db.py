"""Database access: engine set-up (SQLite WAL, busy timeout, foreign keys; PostgreSQL through psycopg 3), sessions,
writers that wait their turn, migrations on start."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from core.errors import DatabaseBusy
from core.settings import Settings, get_settings

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000  # one wait inside SQLite's own busy handler
# How long a SQLite writer waits in all for a write lock another process holds (an import, a worker) before it gives
# up with DatabaseBusy: SQLite's busy handler waits SQLITE_BUSY_TIMEOUT_MS, then BEGIN IMMEDIATE is retried with a
# bounded backoff. Writers in one process queue on a lock instead (Database.write), so they never poll each other.
WRITE_WAIT_S = 60.0
_RETRY_FIRST_S, _RETRY_MAX_S = 0.02, 0.5
# Connections per engine (each Database has a read and a write engine): room for a few dozen threads (Streamlit
# sessions, API requests) at once; past that a thread waits up to WRITE_WAIT_S for one to come back.
POOL_SIZE, POOL_OVERFLOW = 10, 20
IN_CHUNK = 900  # values per IN (...) clause: under the smallest SQLite bound-parameter limit (999)

_T = TypeVar("_T")


def in_chunks(values: Sequence[_T], size: int = IN_CHUNK) -> Iterator[Sequence[_T]]:
    """`values` in slices small enough for one IN (...) clause on any database."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    message = str(exc).lower()
    return "database is locked" in message or "database is busy" in message


def _begin_immediate(dbapi_connection: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE, waiting up to WRITE_WAIT_S in all for the write lock, else DatabaseBusy."""
    wait_s = WRITE_WAIT_S
    deadline = time.monotonic() + wait_s
    delay = _RETRY_FIRST_S
    while True:
        try:
            dbapi_connection.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise DatabaseBusy(
                    f"the database stayed locked by another program for {wait_s:g} s (a long import or a stuck "
                    "process?): nothing was changed, try again in a moment"
                ) from None
        time.sleep(min(delay, left))
        delay = min(delay * 2, _RETRY_MAX_S)


def database_url(url: str) -> str:
    """`url` with the psycopg 3 driver named when it says only postgresql:// (SQLAlchemy would look for psycopg2)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def _make_engine(url: str, *, immediate: bool) -> Engine:
    is_sqlite = url.startswith("sqlite")
    kwargs: dict[str, Any] = {"pool_size": POOL_SIZE, "max_overflow": POOL_OVERFLOW, "pool_timeout": WRITE_WAIT_S}
    if is_sqlite:
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
    else:
        kwargs["pool_pre_ping"] = True  # a server restart must not hand out dead connections
    engine = create_engine(url, **kwargs)
    if is_sqlite:

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event decide how transactions start (pysqlite's own BEGIN is deferred).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # Writers take the write lock up front, so they wait for it instead of failing half-way with
            # "database is locked"; readers never block anyone under WAL.
            if immediate:
                _begin_immediate(conn.connection.dbapi_connection)
            else:
                conn.exec_driver_sql("BEGIN")

    return engine


_writer_locks: dict[str, threading.RLock] = {}
_writer_locks_guard = threading.Lock()


def _writer_lock(url: str) -> threading.RLock:
    """The lock the writers of one SQLite file in this process queue on (one per file, whichever Database)."""
    with _writer_locks_guard:
        return _writer_locks.setdefault(url, threading.RLock())


class Database:
    """One database: `read()` for queries, `write()` for short transactions that start immediately.

    SQLite has one writer at a time: `write()` starts with BEGIN IMMEDIATE, and the writers of one process take turns
    on a lock first, so twenty threads relabelling wait for each other instead of polling SQLite's lock (and timing
    out with "database is locked"). PostgreSQL writers run concurrently: code that reads and then writes the same
    rows takes row locks (`SELECT ... FOR UPDATE`) or lets a unique constraint decide (`INSERT ... ON CONFLICT`).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = database_url(settings.resolved_database_url)
        if self.url.startswith("sqlite"):
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = _make_engine(self.url, immediate=False)
        self.write_engine = _make_engine(self.url, immediate=True)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.write_engine, expire_on_commit=False)
        self._turn = _writer_lock(self.url) if self.is_sqlite else None

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading; anything it would write is rolled back."""
        with self._read() as session:
            try:
                yield session
            finally:
                session.rollback()

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One unit of work: commits on success, rolls back on any exception (which propagates).

        On SQLite it first waits its turn (see the class docstring), up to WRITE_WAIT_S for another process's lock.
        """
        with self._turn or nullcontext(), self._write() as session, session.begin():
            yield session

    def insert_ignoring_duplicates(self, table: Any, rows: Sequence[dict[str, Any]], *, chunk: int = 2_000) -> None:
        """Batch INSERT of `rows` into an ORM table, `chunk` rows per write transaction; a row that collides with one
        another writer stored meanwhile (a unique constraint) is left as it is (ON CONFLICT DO NOTHING)."""
        for start in range(0, len(rows), chunk):
            with self.write() as session:
                statement = dialect_insert(session, table).on_conflict_do_nothing()
                session.execute(statement, list(rows[start : start + chunk]))

    def integrity_ok(self) -> bool:
        """`PRAGMA integrity_check` (SQLite) or a trivial query elsewhere."""
        with self.engine.connect() as conn:
            if self.is_sqlite:
                return conn.execute(text("PRAGMA integrity_check")).scalar_one() == "ok"
            return conn.execute(text("SELECT 1")).scalar_one() == 1

    def dispose(self) -> None:
        self.engine.dispose()
        self.write_engine.dispose()


def is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def dialect_insert(session: Session, table: Any) -> postgresql.Insert | sqlite.Insert:
    """INSERT for the session's database, with its `on_conflict_do_nothing()` (SQLite and PostgreSQL alike)."""
    return postgresql.insert(table) if is_postgresql(session) else sqlite.insert(table)


def upgrade(db: Database) -> None:
    """Apply every Alembic migration that is not yet in the database."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", db.url.replace("%", "%%"))
    with db.write_engine.connect() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


_open: dict[str, Database] = {}


def open_database(settings: Settings | None = None) -> Database:
    """The database for these settings, migrated to the newest schema (one instance per URL per process).

    Raises CatalogueRefused when the database went missing from, or belongs to another catalogue than, the data
    directory (core.catalogue_identity)."""
    settings = settings or get_settings()
    key = f"{settings.resolved_database_url}|{settings.data_dir}"
    db = _open.get(key)
    if db is None:
        from core import catalogue_identity  # it reads the schema, which imports this module

        catalogue_identity.refuse_missing_database(settings)  # before SQLite would create an empty file
        db = Database(settings)
        try:
            upgrade(db)
            catalogue_identity.ensure_identity(db)  # the database and the data directory belong to one catalogue
        except BaseException:
            db.dispose()
            raise
        _open[key] = db
    return db


def close_all() -> None:
    """Dispose every engine this process opened (tests, and the worker before it exits)."""
    for db in _open.values():
        db.dispose()
    _open.clear()
