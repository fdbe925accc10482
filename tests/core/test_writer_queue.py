"""SQLite writers of every process take turns in the order they came (core.db._WriterQueue): nobody waits while
another process commits again and again, a writer that gives up or is killed while waiting keeps the order, and a
writer killed in its turn holds up no one."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from core import db as core_db
from core.errors import DatabaseBusy
from core.settings import Settings

FORK = multiprocessing.get_context("fork")  # children start at once, with core.db already imported


def queue_files(settings: Settings) -> list[str]:
    """The queue's files beside the database: its tail, and a file per writer while writers wait."""
    return sorted(p.name for p in settings.data_dir.glob("prodcat.sqlite3-queue*"))


def _database(settings: Settings) -> core_db.Database:
    db = core_db.Database(settings)
    with db.write() as session:
        session.execute(text("CREATE TABLE IF NOT EXISTS turns (id INTEGER PRIMARY KEY, writer TEXT NOT NULL)"))
    return db


def _write_flat_out(settings: Settings, name: str, threads: int, seconds: float, go: Any, out: Any) -> None:
    """A process of `threads` writers, each committing one row (holding its turn 2 ms) as fast as it can."""
    db = core_db.Database(settings)
    ready = go.wait(30)
    results: list[tuple[str, int, float, str]] = []

    def work(k: int) -> None:
        writer, writes, worst, error = f"{name}.{k}", 0, 0.0, ""
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                begin = time.monotonic()
                with db.write() as session:
                    session.execute(text("INSERT INTO turns (writer) VALUES (:w)"), {"w": writer})
                    time.sleep(0.002)
                worst = max(worst, time.monotonic() - begin)
                writes += 1
        except Exception as exc:  # the test reports every failure
            error = f"{type(exc).__name__}: {exc}"
        results.append((writer, writes, worst, error))

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)] if ready else []
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put(results)
    db.dispose()


def test_writers_of_several_processes_take_turns_and_none_waits_while_others_commit_again(settings: Settings) -> None:
    db = _database(settings)
    processes, threads, seconds = 4, 2, 2.0
    go, out = FORK.Event(), FORK.Queue()
    children = [
        FORK.Process(target=_write_flat_out, args=(settings, f"p{p}", threads, seconds, go, out))
        for p in range(processes)
    ]
    for child in children:
        child.start()
    go.set()
    results = [row for _ in children for row in out.get(timeout=60)]
    for child in children:
        child.join(10)
    assert not [r for r in results if r[3]], [r for r in results if r[3]]  # every write succeeded
    with db.read() as session:
        order: list[str] = list(session.scalars(text("SELECT writer FROM turns ORDER BY id")))
    assert Counter(order) == {writer: writes for writer, writes, _, _ in results}
    # In the order the writes committed: between two turns of one writer, how many turns did any other writer take?
    # Turns in the order they came allow one (two when a writer was slow to queue again); SQLite's own lock, handed
    # to whichever process polls first, let one process commit dozens of times while the others waited.
    most_overtaken = 0
    for writer in set(order):
        since: Counter[str] = Counter()
        for w in order[order.index(writer) :]:
            if w == writer:
                most_overtaken = max(most_overtaken, *since.values(), 0)
                since.clear()
            else:
                since[w] += 1
    counts = sorted(Counter(order).values())
    worst_wait = max(r[2] for r in results)
    print(f"{len(order)} turns, writers {counts}, most overtaken {most_overtaken}, worst {worst_wait:.2f}s")
    assert most_overtaken <= 3
    assert counts[0] >= counts[-1] // 2 > 0  # nobody starved
    assert queue_files(settings) == ["prodcat.sqlite3-queue"]
    db.dispose()


def _hold_turn_in_child(settings: Settings, held: Any) -> None:
    db = core_db.Database(settings)
    with db.write() as session:
        session.execute(text("INSERT INTO turns (writer) VALUES ('killed')"))  # SQLite's write lock too
        held.set()
        time.sleep(60)


def test_a_writer_killed_in_its_turn_holds_up_no_one(settings: Settings) -> None:
    db = _database(settings)
    held = FORK.Event()
    child = FORK.Process(target=_hold_turn_in_child, args=(settings, held))
    child.start()
    assert held.wait(30)
    done = threading.Event()

    def write() -> None:
        with db.write() as session:
            session.execute(text("INSERT INTO turns (writer) VALUES ('next')"))
        done.set()

    waiter = threading.Thread(target=write)
    waiter.start()
    assert not done.wait(0.5)  # its turn comes after the child's
    os.kill(child.pid or 0, signal.SIGKILL)
    killed = time.monotonic()
    assert done.wait(10)
    assert time.monotonic() - killed < 5  # at once, not after WRITE_WAIT_S (60 s)
    waiter.join()
    child.join(10)
    with db.read() as session:
        assert [w for (w,) in session.execute(text("SELECT writer FROM turns"))] == ["next"]
    assert queue_files(settings) == ["prodcat.sqlite3-queue"]  # the killed writer's file was removed
    db.dispose()


@contextmanager
def turn(queue: core_db._WriterQueue, wait_s: float) -> Iterator[None]:
    """A write's turn, as Database.write takes it: from its first statement to its end."""
    with queue.writing():
        queue.take(time.monotonic() + wait_s)
        yield


def _wait_in_queue_in_child(database: Path, queued: Any) -> None:
    queue = core_db._writer_queue(database)
    queued.set()
    with turn(queue, 60):
        pass


def test_a_writer_that_gives_up_or_dies_while_waiting_keeps_the_order(settings: Settings) -> None:
    database = settings.data_dir / "prodcat.sqlite3"
    queue = core_db._writer_queue(database)
    tail = queue.tail
    entered: list[str] = []
    release = threading.Event()

    def joined_after(before: bytes) -> None:
        """Wait until someone has joined the queue after `before` was its tail."""
        for _ in range(1000):
            if tail.read_bytes() != before:
                return
            time.sleep(0.01)
        raise AssertionError("nobody joined the queue")

    def holder() -> None:
        with turn(queue, 60):
            entered.append("A")
            release.wait(30)

    def gives_up() -> None:
        with pytest.raises(DatabaseBusy, match="nothing was changed"), turn(queue, 0.5):
            entered.append("B")

    def last() -> None:
        with turn(queue, 60), turn(queue, 60):  # a write inside a write: the same turn
            entered.append("C")

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    a = threading.Thread(target=holder)
    a.start()
    while not entered:
        time.sleep(0.01)
    b = threading.Thread(target=gives_up)
    before = tail.read_bytes()
    b.start()
    joined_after(before)
    queued, before = FORK.Event(), tail.read_bytes()
    dies = FORK.Process(target=_wait_in_queue_in_child, args=(database, queued))
    dies.start()
    assert queued.wait(30)
    joined_after(before)
    before = tail.read_bytes()
    c = threading.Thread(target=last)
    c.start()
    joined_after(before)
    os.kill(dies.pid or 0, signal.SIGKILL)
    dies.join(10)
    b.join(10)  # gave up after 0.5 s
    time.sleep(0.3)
    assert entered == ["A"]  # C still waits behind A, though the two between them left
    release.set()
    a.join(10)
    c.join(10)
    assert entered == ["A", "C"]
    assert queue_files(settings) == ["prodcat.sqlite3-queue"]
