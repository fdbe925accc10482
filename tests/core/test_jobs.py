"""Training jobs in the database: one live job at a time, atomic claims, progress, cancel, stale jobs, liveness."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from core.db import Database
from core.errors import NotFound, TrainingRefused
from core.jobs import queue as jobs
from core.schema import ModelVersion, TrainingJob, Worker, utcnow
from core.settings import Settings

pytestmark = pytest.mark.both_databases


def _race(n: int, db: Database, action: Callable[[Database], Any]) -> list[Any]:
    """Run `action` in n threads, each with its own engine (like separate UI sessions), released at one moment."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        own = Database(db.settings)
        try:
            barrier.wait()
            results[i] = action(own)
        except Exception as exc:  # the outcome under test
            results[i] = exc
        finally:
            own.dispose()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def _version(db: Database, job_id: int) -> int:
    with db.write() as session:
        row = ModelVersion(
            arch="resnet18",
            image_size=32,
            mode="quick",
            class_names=["a", "b"],
            class_category_ids=[1, 2],
            weights_path="x",
            pretrained_source="none",
            job_id=job_id,
        )
        session.add(row)
        session.flush()
        return row.id


def _set_heartbeat(db: Database, job_id: int, seconds_ago: float) -> None:
    with db.write() as session:
        session.execute(
            update(TrainingJob)
            .where(TrainingJob.id == job_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds_ago))
        )


def test_enqueue_queues_one_job_and_refuses_a_second(db: Database) -> None:
    job_id = jobs.enqueue_training(db, "quick", {"epochs": 2}, "ana")
    job = jobs.get_job(db, job_id)
    assert (job.status, job.mode, job.requested_by, job.params) == ("queued", "quick", "ana", {"epochs": 2})
    assert jobs.current_job(db) == job and job.live

    with pytest.raises(
        TrainingRefused,
        match=rf"a training job \(#{job_id}, queued, requested by ana\) is already "
        r"queued: wait for it or cancel it",
    ):
        jobs.enqueue_training(db, "full", {}, "ben")

    jobs.cancel_job(db, job_id, actor="ana")
    second = jobs.enqueue_training(db, "full", {}, "ben")
    current = jobs.current_job(db)
    assert second != job_id and current is not None and current.id == second


@pytest.mark.parametrize(
    ("mode", "params", "message"),
    [
        ("fast", {}, "unknown training mode 'fast'"),
        ("quick", {"epochz": 3}, "epochz"),
        ("quick", ["epochs", 3], "must be a dict"),
        ("quick", {"epochs": object()}, "plain JSON values"),
    ],
)
def test_bad_requests_are_refused_and_nothing_is_queued(db: Database, mode: str, params: Any, message: str) -> None:
    with pytest.raises(TrainingRefused, match=message):
        jobs.enqueue_training(db, mode, params, "ana")
    assert jobs.list_jobs(db) == [] and jobs.current_job(db) is None


def test_two_sessions_pressing_retrain_at_once_queue_exactly_one_job(db: Database) -> None:
    results = _race(4, db, lambda own: jobs.enqueue_training(own, "quick", {}, "racer"))
    ids = [r for r in results if isinstance(r, int)]
    refusals = [r for r in results if isinstance(r, TrainingRefused)]
    assert len(ids) == 1 and len(refusals) == 3, results
    assert all(f"#{ids[0]}, queued" in str(r) for r in refusals)
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(TrainingJob)) == 1


def test_unique_live_slot_turns_a_lost_insert_race_into_a_refusal(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As under PostgreSQL read committed: our check saw no live job, but another session's INSERT won.
    first = jobs.enqueue_training(db, "quick", {}, "ana")
    monkeypatch.setattr(jobs, "_refuse_if_live", lambda session: None)
    with pytest.raises(TrainingRefused, match=rf"#{first}, queued, requested by ana"):
        jobs.enqueue_training(db, "quick", {}, "ben")
    assert [j.id for j in jobs.list_jobs(db)] == [first]


def test_claim_moves_the_job_to_running_once(db: Database) -> None:
    assert jobs.claim_next_job(db, "w1") is None
    job_id = jobs.enqueue_training(db, "quick", {}, "ana")
    claimed = jobs.claim_next_job(db, "w1")
    assert claimed is not None and claimed.id == job_id and claimed.status == "running"
    assert claimed.worker_id == "w1" and claimed.started_at is not None
    assert claimed.heartbeat_age_s is not None and claimed.heartbeat_age_s < 5
    assert jobs.claim_next_job(db, "w2") is None
    # Still the live job: nobody can queue another while it runs.
    with pytest.raises(TrainingRefused, match="is already running"):
        jobs.enqueue_training(db, "quick", {}, "ben")


def test_racing_workers_claim_a_job_exactly_once(db: Database) -> None:
    job_id = jobs.enqueue_training(db, "quick", {}, "ana")
    results = _race(4, db, lambda own: jobs.claim_next_job(own, f"w{threading.get_ident()}"))
    winners = [r for r in results if isinstance(r, jobs.JobView)]
    assert len(winners) == 1 and results.count(None) == 3, results
    assert jobs.get_job(db, job_id).worker_id == winners[0].worker_id


def test_progress_keeps_latest_values_and_one_history_point_per_epoch(db: Database) -> None:
    job_id = jobs.enqueue_training(db, "full", {}, "ana")
    jobs.claim_next_job(db, "w1")
    _set_heartbeat(db, job_id, 30)
    report = jobs.ProgressReport
    reports = [
        report(phase="caching", step=5, steps=10),
        report(phase="training", epoch=1, epochs=2, loss=2.0, train_acc=0.3, val_acc=None),
        report(phase="training", epoch=1, epochs=2, loss=1.5, train_acc=0.4, val_acc=0.5),
        report(phase="training", epoch=2, epochs=2, loss=1.0, train_acc=0.6, val_acc=0.7),
        report(phase="done", epoch=2, epochs=2, loss=1.0, train_acc=0.6, val_acc=0.75),
        # As core.ml.training reports the loop's summary: display phase plus the library's own phase as "stage".
        report(phase="training (done)", stage="done", epoch=2, loss=0.9, train_acc=0.6, val_acc=0.8),
        report(phase="evaluating", epoch=None),
    ]
    assert [jobs.record_progress(db, job_id, r) for r in reports] == [False] * len(reports)
    job = jobs.get_job(db, job_id)
    assert job.progress["phase"] == "evaluating"
    assert job.history == [
        {"epoch": 1, "loss": 1.5, "train_acc": 0.4, "val_acc": 0.5},
        {"epoch": 2, "loss": 1.0, "train_acc": 0.6, "val_acc": 0.7},
    ]
    assert job.heartbeat_age_s is not None and job.heartbeat_age_s < 5  # progress is a heartbeat too


def test_cancel_queued_at_once_and_running_on_request(db: Database) -> None:
    queued = jobs.enqueue_training(db, "quick", {}, "ana")
    view = jobs.cancel_job(db, queued, actor="ben")
    assert view.status == "cancelled" and "ben" in view.error and not view.live
    assert jobs.claim_next_job(db, "w1") is None  # a cancelled job is never picked up

    running = jobs.enqueue_training(db, "quick", {}, "ana")
    jobs.claim_next_job(db, "w1")
    view = jobs.cancel_job(db, running, actor="ben")
    assert view.status == "running" and view.cancel_requested
    assert jobs.record_progress(db, running, jobs.ProgressReport(phase="training")) is True  # the worker learns to stop
    assert jobs.heartbeat_job(db, running) is True
    assert jobs.mark_cancelled(db, running)
    done = jobs.get_job(db, running)
    assert done.status == "cancelled" and done.error == "cancelled by ben while running"
    assert jobs.current_job(db) is None

    with pytest.raises(TrainingRefused, match=rf"#{running} already cancelled"):
        jobs.cancel_job(db, running, actor="ben")
    with pytest.raises(NotFound, match="no training job 999"):
        jobs.cancel_job(db, 999, actor="ben")


def test_finish_and_fail_free_the_slot_and_first_failure_stands(db: Database) -> None:
    first = jobs.enqueue_training(db, "quick", {}, "ana")
    jobs.claim_next_job(db, "w1")
    version = _version(db, first)
    jobs.finish_job(db, first, version)
    done = jobs.get_job(db, first)
    assert (done.status, done.model_version_id) == ("succeeded", version) and done.finished_at is not None

    second = jobs.enqueue_training(db, "quick", {}, "ana")
    jobs.claim_next_job(db, "w1")
    assert jobs.fail_job(db, second, "RuntimeError: boom")
    assert jobs.fail_job(db, second, "a later, different story") is False
    assert jobs.get_job(db, second).error == "RuntimeError: boom"
    # A finished job tells its runner to stop.
    assert jobs.record_progress(db, second, jobs.ProgressReport(phase="x")) is True
    assert jobs.current_job(db) is None
    assert [j.id for j in jobs.list_jobs(db)] == [second, first]
    assert [j.id for j in jobs.list_jobs(db, limit=1)] == [second]
    with pytest.raises(NotFound):
        jobs.get_job(db, 12345)


def test_stale_running_jobs_fail_but_fresh_and_queued_ones_do_not(db: Database) -> None:
    timeout = db.settings.heartbeat_timeout_s
    stale = jobs.enqueue_training(db, "quick", {}, "ana")
    jobs.claim_next_job(db, "gone-worker")
    _set_heartbeat(db, stale, timeout + 5)
    assert jobs.fail_stale_jobs(db) == [stale]
    view = jobs.get_job(db, stale)
    assert view.status == "failed" and "gone-worker stopped responding (killed?" in view.error
    assert "last heartbeat at" in view.error and view.finished_at is not None

    fresh = jobs.enqueue_training(db, "quick", {}, "ana")
    jobs.claim_next_job(db, "w2")
    _set_heartbeat(db, fresh, timeout / 2)
    assert jobs.fail_stale_jobs(db) == [] and jobs.get_job(db, fresh).status == "running"
    jobs.fail_job(db, fresh, "done with it")

    queued = jobs.enqueue_training(db, "quick", {}, "ana")
    with db.write() as session:  # queued for ages: it waits for a worker, it is not failed
        session.execute(
            update(TrainingJob).where(TrainingJob.id == queued).values(created_at=utcnow() - timedelta(hours=5))
        )
    assert jobs.fail_stale_jobs(db) == [] and jobs.get_job(db, queued).status == "queued"


def test_a_dead_workers_job_never_blocks_the_app_while_it_runs(db: Database) -> None:
    """The UI process stays up while a worker is killed (out of memory, say): the next look at the job fails it."""
    from core.views.overview import home_overview

    timeout = db.settings.heartbeat_timeout_s
    dead = jobs.enqueue_training(db, "quick", {}, "ana")
    jobs.claim_next_job(db, "oom-killed")
    _set_heartbeat(db, dead, timeout + 5)
    shown = home_overview(db).job
    assert shown is not None and shown.status == "failed"  # the sidebar on every page

    again = jobs.enqueue_training(db, "quick", {}, "ana")
    jobs.claim_next_job(db, "oom-killed-too")
    _set_heartbeat(db, again, timeout + 5)
    assert jobs.current_job(db) is None  # the Train page's live view
    assert jobs.get_job(db, again).status == "failed"

    third = jobs.enqueue_training(db, "quick", {}, "ana")
    jobs.claim_next_job(db, "gone")
    _set_heartbeat(db, third, timeout + 5)
    retrain = jobs.enqueue_training(db, "quick", {}, "bo")  # Retrain is not refused as "already running"
    assert jobs.get_job(db, third).status == "failed"
    current = jobs.current_job(db)
    assert current is not None and current.id == retrain
    jobs.claim_next_job(db, "gone-again")
    _set_heartbeat(db, retrain, timeout + 5)
    with pytest.raises(TrainingRefused, match="already failed"):  # Cancel says what happened instead of waiting
        jobs.cancel_job(db, retrain, actor="bo")
    assert "stopped responding" in (jobs.get_job(db, retrain).error or "")


def test_worker_liveness_follows_heartbeats(db: Database) -> None:
    assert not jobs.worker_alive(db)
    jobs.register_worker(db, "host:1:abc", device="cpu")
    assert jobs.worker_alive(db) and [w["id"] for w in jobs.live_workers(db)] == ["host:1:abc"]
    with db.write() as session:
        session.execute(update(Worker).values(heartbeat_at=utcnow() - timedelta(seconds=1000)))
    assert not jobs.worker_alive(db)
    jobs.heartbeat_worker(db, "host:1:abc")
    assert jobs.worker_alive(db)
    jobs.unregister_worker(db, "host:1:abc")
    assert not jobs.worker_alive(db) and jobs.live_workers(db) == []
    jobs.heartbeat_worker(db, "host:1:abc")  # a late beat from a worker on its way out does not revive it
    assert not jobs.worker_alive(db)


def test_worker_environment_carries_settings_to_the_spawned_worker(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Settings given in code (not only through the environment) must reach the worker the UI starts.
    custom = Settings(data_dir=tmp_path / "elsewhere", heartbeat_timeout_s=7.5, split_fractions=(0.7, 0.2, 0.1))
    env = jobs.worker_environment(custom)
    for key in [k for k in os.environ if k.startswith("PRODCAT_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("PRODCAT_"):
            monkeypatch.setenv(key, value)
    seen = Settings()
    assert seen.data_dir == custom.data_dir and seen.heartbeat_timeout_s == 7.5
    assert seen.split_fractions == (0.7, 0.2, 0.1)


def test_worker_progress_is_throttled_but_keeps_each_epochs_last_report(db: Database) -> None:
    from core.jobs.worker import JobRun

    job_id = jobs.enqueue_training(db, "full", {}, "ana")
    jobs.claim_next_job(db, "w1")
    run = JobRun(db, job_id)
    for step in range(1, 51):  # a burst within one second: written once, the rest held back
        run.on_progress(jobs.ProgressReport(phase="training", epoch=1, step=step, loss=1.0 / step, val_acc=None))
    assert jobs.get_job(db, job_id).progress["step"] == 1
    run.on_progress(jobs.ProgressReport(phase="training", epoch=1, step=60, loss=0.1, train_acc=0.8, val_acc=0.7))
    run.on_progress(jobs.ProgressReport(phase="training", epoch=2, step=61, loss=0.09, val_acc=0.7))
    job = jobs.get_job(db, job_id)
    assert job.progress["step"] == 61
    assert job.history[0] == {"epoch": 1, "loss": 0.1, "train_acc": 0.8, "val_acc": 0.7}
    run.on_progress(jobs.ProgressReport(phase="training", epoch=2, step=70, loss=0.05, val_acc=0.7))
    run.flush()  # what the heartbeat thread does every interval
    assert jobs.get_job(db, job_id).progress["step"] == 70
    jobs.cancel_job(db, job_id, actor="ben")
    run.on_progress(jobs.ProgressReport(phase="evaluating"))
    assert run.should_stop()


def test_a_worker_started_for_the_ui_exits_after_the_configured_idle_time(db: Database) -> None:
    # conftest sets PRODCAT_WORKER_IDLE_EXIT_S=5: the worker started without an explicit idle time uses it,
    # so no test (and no UI session on a quiet day) leaves a worker running for minutes.
    assert db.settings.worker_idle_exit_s == 5
    assert jobs.ensure_worker(db) is True
    process = jobs._spawned[-1]
    try:
        args = process.args
        assert isinstance(args, list)  # ensure_worker starts the worker from a list of arguments
        assert args[args.index("--exit-when-idle") + 1] == "5"
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert "idle" in (db.settings.logs_dir / "worker.log").read_text()
