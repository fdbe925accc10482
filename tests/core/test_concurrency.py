"""Writers at the same moment, each thread on its own connection: the database decides the races (one new category,
one label change at a time per image, distinct job claims), and a busy SQLite makes writers wait, never fail."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import Row, Table, func, insert, select

from core import db as core_db
from core.catalog import labels
from core.catalog.ingest import ImportResult, Upload, import_uploads
from core.db import Database
from core.errors import CategoryError, DatabaseBusy, LabelConflict, NotFound
from core.jobs import queue as jobs
from core.schema import Category, JobStatus, Label, LabelEvent, TrainingJob
from core.settings import Settings
from tests.core.factories import FakeImage, build
from tests.imagegen import image_bytes

_R = TypeVar("_R")
THREADS = 8


def at_once(count: int, work: Callable[[int], _R]) -> list[_R | BaseException]:
    """Run work(0..count-1) in `count` threads released together; each result, or the exception it raised."""
    start = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(k: int) -> None:
        start.wait()
        try:
            results[k] = work(k)
        except BaseException as exc:  # the test looks at every outcome
            results[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a writer is still waiting after 120 s"
    return results


def returned(results: list[_R | BaseException]) -> list[_R]:
    """What each call returned, once none raised (the assertion lists every outcome)."""
    assert not [r for r in results if isinstance(r, BaseException)], results
    return [r for r in results if not isinstance(r, BaseException)]


def events_of(db: Database, image_id: int) -> Sequence[Row[int, int | None, int | None]]:
    """(id, old_category_id, new_category_id) of each label event of the image, oldest first."""
    columns = (LabelEvent.id, LabelEvent.old_category_id, LabelEvent.new_category_id)
    with db.read() as session:
        return session.execute(select(*columns).where(LabelEvent.image_id == image_id).order_by(LabelEvent.id)).all()


def assert_trail_agrees(db: Database, image_id: int) -> Sequence[Row[int, int | None, int | None]]:
    """Each event starts from the label the one before left, and the label now is the last event's."""
    events = events_of(db, image_id)
    state = None
    for event in events:
        assert event.old_category_id == state, f"event #{event.id} starts from a label the image did not have"
        state = event.new_category_id
    with db.read() as session:
        label = session.get(Label, image_id)
        assert (label.category_id if label else None) == state
    return events


@pytest.mark.both_databases
def test_concurrent_creators_of_one_new_category_get_one_row(db: Database) -> None:
    names = ["Sun Hats", "sun hats", "SUN  HATS", "Sun\u00a0Hats"]  # one category, case and spacing aside

    def create(k: int) -> int:
        with db.write() as session:
            category = labels.get_or_create_category(session, names[k % len(names)])
            time.sleep(0.05)  # hold the transaction open: the others arrive while it is uncommitted
            return category.id

    results = returned(at_once(THREADS, create))
    with db.read() as session:
        rows = session.execute(select(Category.id, Category.name)).all()
    assert len(rows) == 1 and set(results) == {rows[0].id}  # every caller got the one row
    assert rows[0].name in {labels.clean_category_name(n) for n in names}


@pytest.mark.both_databases
def test_concurrent_imports_into_one_new_category_label_every_image_into_one_category(db: Database) -> None:
    def upload(k: int) -> ImportResult:
        item = Upload(f"towel_{k}.png", image_bytes("Bags", 300 + k, size=24))
        return import_uploads(db, [item], category="Beach Towels", actor=f"importer{k}")

    results = returned(at_once(4, upload))
    assert all(len(r.imported) == 1 and not r.refused for r in results)
    with db.read() as session:
        categories = session.scalars(select(Category.name)).all()
        labelled = session.scalar(select(func.count()).select_from(Label))
    assert categories == ["Beach Towels"] and labelled == 4


@pytest.mark.both_databases
def test_concurrent_relabels_of_one_image_apply_one_after_the_other_or_are_refused(db: Database) -> None:
    made = build(db, [FakeImage(split="train", label="Shoes")])
    image_id = int(made.image_ids[0])
    names = ("Shoes", "Bags", "Hats")
    start_events = len(events_of(db, image_id))

    def relabel(k: int) -> Counter[str]:
        outcome: Counter[str] = Counter()
        rng = random.Random(k)
        for _ in range(12):
            seen = labels.audit_trail(db, image_id)[0].new_category  # what this person's screen shows
            choice = rng.choice([n for n in names if n != seen])
            try:
                change = labels.set_label(db, image_id, choice, actor=f"person{k}", expected_label=seen)
            except LabelConflict as exc:
                assert exc.image_id == image_id and exc.expected == seen and "Nothing changed" in str(exc)
                outcome["refused"] += 1
            else:
                assert change.new_category == choice
                if change.changed:
                    assert change.old_category == seen
                    outcome["applied"] += 1
                else:  # someone else had given it the same label meanwhile: both agree, nothing to write
                    outcome["agreed"] += 1
        return outcome

    results = returned(at_once(THREADS, relabel))
    total = sum(results, Counter())
    assert total["applied"] + total["refused"] + total["agreed"] == THREADS * 12 and total["applied"] > 0
    events = assert_trail_agrees(db, image_id)
    assert len(events) - start_events == total["applied"]  # every applied change has its event, nothing more


@pytest.mark.both_databases
def test_concurrent_bulk_relabels_and_undos_keep_every_trail_whole(db: Database) -> None:
    made = build(db, [FakeImage(split="train", label="Shoes") for _ in range(6)])
    ids = [int(i) for i in made.image_ids]

    def work(k: int) -> int:
        done = 0
        for step in range(6):
            try:
                if step % 3 == 2:
                    labels.undo_last_change(db, actor=f"person{k}")
                else:
                    # Overlapping slices, so batches meet on the same images in every order.
                    target = ("Bags", "Hats")[(k + step) % 2]
                    labels.bulk_relabel(db, ids[k % 3 : k % 3 + 4], target, actor=f"person{k}")
                done += 1
            except LabelConflict:
                pass
            except CategoryError as exc:  # an undo refused because someone changed the image since
                assert "cannot undo" in str(exc)
            except NotFound as exc:  # this person's batches were all refused as conflicts: nothing of theirs to undo
                assert "nothing to undo" in str(exc)
        return done

    results = returned(at_once(6, work))
    assert sum(results) > 0
    for image_id in ids:
        assert_trail_agrees(db, image_id)


@pytest.mark.both_databases
def test_workers_claiming_at_once_take_distinct_jobs(db: Database) -> None:
    # Several queued jobs (active_slot NULL: the one-live-job rule of enqueue_training is not what is tested here).
    with db.write() as session:
        rows: list[dict[str, Any]] = [
            {"mode": "quick", "params": {}, "status": JobStatus.QUEUED.value, "active_slot": None, "progress": {},
             "error": "", "requested_by": "ana", "worker_id": "", "cancel_requested": False}
            for _ in range(THREADS * 2)
        ]  # fmt: skip
        table = TrainingJob.__table__
        assert isinstance(table, Table)
        job_ids = sorted(session.scalars(insert(table).returning(table.c.id), rows))

    def claim_all(k: int) -> list[int]:
        claimed = []
        while (job := jobs.claim_next_job(db, f"worker-{k}")) is not None:
            claimed.append(job.id)
        return claimed

    results = returned(at_once(THREADS, claim_all))
    claimed = [job_id for per_worker in results for job_id in per_worker]
    assert sorted(claimed) == job_ids  # each job once, none left behind
    with db.read() as session:
        owners = dict(session.execute(select(TrainingJob.id, TrainingJob.worker_id)).all())
    for k, per_worker in enumerate(results):
        assert all(owners[job_id] == f"worker-{k}" for job_id in per_worker)


@pytest.mark.both_databases
def test_ten_writers_relabelling_flat_out_are_never_refused_for_a_lock(db: Database) -> None:
    made = build(db, [FakeImage(split="train") for _ in range(20)])
    ids = [int(i) for i in made.image_ids]
    names = ("Shoes", "Bags", "Hats")
    seconds = 2.5

    def relabel(k: int) -> tuple[int, list[float]]:
        rng, changed, took = random.Random(k), 0, []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            begin = time.perf_counter()
            change = labels.set_label(db, rng.choice(ids), rng.choice(names), actor=f"writer{k}")
            took.append(time.perf_counter() - begin)
            changed += change.changed
        return changed, took

    results = at_once(10, relabel)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]  # no "database is locked", no deadlock
    done = returned(results)
    changed = sum(r[0] for r in done)
    took = sorted(t for r in done for t in r[1])
    with db.read() as session:
        events = session.scalar(select(func.count()).select_from(LabelEvent).where(LabelEvent.actor.like("writer%")))
    assert events == changed and changed > 0
    for image_id in ids:
        assert_trail_agrees(db, image_id)
    p99 = took[int(len(took) * 0.99)]
    print(f"{len(took)} label writes by 10 threads in {seconds} s, p99 {p99 * 1000:.0f} ms")  # shown with -s


# --- SQLite: another program holding the write lock -----------------------------------------------------------


def _hold_write_lock(path: Path, seconds: float) -> threading.Thread:
    """Another program's connection takes SQLite's write lock and keeps it for `seconds`."""
    taken = threading.Event()

    def hold() -> None:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        taken.set()
        time.sleep(seconds)
        other.execute("ROLLBACK")
        other.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert taken.wait(10)
    return thread


def test_a_writer_waits_past_the_busy_timeout_for_another_programs_lock(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core_db, "SQLITE_BUSY_TIMEOUT_MS", 100)  # SQLite's own wait gives up after 0.1 s
    db = core_db.open_database(settings)
    ids = [int(i) for i in build(db, [FakeImage(split="train")]).image_ids]
    holder = _hold_write_lock(Path(db.engine.url.database or ""), 1.0)
    begin = time.monotonic()
    change = labels.set_label(db, ids[0], "Bags", actor="alice")  # retried with backoff until the lock is free
    waited = time.monotonic() - begin
    holder.join()
    assert change.changed and waited > 0.5
    assert_trail_agrees(db, ids[0])


def test_a_writer_that_waited_too_long_is_told_so_and_changes_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core_db, "SQLITE_BUSY_TIMEOUT_MS", 100)
    monkeypatch.setattr(core_db, "WRITE_WAIT_S", 0.4)
    db = core_db.open_database(settings)
    ids = [int(i) for i in build(db, [FakeImage(split="train")]).image_ids]
    holder = _hold_write_lock(Path(db.engine.url.database or ""), 1.5)
    with pytest.raises(DatabaseBusy, match=r"locked by another program for 0.4 s.*nothing was changed"):
        labels.set_label(db, ids[0], "Bags", actor="alice")
    holder.join()
    assert events_of(db, ids[0]) == [] and labels.set_label(db, ids[0], "Hats", actor="alice").changed
