"""The training worker: `python -m core.jobs.worker` claims queued jobs, trains with a heartbeat, records the outcome.

    python -m core.jobs.worker [--once] [--exit-when-idle SECONDS] [--poll SECONDS]

Everything goes through the database (claim, progress, heartbeat, cancel, outcome), so a worker can run on another
machine that shares the database and image store. A job always ends succeeded, cancelled or failed with the error
text; a worker killed outright leaves a stale heartbeat that the next worker or UI start turns into "failed".
The training function is `core.ml.training:run_training`, or the `module:function` named by PRODCAT_WORKER_RUNNER
(tests use small runners; the real one is tested end to end with the training module).

CPU threads (`core.jobs.threads`): the worker sets OMP_WAIT_POLICY=PASSIVE, and OMP_NUM_THREADS to every core (one less
when the app started it on a machine with more than 2, to leave a core to the app server), unless its environment
already sets them. OpenMP reads them when torch loads, so a worker run inside a process that already imported torch
keeps OpenMP's spinning default: set OMP_WAIT_POLICY=PASSIVE in that process's environment.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

from sqlalchemy.exc import OperationalError

from core.db import Database
from core.errors import DatabaseBusy, JobCancelled, ProdcatError, TrainingRefused
from core.jobs import queue as jobs
from core.jobs.threads import apply_worker_threads, lower_worker_priority
from models.errors import NotEnoughData, TrainingStopped

log = logging.getLogger("core.jobs.worker")

RUNNER = "core.ml.training:run_training"
RUNNER_ENV = "PRODCAT_WORKER_RUNNER"
PROGRESS_MIN_INTERVAL_S = 1.0  # at most one progress write per second, except phase and epoch changes
TRACEBACK_TAIL_LINES = 25
IDLE_PREDICT_LIMIT = 512  # images predicted per idle tick: bounds how long a newly queued job waits to be claimed
IDLE_PREDICT_RETRY_S = 300.0  # after a failed background refresh, wait this long before trying the same version

ProgressFn = Callable[[jobs.ProgressReport], None]
Runner = Callable[..., int]


class WorkerStopped(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT: the current job is failed and the worker exits.

    A BaseException so training code that catches Exception cannot swallow it.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"worker stopped by signal {signal.Signals(signum).name}")


def resolve_runner(spec: str | None = None) -> Runner:
    """The training function named `module:function` (default: PRODCAT_WORKER_RUNNER, else core.ml.training)."""
    import os

    spec = spec or os.environ.get(RUNNER_ENV) or RUNNER
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{RUNNER_ENV}={spec!r}: expected 'module:function'")
    return getattr(importlib.import_module(module_name), attr)


def error_text(exc: BaseException) -> str:
    """What a failed job's row says: the message for refusals we raise on purpose, plus a traceback tail otherwise."""
    if isinstance(exc, ProdcatError | NotEnoughData):
        return str(exc) or type(exc).__name__
    lines = traceback.format_exception(exc)
    tail = "".join(lines).rstrip().splitlines()[-TRACEBACK_TAIL_LINES:]
    return f"{type(exc).__name__}: {exc}\n\n" + "\n".join(tail)


def is_cuda_oom(exc: BaseException) -> bool:
    """True for CUDA out-of-memory errors (torch's own type, or the message older versions raise)."""
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc)
    return "CUDA out of memory" in text or "CUDA error: out of memory" in text


def release_gpu_memory() -> None:
    """Give cached CUDA memory back (before a job, and after one that ran out of memory)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class JobRun:
    """One job being run: throttled progress writes and the stop flag, shared with the heartbeat thread."""

    def __init__(self, db: Database, job_id: int, extra_progress: ProgressFn | None = None) -> None:
        self.db = db
        self.job_id = job_id
        self.extra_progress = extra_progress
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._pending: jobs.ProgressReport | None = None
        self._last_write = 0.0
        self._last_key: tuple[str, str | None, int | None] | None = None

    def should_stop(self) -> bool:
        """True once a cancel was seen (by a progress write or the heartbeat thread)."""
        return self.stop.is_set()

    def on_progress(self, report: jobs.ProgressReport) -> None:
        """Record a report: immediately when the phase, stage or epoch changes, else at most once a second."""
        if self.extra_progress is not None:
            self.extra_progress(report)
        key = (report.phase, report.stage, report.epoch)
        with self._lock:
            changed = key != self._last_key
            if changed and self._pending is not None:
                self._write(self._pending)  # the last report of an epoch carries its validation numbers
            self._pending = report
            self._last_key = key
            if changed or time.monotonic() - self._last_write >= PROGRESS_MIN_INTERVAL_S:
                self._write(report)

    def flush(self) -> None:
        """Write progress held back by the throttle (the heartbeat thread calls this too)."""
        with self._lock:
            if self._pending is not None:
                self._write(self._pending)

    def _write(self, report: jobs.ProgressReport) -> None:
        try:
            if jobs.record_progress(self.db, self.job_id, report):
                self.stop.set()
        except (OperationalError, DatabaseBusy) as exc:  # progress is best effort: a busy database must not fail it
            log.warning("job %s: progress not recorded (%s)", self.job_id, exc)
            return
        self._pending = None
        self._last_write = time.monotonic()


class Heartbeat(threading.Thread):
    """Keeps the worker's and the current job's heartbeat fresh even while one training step takes long."""

    def __init__(self, db: Database, worker_id: str) -> None:
        super().__init__(name="prodcat-heartbeat", daemon=True)
        self.db = db
        self.worker_id = worker_id
        self.run_state: JobRun | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        interval = self.db.settings.heartbeat_interval_s
        while not self._halt.wait(interval):
            self.beat()

    def beat(self) -> None:
        """One heartbeat: the worker row, held-back progress, the job row (and whether it should stop)."""
        try:
            jobs.heartbeat_worker(self.db, self.worker_id)
            state = self.run_state
            if state is not None:
                state.flush()
                if jobs.heartbeat_job(self.db, state.job_id):
                    state.stop.set()
        except Exception as exc:  # a missed beat is survivable; a dead heartbeat thread is not
            log.warning("heartbeat failed: %s", exc)

    def halt(self) -> None:
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)


def execute_job(
    db: Database,
    job: jobs.JobView,
    *,
    heartbeat: Heartbeat | None = None,
    runner: Runner | None = None,
    extra_progress: ProgressFn | None = None,
) -> int | None:
    """Run a claimed job to its outcome: succeeded (returns the model version id), cancelled or failed (None).

    Never leaves the job running; WorkerStopped and KeyboardInterrupt fail it and propagate.
    """
    state = JobRun(db, job.id, extra_progress)
    if heartbeat is not None:
        heartbeat.run_state = state
    started = time.monotonic()
    log.info("job %s (%s, requested by %s): started", job.id, job.mode, job.requested_by)
    oom = False
    try:
        versions = sys.modules.get("core.ml.versions")
        if versions is not None:  # classifiers loaded for idle predictions would hold GPU memory all through training
            versions.forget_loaded_classifiers()
            release_gpu_memory()
        run = runner or resolve_runner()
        version_id = run(db, job.id, on_progress=state.on_progress, should_stop=state.should_stop)
    except (JobCancelled, TrainingStopped):
        _quietly(state.flush)
        jobs.mark_cancelled(db, job.id)
        log.info("job %s: cancelled after %.1f s", job.id, time.monotonic() - started)
        return None
    except (WorkerStopped, KeyboardInterrupt) as exc:
        reason = str(exc) if isinstance(exc, WorkerStopped) else "worker interrupted (Ctrl-C)"
        _quietly(state.flush)
        jobs.fail_job(db, job.id, f"{reason} while the job was running; the previous model keeps serving")
        log.error("job %s: failed: %s", job.id, reason)
        raise
    except Exception as exc:
        _quietly(state.flush)
        oom = is_cuda_oom(exc)
        if oom:
            text = (
                "the GPU ran out of memory (CUDA out of memory): lower batch_size or image_size, use a smaller "
                f"architecture, or train in quick mode. Details: {exc}"
            )
        else:
            text = error_text(exc)
        jobs.fail_job(db, job.id, text)
        log.error("job %s: failed after %.1f s: %s", job.id, time.monotonic() - started, text.splitlines()[0])
        return None
    finally:
        if heartbeat is not None:
            heartbeat.run_state = None
        if oom:
            release_gpu_memory()
    if not isinstance(version_id, int) or isinstance(version_id, bool):
        jobs.fail_job(db, job.id, f"the training function returned {version_id!r} instead of a model version id")
        return None
    _quietly(state.flush)
    jobs.finish_job(db, job.id, version_id)
    log.info("job %s: succeeded in %.1f s: model version %s", job.id, time.monotonic() - started, version_id)
    return version_id


def _quietly(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception as exc:
        log.warning("%s failed: %s", getattr(action, "__name__", "action"), exc)


class IdlePredictions:
    """The worker's idle step: store the active version's missing predictions, one bounded page per tick.

    Activating a version from the UI (a rollback, say) leaves images imported since without a prediction of it; the
    worker fills them in here instead of the web process. A stored original that cannot be read is logged and
    skipped (the rest still get predictions) and tried again after `retry_s`; a failure of the whole step (a
    corrupt checkpoint) is logged once and retried after `retry_s` or when another version becomes active. Nothing
    here ever stops the worker.
    """

    def __init__(self, *, limit: int = IDLE_PREDICT_LIMIT, retry_s: float = IDLE_PREDICT_RETRY_S) -> None:
        self.limit = limit
        self.retry_s = retry_s
        self._failed: tuple[int, str, float] | None = None  # (version id, error text, monotonic time)
        self._skip: tuple[int, set[int], float] = (-1, set(), 0.0)  # (version id, unreadable image ids, since)

    def _skipped(self, version_id: int) -> set[int]:
        version, ids, since = self._skip
        if version != version_id or (ids and time.monotonic() - since >= self.retry_s):
            self._skip = (version_id, set(), time.monotonic())
        return self._skip[1]

    def step(self, db: Database) -> int:
        """Predict up to `limit` images lacking the active version's prediction; returns how many were stored."""
        from core.ml.predict import predict_missing  # imported on the first idle tick, not at worker start
        from core.ml.versions import active_version

        version_id = -1  # unknown until the active version is read
        unreadable: list[Any] = []
        try:
            version = active_version(db)
            if version is None:
                return 0
            version_id = version.id
            failed = self._failed
            if failed is not None and failed[0] == version_id and time.monotonic() - failed[2] < self.retry_s:
                return 0
            skip = self._skipped(version_id)
            tried = predict_missing(db, limit=self.limit, skip=skip, unreadable=unreadable)
        except Exception as exc:  # background work: the worker must keep claiming jobs whatever happens here
            text = str(exc) or type(exc).__name__
            if self._failed is None or self._failed[:2] != (version_id, text):
                log.error("background prediction refresh failed (retried in %.0f s): %s", self.retry_s, text)
            self._failed = (version_id, text, time.monotonic())
            return 0
        for refusal in unreadable:
            log.error("no prediction of v%s for %s (retried in %.0f s)", version_id, refusal, self.retry_s)
            skip.add(int(refusal.image_id))
        if self._failed is not None:
            log.info("background prediction refresh works again")
            self._failed = None
        done = tried - len(unreadable)
        if done:
            log.info("stored predictions of model v%s for %s more images", version_id, done)
        return done


def refresh_idle_predictions(db: Database, *, limit: int = IDLE_PREDICT_LIMIT) -> int:
    """One idle step with a fresh state (no back-off memory): how many predictions were stored."""
    return IdlePredictions(limit=limit).step(db)


def run_worker(
    db: Database,
    *,
    once: bool = False,
    exit_when_idle: float | None = None,
    poll_s: float | None = None,
    worker_id: str | None = None,
    runner: Runner | None = None,
) -> int:
    """The worker loop; returns how many jobs it ran.

    `once`: run at most one job (none if nothing is queued), then return. `exit_when_idle`: return after this many
    seconds without a job. Fails stale jobs at start and now and then while idle.
    """
    settings = db.settings
    poll_s = settings.worker_poll_s if poll_s is None else poll_s
    worker_id = worker_id or jobs.new_worker_id()
    jobs.register_worker(db, worker_id, device=settings.device)
    log.info("worker %s started (poll %.2g s, exit when idle: %s)", worker_id, poll_s, exit_when_idle)
    stale = jobs.fail_stale_jobs(db)
    if stale:
        log.warning("failed stale jobs (their worker stopped responding): %s", stale)
    heartbeat = Heartbeat(db, worker_id)
    heartbeat.start()
    ran = 0
    idle_predictions = IdlePredictions()
    idle_since = last_stale_check = time.monotonic()
    try:
        while True:
            job = jobs.claim_next_job(db, worker_id)
            if job is not None:
                execute_job(db, job, heartbeat=heartbeat, runner=runner)
                ran += 1
                idle_since = time.monotonic()
                if once:
                    break
                continue
            if once:
                break
            now = time.monotonic()
            if now - last_stale_check >= settings.heartbeat_timeout_s / 2:
                last_stale_check = now
                jobs.fail_stale_jobs(db)
            # One page of missing predictions, then straight back to claiming: a queued job waits one page at most.
            if idle_predictions.step(db):
                idle_since = time.monotonic()
                continue
            if exit_when_idle is not None and now - idle_since >= exit_when_idle:
                # Stop announcing first, then look once more: a job queued by a UI that still saw us alive
                # (and so started no worker) is picked up instead of stranded.
                jobs.unregister_worker(db, worker_id)
                if jobs.current_job(db) is None:
                    log.info("worker %s idle for %.0f s: exiting", worker_id, now - idle_since)
                    break
                jobs.register_worker(db, worker_id, device=settings.device)
                idle_since = now
                continue
            time.sleep(poll_s)
    finally:
        heartbeat.halt()
        _quietly(lambda: jobs.unregister_worker(db, worker_id))
    return ran


def run_job_in_foreground(db: Database, job_id: int, *, on_progress: ProgressFn | None = None) -> int | None:
    """Claim queued job `job_id` in this process and run it the way the worker does (CLI `train --wait`).

    Returns the model version id, or None when the job failed or was cancelled (its row says why).
    """
    worker_id = jobs.new_worker_id("foreground")
    jobs.register_worker(db, worker_id, device=db.settings.device)
    heartbeat = Heartbeat(db, worker_id)
    try:
        job = jobs.claim_next_job(db, worker_id, job_id=job_id)
        if job is None:
            view = jobs.get_job(db, job_id)
            raise TrainingRefused(f"training job {view.describe()} is not queued, so it cannot be run here")
        heartbeat.start()
        return execute_job(db, job, heartbeat=heartbeat, extra_progress=on_progress)
    finally:
        heartbeat.halt()
        _quietly(lambda: jobs.unregister_worker(db, worker_id))


def _install_signal_handlers() -> None:
    stopping = False

    def handler(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:  # already cleaning up: let the job be marked failed first
            log.warning("signal %s ignored: already stopping", signal.Signals(signum).name)
            return
        stopping = True
        raise WorkerStopped(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of `python -m core.jobs.worker`."""
    parser = argparse.ArgumentParser(prog="python -m core.jobs.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="run at most one queued job, then exit")
    parser.add_argument("--exit-when-idle", type=float, metavar="SECONDS", help="exit after this long without a job")
    parser.add_argument("--poll", type=float, metavar="SECONDS", help="how often to look for a job (default: settings)")
    parser.add_argument("--worker-id", help=argparse.SUPPRESS)  # the row ensure_worker reserved for this process
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit status (0; 2 when the database cannot be used; 128 + signal number when stopped
    by a signal)."""
    args = build_parser().parse_args(argv)
    if args.exit_when_idle is not None and args.exit_when_idle < 0:
        raise SystemExit("--exit-when-idle must not be negative")
    if args.poll is not None and args.poll <= 0:
        raise SystemExit("--poll must be positive")
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s"
        )
        logging.getLogger("alembic").setLevel(logging.WARNING)  # migrations at start are not news
    from core.db import close_all, open_database
    from core.settings import get_settings

    # Before anything imports torch: OpenMP reads its wait policy once, when torch loads it.
    threads = apply_worker_threads()
    niceness = lower_worker_priority(get_settings().worker_nice)
    log.info("worker threads: %s; niceness %d", threads.describe(), niceness)
    try:
        db = open_database(get_settings())
    except ProdcatError as exc:  # a refused data directory, say: one line in the log, no traceback
        log.error("cannot start: %s", exc)
        return 2
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        _install_signal_handlers()
    try:
        run_worker(db, once=args.once, exit_when_idle=args.exit_when_idle, poll_s=args.poll, worker_id=args.worker_id)
    except WorkerStopped as exc:
        log.warning("%s: exiting", exc)
        return 128 + exc.signum
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        close_all()
    return 0


if __name__ == "__main__":
    # Run the imported module's main, so `core.jobs.worker.WorkerStopped` is one class even under `python -m`.
    from core.jobs import worker as _worker

    sys.exit(_worker.main())
