"""Database access: engine set-up (SQLite WAL, busy timeout, foreign keys; PostgreSQL through psycopg 3), sessions,
writers that wait their turn, migrations on start."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from core.errors import DatabaseBusy
from core.settings import Settings, get_settings

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000  # one wait inside SQLite's own busy handler
# How long a SQLite writer waits in all for its turn and the write lock (other writers, an import, a worker) before it
# gives up with DatabaseBusy. Writers of every thread and process queue in arrival order (_WriterQueue), so they never
# poll each other; a lock held by a program that does not queue (the sqlite3 shell) is polled: SQLite's busy handler
# waits SQLITE_BUSY_TIMEOUT_MS, then BEGIN IMMEDIATE is retried with a bounded backoff.
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


def _busy(wait_s: float) -> DatabaseBusy:
    return DatabaseBusy(
        f"the database stayed locked by another program for {wait_s:g} s (a long import or a stuck process?): "
        "nothing was changed, try again in a moment"
    )


def _begin_immediate(dbapi_connection: sqlite3.Connection, queue: _WriterQueue | None) -> None:
    """BEGIN IMMEDIATE after this writer's turn has come (`queue`), waiting up to WRITE_WAIT_S in all, else
    DatabaseBusy. A lock held by another program (one that does not queue) is polled: SQLite's busy handler, then a
    bounded backoff."""
    wait_s = WRITE_WAIT_S
    deadline = time.monotonic() + wait_s
    if queue is not None:
        queue.take(deadline)
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
                raise _busy(wait_s) from None
        time.sleep(min(delay, left))
        delay = min(delay * 2, _RETRY_MAX_S)


# --- SQLite writers take turns in the order they came, across threads and processes ------------------------------

_NAME_LEN = 27  # a node's name: f"{pid:010d}-{16 hex digits}"
_AFTER = b"->"  # a waiting node's file holds b"->" + the name of the node it waits behind
_open_fds: set[int] = set()  # queue files open in this process, closed in a forked child (see _forget_after_fork)


def _node_name(data: bytes) -> bytes:
    """`data` when it is a node name, else b"" (an empty tail, or a file cut short by a killed process)."""
    return data if len(data) == _NAME_LEN and data[10:11] == b"-" and data.isascii() else b""


class _BlockingFlock:
    """flock(fd, LOCK_EX) blocking in a helper thread, so that the caller can stop waiting at a deadline: the kernel
    wakes the helper the moment the lock is free (no polling), and a helper whose caller gave up unlocks and closes
    `fd` as soon as it gets the lock."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.done = threading.Event()
        self.guard = threading.Lock()
        self.abandoned = False
        self.error: OSError | None = None
        threading.Thread(target=self._run, name="prodcat-writer-turn", daemon=True).start()

    def _run(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as exc:
            self.error = exc
        with self.guard:
            if not self.abandoned:
                self.done.set()
                return
        _close(self.fd, unlock=self.error is None)

    def wait(self, deadline: float) -> bool:
        """True: the caller holds the lock on fd. False: the deadline passed, and fd is the helper's to close."""
        self.done.wait(max(0.0, deadline - time.monotonic()))
        with self.guard:
            if self.done.is_set():
                if self.error is not None:
                    _close(self.fd, unlock=False)
                    raise self.error
                return True
            self.abandoned = True
            return False


def _flock_until(fd: int, deadline: float) -> bool:
    """Take an exclusive flock on fd, waiting until `deadline`; False (and fd no longer the caller's) if it passed."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return _BlockingFlock(fd).wait(deadline)


def _open_fd(path: Path, flags: int) -> int:
    fd = os.open(path, flags | os.O_CLOEXEC, 0o666)
    _open_fds.add(fd)
    return fd


def _close(fd: int, *, unlock: bool) -> None:
    _open_fds.discard(fd)
    try:
        if unlock:  # explicitly: a forked child may hold a copy of fd, which would keep the lock
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class _Node:
    """One writer's place in a _WriterQueue: its file, flocked by it from joining until it leaves."""

    def __init__(self, path: Path, name: bytes) -> None:
        self.path, self.name = path, name
        self.pid = os.getpid()
        self.fd = _open_fd(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        self.queued = False  # its name is (or was) in the tail: a writer may wait behind it
        self.ahead = b""  # the node it waits behind; b"" once its turn has come
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else knows it yet
        except BaseException:
            self.close()
            raise

    def behind(self, name: bytes) -> None:
        """Record the node this one waits behind (b"": none, its turn has come), for the writer behind this one."""
        self.ahead = name
        if name:
            os.pwrite(self.fd, _AFTER + name, 0)
        else:
            os.ftruncate(self.fd, 0)

    def close(self) -> None:
        _close(self.fd, unlock=True)


class _LocalTurn:
    """The turn of a writer where the queue's files cannot be written (a read-only folder): threads of this process
    take turns on a lock, and other processes' writers are waited for by polling SQLite's lock."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock


class _WriterQueue:
    """First come, first served turns for the writers of one SQLite file, across every thread and process.

    SQLite hands its write lock over by polling (its busy handler sleeps, then tries again), so between processes it
    goes to whoever tries first after a commit, usually the process that just committed: with 20 labellers over 20
    processes a label write waited 15 ms at the median but 6.5 s at p99 (docs/benchmarks.md, load section). So every
    writer first queues here, and only then runs BEGIN IMMEDIATE, which then finds the lock free.

    The queue is a CLH queue lock made of files beside the database (`prodcat.sqlite3-queue` and, while writers wait,
    `prodcat.sqlite3-queue-<node>`): each writer holds an exclusive flock on its own node file from joining until its
    transaction ends; it joins by swapping its node's name into the tail file (under a flock on that file) and then
    blocks on the flock of the node it got from there, so when a writer ends the kernel wakes exactly the one behind
    it. No one polls, and no one can jump the queue.

    - Nothing can be stuck for good: the kernel drops a killed process's flocks, and every wait ends at the write's
      deadline (WRITE_WAIT_S) with DatabaseBusy, as a wait for SQLite's lock does.
    - A waiting node's file names the node it waits behind, so a writer that gave up or died while waiting passes
      its place on: the one behind it follows the name and waits behind the right writer.
    - The turn is taken at BEGIN, the write's first statement, not when `write()` is entered: work before it holds up
      no one (taken at `write()`, the median label write at a person's pace beside an import went 28 -> 416 ms).
    - A write inside a write in the same thread keeps the turn it has (no second place to wait behind itself).
    - The queue only orders writers; SQLite's lock still guarantees one at a time. Programs that do not queue (the
      sqlite3 shell) are waited for by polling, and a queue file that cannot be written (a read-only folder, a full
      disk) leaves this process's threads taking turns on a lock, as before.
    """

    def __init__(self, database: Path) -> None:
        self.tail = database.with_name(database.name + "-queue")
        self._local = threading.local()  # this thread's writes under way (depth) and its place in the queue
        self._fallback = threading.Lock()

    def _path(self, name: bytes) -> Path:
        return self.tail.with_name(f"{self.tail.name}-{name.decode()}")

    @contextmanager
    def writing(self) -> Iterator[None]:
        """The span of a write (Database.write): its turn is taken when its transaction begins (take), so work before
        its first statement holds up no one, and ends when the outermost write of this thread ends."""
        local = self._local
        local.depth = getattr(local, "depth", 0) + 1
        try:
            yield
        finally:
            local.depth -= 1
            place = getattr(local, "place", None)
            if not local.depth and place is not None:
                local.place = None
                self._leave(place)

    def take(self, deadline: float) -> None:
        """Before BEGIN IMMEDIATE: wait for this thread's turn until `deadline` (time.monotonic()), else DatabaseBusy;
        at once when it has its turn already (a write inside a write) or is not inside a write (a bare connection)."""
        local = self._local
        if getattr(local, "depth", 0) and getattr(local, "place", None) is None:
            local.place = self._join(deadline)

    def _join(self, deadline: float) -> _Node | _LocalTurn:
        name = f"{os.getpid():010d}-{os.urandom(8).hex()}".encode()
        try:
            node = _Node(self._path(name), name)
        except OSError:
            return self._join_fallback(deadline)
        try:
            ahead = self._swap_tail(node, deadline)
            while ahead:
                ahead = self._wait_behind(node, ahead, deadline)
        except OSError:
            self._leave(node)
            return self._join_fallback(deadline)
        except BaseException:
            self._leave(node)
            raise
        return node

    def _join_fallback(self, deadline: float) -> _LocalTurn:
        if not self._fallback.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise _busy(WRITE_WAIT_S)
        return _LocalTurn(self._fallback)

    def _swap_tail(self, node: _Node, deadline: float) -> bytes:
        """Put `node` at the end of the queue; the name of the node it is behind (b"": none)."""
        fd = _open_fd(self.tail, os.O_RDWR | os.O_CREAT)
        if not _flock_until(fd, deadline):
            raise _busy(WRITE_WAIT_S)
        try:
            ahead = _node_name(os.pread(fd, 64, 0))
            node.behind(ahead)  # before anyone can queue behind it: a writer that dies now still passes its place on
            os.pwrite(fd, node.name, 0)  # every name has the same length: no truncate
            node.queued = True
        finally:
            _close(fd, unlock=True)
        return ahead

    def _wait_behind(self, node: _Node, ahead: bytes, deadline: float) -> bytes:
        """Wait until the writer `ahead` has ended its turn, given up or died; whom to wait behind next (b"": none)."""
        path = self._path(ahead)
        try:
            fd = _open_fd(path, os.O_RDONLY)
        except FileNotFoundError:  # tidied away (by someone who removed the database's files)
            node.behind(b"")
            return b""
        if not _flock_until(fd, deadline):
            raise _busy(WRITE_WAIT_S)
        try:
            content = os.pread(fd, 64, 0)
            after = _node_name(content[len(_AFTER) :]) if content.startswith(_AFTER) else b""
            node.behind(after)  # before its file goes: the one behind this node must not lose the chain
            path.unlink(missing_ok=True)
        finally:
            _close(fd, unlock=True)
        return after

    def _leave(self, place: _Node | _LocalTurn) -> None:
        """End a turn, or give up a place in the queue: the writer behind takes the turn, or waits behind the node
        this one waited behind. Then, when no one has queued behind it, the node takes itself out of the tail and
        removes its file (otherwise the writer behind removes it)."""
        if isinstance(place, _LocalTurn):
            place.lock.release()
            return
        if place.pid != os.getpid():  # a forked child leaving its parent's write: its copy of fd is closed already
            return
        place.close()  # first: the writer behind must not wait for the tidying below
        try:
            if place.queued:
                self._untail(place)
            if not place.queued:
                place.path.unlink(missing_ok=True)
        except OSError:
            pass  # the file stays for the next writer to remove

    def _untail(self, node: _Node) -> None:
        fd = _open_fd(self.tail, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # someone is joining (maybe behind this node): they will remove its file
            try:
                if os.pread(fd, 64, 0) == node.name:  # nobody behind, and nobody can join until the flock ends
                    if node.ahead:
                        os.pwrite(fd, node.ahead, 0)
                    else:
                        os.ftruncate(fd, 0)
                    node.queued = False
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            _close(fd, unlock=False)


def _forget_after_fork() -> None:
    """In a forked child: close the copies of the parent's queue files (without unlocking: the parent's writers still
    hold them), so that the parent's flocks end with the parent; the child's threads start with no turn held."""
    global _queues_guard
    _queues_guard = threading.Lock()  # another thread of the parent may have held it
    for fd in list(_open_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _open_fds.clear()
    for queue in list(_queues.values()):
        queue._local = threading.local()
        queue._fallback = threading.Lock()


_queues: dict[Path, _WriterQueue] = {}
_queues_guard = threading.Lock()
os.register_at_fork(after_in_child=_forget_after_fork)


def _writer_queue(database: Path) -> _WriterQueue:
    """The queue of the writers of one SQLite file in this process (one per file, whichever Database)."""
    with _queues_guard:
        return _queues.setdefault(database, _WriterQueue(database))


def database_url(url: str) -> str:
    """`url` with the psycopg 3 driver named when it says only postgresql:// (SQLAlchemy would look for psycopg2)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def _make_engine(url: str, *, immediate: bool, queue: _WriterQueue | None = None) -> Engine:
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
                _begin_immediate(conn.connection.dbapi_connection, queue)
            else:
                conn.exec_driver_sql("BEGIN")

    return engine


class Database:
    """One database: `read()` for queries, `write()` for short transactions that start immediately.

    SQLite has one writer at a time: `write()` starts with BEGIN IMMEDIATE, and before it the writers of every thread
    and process queue for their turn in the order they came (_WriterQueue), so twenty people relabelling wait for each
    other instead of polling SQLite's lock (and timing out with "database is locked", or waiting seconds while others
    commit again and again). Readers never queue. PostgreSQL writers run concurrently: code that reads and then writes
    the same rows takes row locks (`SELECT ... FOR UPDATE`) or lets a unique constraint decide (`INSERT ... ON
    CONFLICT`).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = database_url(settings.resolved_database_url)
        if self.url.startswith("sqlite"):
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        database = make_url(self.url).database if self.is_sqlite else None
        in_memory = not database or database == ":memory:" or database.startswith("file:")
        self._queue = None if in_memory else _writer_queue(Path(database or "").resolve())
        self.engine = _make_engine(self.url, immediate=False)
        self.write_engine = _make_engine(self.url, immediate=True, queue=self._queue)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.write_engine, expire_on_commit=False)

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

        On SQLite its first statement waits for its turn (see the class docstring), up to WRITE_WAIT_S, else
        DatabaseBusy; the turn ends after the commit or rollback.
        """
        with self._turn(), self._write() as session, session.begin():
            yield session

    def _turn(self) -> AbstractContextManager[None]:
        """SQLite: the span in which this thread's writes hold their turn once they begin (_WriterQueue.writing)."""
        return self._queue.writing() if self._queue is not None else nullcontext()

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
    with db._turn(), db.write_engine.connect() as connection:
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
