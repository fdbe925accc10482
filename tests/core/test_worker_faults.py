"""Killed workers, with the default 60 s heartbeat timeout: a worker killed on this machine fails its job at once (its
process is gone), and one killed while writing a checkpoint leaves no staging folder or temp file behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.db import Database
from core.errors import TrainingRefused
from core.jobs import queue as jobs
from core.jobs.processes import process_gone, process_tag
from core.jobs.worker import run_worker
from core.ml.staging import staging_dir
from core.ml.versions import active_version
from core.schema import ModelVersion, VersionStatus, Worker
from tests.core.test_worker import _started, finished, start_worker, use_runner, wait_for, worker_log
from tests.core.training_helpers import add_version_row
from tests.core.worker_runners import SAVING_STALL_BYTES, marks_dir

HEARTBEAT_TIMEOUT_S = 60.0  # the default: only the dead process can tell within seconds


@pytest.fixture(autouse=True)
def default_heartbeat_timeout(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("PRODCAT_HEARTBEAT_TIMEOUT_S", str(HEARTBEAT_TIMEOUT_S))
    monkeypatch.setenv("PRODCAT_HEARTBEAT_INTERVAL_S", "0.2")
    monkeypatch.setenv("PRODCAT_WORKER_POLL_S", "0.1")
    yield
    for process in _started:  # a test that fails half-way must not leave a worker behind
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    _started.clear()


def queue(db: Database) -> int:
    return jobs.enqueue_training(db, "quick", {}, "ana")


def started_run(db: Database, job_id: int) -> bool:
    return any(p.name.startswith(f"{job_id}-") for p in marks_dir(db).iterdir())


def kill(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGKILL)
    finished(worker)  # reaped: the pid no longer runs anything


@pytest.mark.slow
def test_a_worker_killed_on_this_machine_fails_its_job_at_once_and_the_next_worker_takes_new_jobs(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serving = add_version_row(db, status=VersionStatus.ACTIVE)
    use_runner(monkeypatch, "hang")
    job_id = queue(db)
    worker = start_worker(tmp_path)
    wait_for(lambda: started_run(db, job_id), what="the worker to start the job")
    with pytest.raises(TrainingRefused, match="already running"):
        queue(db)

    kill(worker)
    looked = time.monotonic()
    assert jobs.current_job(db) is None  # failed at this look, its heartbeat still fresh
    noticed_s = time.monotonic() - looked
    job = jobs.get_job(db, job_id)
    assert job.status == "failed" and job.heartbeat_age_s is not None and job.heartbeat_age_s < 10
    assert f"its process ({worker.pid} on " in job.error and "no longer runs (killed? out of memory?)" in job.error
    assert noticed_s < 2, noticed_s
    assert not jobs.worker_alive(db)  # so the UI starts a new worker at once, too
    active = active_version(db)
    assert active is not None and active.id == serving  # the active model keeps serving

    use_runner(monkeypatch, "succeed")
    next_id = queue(db)  # Retrain is not refused as "already running"
    assert finished(start_worker(tmp_path, "--once")) == 0, worker_log(tmp_path)
    assert jobs.get_job(db, next_id).status == "succeeded"


@pytest.mark.slow
def test_a_worker_killed_while_writing_a_checkpoint_leaves_no_staging_folder_or_temp_file(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_runner(monkeypatch, "die_while_saving")
    job_id = queue(db)
    worker = start_worker(tmp_path)
    wait_for(lambda: started_run(db, job_id), timeout=60, what="the checkpoint write to stall")
    staging = staging_dir(db.settings, job_id)
    (temp,) = staging.iterdir()
    assert temp.name.startswith(".model.safetensors.") and temp.suffix == ".tmp"  # never the final name
    assert temp.stat().st_size == SAVING_STALL_BYTES

    kill(worker)
    assert jobs.fail_stale_jobs(db) == [job_id]
    assert not staging.exists() and list(db.settings.checkpoints_dir.iterdir()) == []
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(ModelVersion)) == 0  # nothing half-written registered


def test_the_next_worker_removes_the_staging_of_jobs_that_no_longer_run(db: Database) -> None:
    failed = queue(db)
    jobs.claim_next_job(db, "other-host:1:aaa")
    jobs.fail_job(db, failed, "failed as stale on another machine, which could not reach this data directory")
    running = queue(db)
    jobs.claim_next_job(db, "other-host:2:bbb")  # alive elsewhere, writing its checkpoint now
    for job_id in (failed, running, 999):
        folder = staging_dir(db.settings, job_id)
        folder.mkdir(parents=True)
        (folder / ".model.safetensors.x1y2.tmp").write_bytes(b"\0" * 1000)
    keep = [db.settings.checkpoints_dir / "v1.safetensors", db.settings.checkpoints_dir / ".jobs-notes"]
    keep[0].write_bytes(b"weights")
    keep[1].mkdir()

    assert run_worker(db, once=True) == 0  # nothing queued: it cleans up at start and returns
    assert not staging_dir(db.settings, failed).exists() and not staging_dir(db.settings, 999).exists()
    assert staging_dir(db.settings, running).exists() and all(p.exists() for p in keep)
    assert jobs.get_job(db, running).status == "running"


def test_process_tags_tell_a_gone_process_from_a_running_one() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tag = process_tag(child.pid)
        assert tag.endswith(f"/{child.pid}/" + tag.rsplit("/", 1)[1]) and not process_gone(tag)
    finally:
        child.kill()
        child.wait(timeout=10)
    assert process_gone(tag)
    mine = process_tag()
    assert mine and not process_gone(mine)
    reused = mine.rsplit("/", 1)[0] + "/1"  # this pid, but a process that started at another tick
    assert process_gone(reused)
    elsewhere = "another-boot-id/pid:[4026531836]/" + mine.rsplit("/", 2)[1] + "/1"
    assert not process_gone(elsewhere)  # another machine's process cannot be judged from here
    assert not process_gone("") and not process_gone("garbage")


def test_only_a_gone_process_of_this_machine_fails_a_job_before_the_timeout(db: Database) -> None:
    here, there = queue(db), None
    jobs.claim_next_job(db, "here:1:aaa")
    mine = process_tag()
    with db.write() as session:  # this machine, this pid, another start: the worker died and its pid was reused
        session.add(Worker(id="here:1:aaa", host="here", pid=os.getpid(), process=mine.rsplit("/", 1)[0] + "/1"))
    assert jobs.fail_stale_jobs(db) == [here]

    there = queue(db)
    jobs.claim_next_job(db, "there:2:bbb")
    with db.write() as session:  # a silent pid on another machine: only its heartbeat timeout can tell
        session.add(Worker(id="there:2:bbb", host="there", pid=2, process="other-boot/pid:[1]/2/5"))
    assert jobs.fail_stale_jobs(db) == []
    current = jobs.current_job(db)
    assert current is not None and current.id == there
    assert jobs.worker_alive(db)
