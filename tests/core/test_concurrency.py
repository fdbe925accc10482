"""Writers at the same moment, each thread on its own connection: the database decides the races (one new category,
one label change at a time per image, distinct job claims)."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from sqlalchemy import Row, func, insert, select

from core import jobs, labels
from core.db import Database
from core.errors import CategoryError, LabelConflict
from core.ingest import Upload, import_uploads
from core.schema import Category, JobStatus, Label, LabelEvent, TrainingJob
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


def events_of(db: Database, image_id: int) -> list[Row[Any]]:
    """(id, old_category_id, new_category_id) of each label event of the image, oldest first."""
    columns = (LabelEvent.id, LabelEvent.old_category_id, LabelEvent.new_category_id)
    with db.read() as session:
        return session.execute(select(*columns).where(LabelEvent.image_id == image_id).order_by(LabelEvent.id)).all()


def assert_trail_agrees(db: Database, image_id: int) -> list[Row[Any]]:
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

    results = at_once(THREADS, create)
    assert not [r for r in results if isinstance(r, BaseException)], results
    with db.read() as session:
        rows = session.execute(select(Category.id, Category.name)).all()
    assert len(rows) == 1 and set(results) == {rows[0].id}  # every caller got the one row
    assert rows[0].name in {labels.clean_category_name(n) for n in names}


@pytest.mark.both_databases
def test_concurrent_imports_into_one_new_category_label_every_image_into_one_category(db: Database) -> None:
    def upload(k: int) -> Any:
        item = Upload(f"towel_{k}.png", image_bytes("Bags", 300 + k, size=24))
        return import_uploads(db, [item], category="Beach Towels", actor=f"importer{k}")

    results = at_once(4, upload)
    assert not [r for r in results if isinstance(r, BaseException)], results
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

    results = at_once(THREADS, relabel)
    assert not [r for r in results if isinstance(r, BaseException)], results
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
        return done

    results = at_once(6, work)
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert sum(results) > 0  # type: ignore[arg-type]
    for image_id in ids:
        assert_trail_agrees(db, image_id)


@pytest.mark.both_databases
def test_workers_claiming_at_once_take_distinct_jobs(db: Database) -> None:
    # Several queued jobs (active_slot NULL: the one-live-job rule of enqueue_training is not what is tested here).
    with db.write() as session:
        rows = [{"mode": "quick", "params": {}, "status": JobStatus.QUEUED.value, "active_slot": None,
                 "progress": {}, "error": "", "requested_by": "ana", "worker_id": "", "cancel_requested": False}
                for _ in range(THREADS * 2)]  # fmt: skip
        table = TrainingJob.__table__
        job_ids = sorted(session.scalars(insert(table).returning(table.c.id), rows))

    def claim_all(k: int) -> list[int]:
        claimed = []
        while (job := jobs.claim_next_job(db, f"worker-{k}")) is not None:
            claimed.append(job.id)
        return claimed

    results = at_once(THREADS, claim_all)
    assert not [r for r in results if isinstance(r, BaseException)], results
    claimed = [job_id for per_worker in results for job_id in per_worker]  # type: ignore[union-attr]
    assert sorted(claimed) == job_ids  # each job once, none left behind
    with db.read() as session:
        owners = dict(session.execute(select(TrainingJob.id, TrainingJob.worker_id)).all())
    for k, per_worker in enumerate(results):
        assert all(owners[job_id] == f"worker-{k}" for job_id in per_worker)  # type: ignore[union-attr]
