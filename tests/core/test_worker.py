"""The worker as real processes: success, failure, cancel, SIGKILL/SIGTERM mid-run, racing workers, auto-start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from core.db import Database
from core.jobs import queue as jobs
from core.schema import Worker
from tests.core.worker_runners import marks_dir

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT_TIMEOUT_S = 2.5  # short, yet far above the 0.2 s beat even on a loaded machine

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def fast_worker_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short heartbeats and polls, for this process's settings and every worker it starts."""
    monkeypatch.setenv("PRODCAT_HEARTBEAT_TIMEOUT_S", str(HEARTBEAT_TIMEOUT_S))
    monkeypatch.setenv("PRODCAT_HEARTBEAT_INTERVAL_S", "0.2")
    monkeypatch.setenv("PRODCAT_WORKER_POLL_S", "0.1")


@pytest.fixture(autouse=True)
def no_leftover_workers() -> Iterator[None]:
    """A test that fails half-way must not leave a worker process behind."""
    yield
    for process in _started + jobs._spawned:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    _started.clear()


_started: list[subprocess.Popen[bytes]] = []


def use_runner(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("PRODCAT_WORKER_RUNNER", f"tests.core.worker_runners:{name}")


def start_worker(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(tmp_path / f"worker-{time.monotonic_ns()}.log", "wb") as log:  # the child keeps its own handle
        process = subprocess.Popen(
            [sys.executable, "-m", "core.jobs.worker", *args],
            cwd=ROOT,
            env=dict(os.environ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    _started.append(process)
    return process


# Upper bounds only (a passing test returns as soon as the worker is done): generous, because a worker's start-up
# (importing torch) took over 20 s on a 2-core machine under a load average of 4.
def wait_for(condition: Callable[[], object], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def finished(process: subprocess.Popen[bytes], timeout: float = 90) -> int:
    return process.wait(timeout=timeout)


def worker_log(tmp_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("worker-*.log")))


def queue(db: Database) -> int:
    return jobs.enqueue_training(db, "quick", {}, "ana")


@pytest.mark.both_databases
def test_worker_runs_a_job_to_success(db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_runner(monkeypatch, "succeed")
    job_id = queue(db)
    assert finished(start_worker(tmp_path, "--once")) == 0, worker_log(tmp_path)
    job = jobs.get_job(db, job_id)
    assert job.status == "succeeded" and job.model_version_id is not None and job.error == ""
    assert [p["epoch"] for p in job.history] == [1, 2, 3]
    assert [p["val_acc"] for p in job.history] == pytest.approx([0.3, 0.6, 0.9])  # each epoch's final numbers
    assert job.progress["phase"] == "saving"
    assert not jobs.worker_alive(db)  # it said goodbye
    assert f"job {job_id}: succeeded" in worker_log(tmp_path)
    queue(db)  # the slot is free again


@pytest.mark.parametrize(
    ("runner", "expected"),
    [
        ("fail", ["RuntimeError: synthetic failure: the loss became NaN at step 7", "worker_runners.py"]),
        ("refuse", ["training refused: 'Hats' has 1 labelled training image: label at least 2"]),
        ("oom", ["the GPU ran out of memory", "lower batch_size", "Tried to allocate 2.00 GiB"]),
    ],
)
def test_a_failing_job_is_marked_failed_with_its_error(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runner: str, expected: list[str]
) -> None:
    use_runner(monkeypatch, runner)
    job_id = queue(db)
    assert finished(start_worker(tmp_path, "--once")) == 0, worker_log(tmp_path)
    job = jobs.get_job(db, job_id)
    assert job.status == "failed" and job.finished_at is not None and jobs.current_job(db) is None
    for text in expected:
        assert text in job.error
    if runner == "refuse":  # a refusal we raised on purpose is shown as is, without a traceback
        assert "Traceback" not in job.error


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_real_cuda_out_of_memory_fails_the_job_clearly(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_runner(monkeypatch, "cuda_oom")
    job_id = queue(db)
    assert finished(start_worker(tmp_path, "--once"), timeout=120) == 0, worker_log(tmp_path)
    job = jobs.get_job(db, job_id)
    assert job.status == "failed" and "the GPU ran out of memory" in job.error, job.error


def test_cancelling_a_running_job_stops_the_worker_run(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_runner(monkeypatch, "slow")
    job_id = queue(db)
    worker = start_worker(tmp_path, "--once")
    wait_for(lambda: jobs.get_job(db, job_id).progress.get("step"), what="progress from the worker")
    assert jobs.get_job(db, job_id).status == "running"
    jobs.cancel_job(db, job_id, actor="ben")
    assert finished(worker, timeout=15) == 0, worker_log(tmp_path)
    job = jobs.get_job(db, job_id)
    assert job.status == "cancelled" and job.progress["step"] > 0 and jobs.current_job(db) is None
    assert job.error == "cancelled by ben while running"


def test_a_killed_worker_leaves_a_failed_job_not_a_running_one(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_runner(monkeypatch, "hang")
    job_id = queue(db)
    worker = start_worker(tmp_path)
    wait_for(lambda: jobs.get_job(db, job_id).status == "running", what="the job to start")
    # One long step without progress: the heartbeat thread alone keeps it from looking dead.
    time.sleep(HEARTBEAT_TIMEOUT_S * 1.2)
    assert jobs.fail_stale_jobs(db) == [] and jobs.get_job(db, job_id).status == "running"
    assert jobs.worker_alive(db)

    # As a worker on another machine: its process cannot be looked at from here, so only the heartbeat tells (a
    # killed worker of this machine is failed at once: test_worker_faults.py).
    with db.write() as session:
        session.execute(update(Worker).values(process=""))
    worker.send_signal(signal.SIGKILL)
    finished(worker)
    current = jobs.current_job(db)
    assert current is not None and current.status == "running"
    time.sleep(HEARTBEAT_TIMEOUT_S + 0.3)
    assert not jobs.worker_alive(db)
    assert finished(start_worker(tmp_path, "--once")) == 0  # a new worker cleans up at start
    job = jobs.get_job(db, job_id)
    assert job.status == "failed" and "stopped responding (killed?" in job.error
    assert jobs.current_job(db) is None
    queue(db)  # people can retrain again


def test_sigterm_fails_the_running_job_and_exits(db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_runner(monkeypatch, "hang")
    job_id = queue(db)
    worker = start_worker(tmp_path)
    wait_for(lambda: jobs.get_job(db, job_id).status == "running", what="the job to start")
    worker.send_signal(signal.SIGTERM)
    assert finished(worker, timeout=15) == 128 + signal.SIGTERM, worker_log(tmp_path)
    job = jobs.get_job(db, job_id)
    assert job.status == "failed" and "worker stopped by signal SIGTERM" in job.error
    assert not jobs.worker_alive(db)


@pytest.mark.both_databases
def test_two_workers_racing_run_the_job_once(db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_runner(monkeypatch, "succeed")
    job_id = queue(db)
    workers = [start_worker(tmp_path, "--once", "--poll", "0.05") for _ in range(2)]
    assert [finished(w) for w in workers] == [0, 0], worker_log(tmp_path)
    runs = sorted(p.name for p in marks_dir(db).iterdir())
    assert len(runs) == 1 and runs[0].startswith(f"{job_id}-"), runs
    assert jobs.get_job(db, job_id).status == "succeeded"


def test_ensure_worker_starts_one_detached_worker_that_runs_the_job_and_exits(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_runner(monkeypatch, "succeed")
    job_id = queue(db)
    # Two UIs noticing "no worker" at the same moment start one worker between them.
    started = [r for r in _both(lambda own: jobs.ensure_worker(own, exit_when_idle=0.5), db)]
    assert sorted(started) == [False, True], started
    assert jobs.ensure_worker(db) is False  # alive now: nothing more to start
    wait_for(lambda: jobs.get_job(db, job_id).status == "succeeded", what="the detached worker to run the job")
    process = jobs._spawned[-1]
    assert process.wait(timeout=15) == 0  # it exits by itself when idle
    assert not jobs.worker_alive(db)
    log_text = (db.settings.logs_dir / "worker.log").read_text()
    assert f"job {job_id}: succeeded" in log_text and "idle" in log_text


def _both(action: Callable[[Database], bool], db: Database) -> list[bool]:
    barrier = threading.Barrier(2)
    results: list[bool] = []

    def run() -> None:
        own = Database(db.settings)
        barrier.wait()
        results.append(action(own))
        own.dispose()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_cli_lists_shows_and_cancels_jobs(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    import core.cli.jobs  # noqa: F401 (registers the commands)
    from core.cli.app import app

    runner = CliRunner()
    assert "no training jobs yet" in runner.invoke(app, ["jobs", "list"]).output
    job_id = queue(db)
    listed = runner.invoke(app, ["jobs", "list"])
    assert listed.exit_code == 0 and f"#{job_id}  queued  quick  by ana" in listed.output
    result = runner.invoke(app, ["jobs", "cancel", str(job_id), "--actor", "ben"])
    assert result.exit_code == 0 and f"job {job_id} cancelled" in result.output
    again = runner.invoke(app, ["jobs", "cancel", str(job_id)])
    assert again.exit_code == 1 and "already cancelled" in again.output
    shown = runner.invoke(app, ["jobs", "show", str(job_id)])
    assert shown.exit_code == 0 and "cancelled by ben" in shown.output
    assert runner.invoke(app, ["jobs", "show", "99"]).exit_code == 1


def test_cli_worker_command_runs_a_queued_job(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    import core.cli.jobs  # noqa: F401 (registers the commands)
    from core.cli.app import app

    use_runner(monkeypatch, "succeed")
    job_id = queue(db)
    result = CliRunner().invoke(app, ["worker", "--once", "--poll", "0.1"])
    assert result.exit_code == 0, result.output
    assert jobs.get_job(db, job_id).status == "succeeded"


def test_foreground_run_for_train_wait(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.errors import TrainingRefused
    from core.jobs.worker import run_job_in_foreground

    use_runner(monkeypatch, "succeed")
    job_id = queue(db)
    seen: list[jobs.ProgressReport] = []
    version_id = run_job_in_foreground(db, job_id, on_progress=seen.append)
    job = jobs.get_job(db, job_id)
    assert job.status == "succeeded" and version_id == job.model_version_id is not None
    assert [p.epoch for p in seen if p.val_acc is not None] == [1, 2, 3]  # the CLI's progress bar saw them
    assert not jobs.worker_alive(db)
    with pytest.raises(TrainingRefused, match=rf"#{job_id}, succeeded.* is not queued"):
        run_job_in_foreground(db, job_id)


def test_idle_step_refreshes_the_rolled_back_versions_predictions_and_survives_a_corrupt_checkpoint(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy import func, select

    from core.jobs.worker import IdlePredictions, refresh_idle_predictions, run_worker
    from core.ml.versions import activate_version, checkpoint_files
    from core.schema import Prediction
    from tests.core.training_helpers import save_random_version, store_images

    def stored(version_id: int) -> int:
        with db.read() as session:
            query = select(func.count()).select_from(Prediction).where(Prediction.model_version_id == version_id)
            count = session.scalar(query)
        assert count is not None
        return count

    old = save_random_version(db, ["Shoes", "Bags"], seed=1)
    new = save_random_version(db, ["Shoes", "Bags"], seed=2)
    activate_version(db, new, actor="ana")
    store_images(db, [("Shoes", i, "train") for i in range(3)])
    activate_version(db, old, actor="ana")  # the rollback: old has no predictions for the images added since
    assert refresh_idle_predictions(db, limit=2) == 2 and stored(old) == 2
    # The real loop: no job queued, so it fills in the rest while idle, then still exits when idle.
    assert run_worker(db, exit_when_idle=0.3, poll_s=0.05) == 0
    assert stored(old) == 3 and stored(new) == 0
    assert refresh_idle_predictions(db, limit=2) == 0

    activate_version(db, new, actor="ana")
    weights, _ = checkpoint_files(db, new)
    weights.write_bytes(b"not a checkpoint")  # corrupt after activation: the worker must log it, not die
    step = IdlePredictions(limit=2)
    with caplog.at_level("ERROR", logger="core.jobs.worker"):
        assert step.step(db) == 0
        assert step.step(db) == 0
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"v{new}" in errors[0]
    assert stored(new) == 0


def test_an_unreadable_original_is_skipped_by_the_idle_refresh_and_the_others_still_get_predictions(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy import select

    from core.jobs.worker import IdlePredictions
    from core.ml.versions import activate_version
    from core.schema import Image, Prediction
    from tests.core.training_helpers import save_random_version, store_images

    version = save_random_version(db, ["Shoes", "Bags"], seed=1)
    activate_version(db, version, actor="ana")
    ids = store_images(db, [("Shoes", i, "train") for i in range(5)])
    with db.read() as session:
        broken = session.get(Image, ids[1])
        assert broken is not None
        (db.settings.data_dir / broken.stored_path).write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    step = IdlePredictions(limit=3, retry_s=3600)
    with caplog.at_level("ERROR", logger="core.jobs.worker"):
        assert step.step(db) == 2  # ids 0 and 2 of the page; 1 is unreadable
        assert step.step(db) == 2  # the bad one is not tried again in the next page
        assert step.step(db) == 0
    with db.read() as session:
        predicted = set(session.scalars(select(Prediction.image_id).where(Prediction.model_version_id == version)))
    assert predicted == set(ids) - {ids[1]}
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"image {ids[1]}" in errors[0] and "re-import" in errors[0]
