"""Training jobs and worker liveness: the rows through which the UI and the worker process talk to each other.

Everything here is a short transaction on the database, so a worker on another machine that shares the database
works exactly like the one the UI starts on this machine. Nothing process-local (pid files, sockets) is assumed,
except in `ensure_worker`, which starts a worker here when no worker anywhere has a fresh heartbeat.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import CursorResult, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.auth import Action, check, record
from core.db import Database
from core.errors import NotFound, TrainingRefused
from core.jobs.processes import process_gone, process_tag
from core.jobs.threads import worker_thread_env
from core.ml.contract import JobParams, ProgressReport
from core.ml.staging import remove_dead_staging
from core.schema import JobStatus, TrainingJob, Worker, utcnow
from core.settings import Settings
from models.modes import TrainMode

log = logging.getLogger(__name__)

LIVE_STATES = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
FINISHED_STATES = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)
# Per-epoch points kept in progress["history"] for the loss/accuracy curves.
# Model-library phases that are summaries, not epochs (their numbers are best-so-far, not per epoch). Reports from
# core.ml.training carry the library's phase as "stage" (their "phase" is a display text such as "training (done)").
REPO_ROOT = Path(__file__).resolve().parents[2]
# Workers this process started: kept referenced so they are reaped (polled) instead of warned about when collected.
_spawned: list[subprocess.Popen[bytes]] = []


@dataclass(frozen=True)
class JobView:
    """A training job as pages, the CLI, the worker and the sidebar overview see it (a detached copy of the row); the
    one job summary type."""

    id: int
    mode: str
    status: JobStatus
    progress: dict[str, Any]  # the latest ProgressReport as stored, plus "history"
    error: str
    requested_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    heartbeat_age_s: float | None  # seconds since the worker last reported, None before it started
    model_version_id: int | None
    params: dict[str, Any] = field(default_factory=dict)
    worker_id: str = ""
    cancel_requested: bool = False

    @property
    def live(self) -> bool:
        """Queued or running."""
        return self.status in LIVE_STATES

    @property
    def report(self) -> ProgressReport:
        """The latest progress report (an empty phase before the worker's first)."""
        return ProgressReport.from_json(self.progress)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Per-epoch points (epoch, loss, train_acc, val_acc) for the training curves."""
        return list(self.progress.get("history") or [])

    def describe(self) -> str:
        """One line naming the job for messages: `#3, running, requested by ana`."""
        return f"#{self.id}, {self.status}, requested by {self.requested_by}"


def job_view(row: TrainingJob, now: datetime | None = None) -> JobView:
    """A detached JobView of a job row (read inside the caller's session)."""
    now = now or utcnow()
    age = None if row.heartbeat_at is None else max(0.0, (now - row.heartbeat_at).total_seconds())
    return JobView(
        id=row.id,
        mode=row.mode,
        status=JobStatus(row.status),
        progress=dict(row.progress or {}),
        error=row.error or "",
        requested_by=row.requested_by,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        heartbeat_at=row.heartbeat_at,
        heartbeat_age_s=age,
        model_version_id=row.model_version_id,
        params=dict(row.params or {}),
        worker_id=row.worker_id or "",
        cancel_requested=bool(row.cancel_requested),
    )


def _live_job_in(session: Session) -> TrainingJob | None:
    return session.scalars(
        select(TrainingJob).where(TrainingJob.status.in_(LIVE_STATES)).order_by(TrainingJob.id).limit(1)
    ).first()


def _refusal(live: JobView | None) -> TrainingRefused:
    if live is None:  # the other request vanished between our INSERT and this read (cancelled at once)
        return TrainingRefused("another training job was requested at the same moment: try again")
    return TrainingRefused(f"a training job ({live.describe()}) is already {live.status}: wait for it or cancel it")


def _refuse_if_live(session: Session) -> None:
    live = _live_job_in(session)
    if live is not None:
        raise _refusal(job_view(live))


def validate_params(settings: Settings, mode: str, params: Any) -> JobParams:
    """The job's parameters, checked as the worker will read them; raises TrainingRefused naming a bad mode, key or
    value."""
    job_params = JobParams.parse(mode, params)
    from core.ml.training import build_train_config  # torch and timm: imported when a job is queued, not before

    build_train_config(settings, job_params)  # raises TrainingRefused for unknown keys or bad values
    return job_params


def enqueue_training(db: Database, mode: TrainMode | str, params: dict[str, Any] | None, actor: str) -> int:
    """Queue a training job and return its id.

    Raises TrainingRefused for a bad mode or parameters, and when a job is already queued or running, also when
    two people press at the same moment: the UNIQUE `active_slot` admits one live job, the second INSERT fails.
    """
    actor = (actor or "").strip()
    if not actor:
        raise TrainingRefused("who is asking? a training job needs an actor name for the audit trail")
    job_params = validate_params(db.settings, mode, params)
    fail_stale_jobs(db)  # a job whose worker died must not refuse this one as "already running"
    try:
        with db.write() as session:
            check(session, db.settings.auth, actor, Action.TRAIN)
            _refuse_if_live(session)
            job = TrainingJob(
                mode=job_params.mode.value,
                params=job_params.overrides,
                status=JobStatus.QUEUED.value,
                active_slot=1,
                requested_by=actor,
            )
            session.add(job)
            session.flush()
            job_id = job.id
            record(session, actor, Action.TRAIN, f"training job {job_id}", change="queue", mode=job_params.mode.value)
    except IntegrityError:
        # Another session inserted its live job between our check and our INSERT (PostgreSQL read committed;
        # SQLite's BEGIN IMMEDIATE serialises writers so the check above normally catches it first).
        raise _refusal(current_job(db)) from None
    log.info("queued training job %s (%s) for %s", job_id, job_params.mode, actor)
    return job_id


def claim_next_job(db: Database, worker_id: str, *, job_id: int | None = None) -> JobView | None:
    """Atomically move the oldest queued job (or job `job_id`) to running for `worker_id`; None if there is none.

    On PostgreSQL the candidate is picked with `SELECT ... FOR UPDATE SKIP LOCKED`: a job another worker is claiming
    right now is locked and skipped, so N workers polling at once each take a different queued job (or None) without
    waiting for each other. On SQLite, BEGIN IMMEDIATE serialises the claims. The conditional UPDATE (`... WHERE id =
    :id AND status = 'queued'`) makes sure in either case that a job is moved to running once.
    """
    now = utcnow()
    with db.write() as session:
        query = select(TrainingJob.id).where(TrainingJob.status == JobStatus.QUEUED.value)
        if job_id is not None:
            query = query.where(TrainingJob.id == int(job_id))
        query = query.order_by(TrainingJob.id).limit(1).with_for_update(skip_locked=True)
        candidate = session.scalars(query).first()
        if candidate is None:
            return None
        result = session.execute(
            update(TrainingJob)
            .where(TrainingJob.id == candidate, TrainingJob.status == JobStatus.QUEUED.value)
            .values(status=JobStatus.RUNNING.value, worker_id=worker_id, started_at=now, heartbeat_at=now)
            .execution_options(synchronize_session=False)
        )
        assert isinstance(result, CursorResult)  # an UPDATE's result
        if result.rowcount != 1:
            return None
        row = session.get(TrainingJob, candidate, populate_existing=True)
        assert row is not None
        view = job_view(row, now)
    log.info("worker %s claimed training job %s", worker_id, view.id)
    return view


def _merge_history(history: list[dict[str, Any]], report: ProgressReport) -> list[dict[str, Any]]:
    """Upsert the report's point for its epoch: the last report of an epoch (its validation) is the one kept."""
    point = report.history_point()
    if point is None:
        return history
    kept = [p for p in history if p.get("epoch") != point["epoch"]]
    kept.append(point)
    kept.sort(key=lambda p: p["epoch"])
    return kept


def record_progress(db: Database, job_id: int, report: ProgressReport) -> bool:
    """Store the latest progress report (plus the per-epoch history for curves) and refresh the heartbeat.

    Returns True when the job should stop: cancel was requested, or it is no longer running (failed as stale,
    say). One short write transaction per call; the worker throttles how often it calls.
    """
    stored = report.to_json()
    with db.write() as session:
        row = session.get(TrainingJob, int(job_id))
        if row is None:
            raise NotFound(f"no training job {job_id}")
        if row.status != JobStatus.RUNNING:
            return True
        previous = dict(row.progress or {})
        stored["history"] = _merge_history(list(previous.get("history") or []), report)
        row.progress = stored
        row.heartbeat_at = utcnow()
        return bool(row.cancel_requested)


def heartbeat_job(db: Database, job_id: int) -> bool:
    """Refresh a running job's heartbeat; returns True when it should stop (cancel requested or not running)."""
    with db.write() as session:
        row = session.get(TrainingJob, int(job_id))
        if row is None or row.status != JobStatus.RUNNING:
            return True
        row.heartbeat_at = utcnow()
        return bool(row.cancel_requested)


def cancel_job(db: Database, job_id: int, *, actor: str) -> JobView:
    """Cancel a job: a queued one at once; a running one is asked to stop (the worker marks it cancelled).

    Raises NotFound for an unknown id and TrainingRefused when the job has already finished.
    """
    fail_stale_jobs(db)  # a job whose worker died is failed now: nobody would ever read a cancel request
    now = utcnow()
    with db.write() as session:
        check(session, db.settings.auth, actor, Action.TRAIN)
        row = session.get(TrainingJob, int(job_id))
        if row is None:
            raise NotFound(f"no training job {job_id}")
        if row.status == JobStatus.QUEUED:
            row.status = JobStatus.CANCELLED.value
            row.active_slot = None
            row.finished_at = now
            row.error = f"cancelled by {actor} before it started"
        elif row.status == JobStatus.RUNNING:
            row.cancel_requested = True
            row.error = f"cancelled by {actor} while running"  # kept when the worker marks it cancelled
        else:
            raise TrainingRefused(f"training job #{row.id} already {row.status}: there is nothing to cancel")
        record(session, actor, Action.TRAIN, f"training job {row.id}", change="cancel")
        view = job_view(row, now)
    log.info("training job %s: cancel by %s (%s)", job_id, actor, view.status)
    return view


def _finish(db: Database, job_id: int, status: JobStatus, *, only_live: bool, **values: Any) -> bool:
    with db.write() as session:
        row = session.get(TrainingJob, int(job_id))
        if row is None:
            raise NotFound(f"no training job {job_id}")
        if only_live and row.status not in LIVE_STATES:
            return False  # already finished (e.g. failed as stale): the first outcome recorded stands
        row.status = status.value
        row.active_slot = None
        row.finished_at = utcnow()
        for key, value in values.items():
            setattr(row, key, value)
    return True


def finish_job(db: Database, job_id: int, model_version_id: int) -> None:
    """Mark a job succeeded with the model version it produced.

    Recorded even if the job was meanwhile failed as stale or asked to cancel: the version exists, so it is the truth.
    """
    _finish(db, job_id, JobStatus.SUCCEEDED, only_live=False, model_version_id=int(model_version_id), error="")


def fail_job(db: Database, job_id: int, error_text: str) -> bool:
    """Mark a queued or running job failed with `error_text`; False if it had already finished."""
    return _finish(db, job_id, JobStatus.FAILED, only_live=True, error=error_text or "failed (no message)")


def mark_cancelled(db: Database, job_id: int, note: str = "") -> bool:
    """Mark a queued or running job cancelled (the worker stopped it on request); False if it had finished."""
    values: dict[str, Any] = {"error": note} if note else {}
    return _finish(db, job_id, JobStatus.CANCELLED, only_live=True, **values)


def is_stale(row: TrainingJob, settings: Settings, now: datetime | None = None) -> bool:
    """A running job whose worker has been silent longer than `heartbeat_timeout_s` (killed, out of memory...)."""
    if row.status != JobStatus.RUNNING.value:
        return False
    last = row.heartbeat_at or row.started_at or row.created_at
    return last < (now or utcnow()) - timedelta(seconds=settings.heartbeat_timeout_s)


def _gone_here(session: Session, worker_ids: Any) -> dict[str, Worker]:
    """The workers among `worker_ids` that ran on this machine and whose process no longer runs
    (core.jobs.processes)."""
    ids = sorted({w for w in worker_ids if w})
    if not ids:
        return {}
    rows = session.scalars(select(Worker).where(Worker.id.in_(ids), Worker.process != "")).all()
    return {row.id: row for row in rows if process_gone(row.process)}


def fail_stale_jobs(db: Database) -> list[int]:
    """Fail running jobs whose worker is gone; returns their ids.

    A worker is gone when it has been silent longer than `heartbeat_timeout_s` (on any machine), or at once when it
    ran on this machine and its process no longer runs (`kill -9`, out-of-memory killer: core.jobs.processes). Called by
    every worker at start (and while idle), by the UI on start, and whenever the UI, `enqueue_training` or
    `cancel_job` meets a stale running job, so a dead worker's job never blocks the Retrain button. Queued jobs are
    never touched: they simply wait for a worker. Workers that went silent or whose process is gone are marked stopped
    so they no longer count as alive, and the checkpoint staging folders of jobs that no longer run are removed.
    """
    now = utcnow()
    cutoff = now - timedelta(seconds=db.settings.heartbeat_timeout_s)
    failed: list[int] = []
    with db.write() as session:
        rows = session.scalars(
            select(TrainingJob).where(TrainingJob.status == JobStatus.RUNNING.value).order_by(TrainingJob.id)
        ).all()
        live = session.scalars(select(Worker.id).where(Worker.stopped_at.is_(None))).all()
        gone = _gone_here(session, [*live, *(row.worker_id for row in rows)])
        for row in rows:
            last = row.heartbeat_at or row.started_at or row.created_at
            dead = gone.get(row.worker_id or "")
            if dead is not None:
                error = (
                    f"the worker {row.worker_id} stopped: its process ({dead.pid} on {dead.host}) no longer runs "
                    "(killed? out of memory?). The previous model keeps serving; retrain when ready."
                )
            elif is_stale(row, db.settings, now):
                error = (
                    f"the worker {row.worker_id or '(unknown)'} stopped responding (killed? out of memory?): last "
                    f"heartbeat at {last:%Y-%m-%d %H:%M:%S} UTC, more than {db.settings.heartbeat_timeout_s:g} s "
                    "before this check. The previous model keeps serving; retrain when ready."
                )
            else:
                continue
            row.status = JobStatus.FAILED.value
            row.active_slot = None
            row.finished_at = now
            row.error = error
            failed.append(row.id)
        session.execute(
            update(Worker)
            .where(Worker.stopped_at.is_(None), (Worker.heartbeat_at < cutoff) | Worker.id.in_(sorted(gone)))
            .values(stopped_at=now)
            .execution_options(synchronize_session=False)
        )
    for job_id in failed:
        log.warning("training job %s failed: its worker stopped", job_id)
    remove_dead_staging(db)
    return failed


def current_job(db: Database) -> JobView | None:
    """The queued or running job, if any; a running job whose worker is gone (silent too long, or its process on this
    machine no longer runs) is failed first (and not returned)."""
    for attempt in range(2):
        with db.read() as session:
            row = _live_job_in(session)
            if row is None:
                return None
            if attempt == 1 or not (is_stale(row, db.settings) or _gone_here(session, [row.worker_id])):
                return job_view(row)
        fail_stale_jobs(db)
    return None


def get_job(db: Database, job_id: int) -> JobView:
    """One job; raises NotFound for an unknown id."""
    with db.read() as session:
        row = session.get(TrainingJob, int(job_id))
        if row is None:
            raise NotFound(f"no training job {job_id}")
        return job_view(row)


def list_jobs(db: Database, limit: int = 20) -> list[JobView]:
    """The newest jobs first."""
    with db.read() as session:
        rows = session.scalars(select(TrainingJob).order_by(TrainingJob.id.desc()).limit(int(limit))).all()
        now = utcnow()
        return [job_view(r, now) for r in rows]


# --- worker liveness ----------------------------------------------------------------------------------------


def new_worker_id(tag: str | None = None) -> str:
    """`host:pid:random` (or `host:tag:random`): unique across machines sharing the database."""
    return f"{socket.gethostname()}:{tag or os.getpid()}:{secrets.token_hex(3)}"


def register_worker(db: Database, worker_id: str, *, device: str = "") -> None:
    """Announce a live worker (or take over the row `ensure_worker` reserved for it)."""
    now = utcnow()
    with db.write() as session:
        row = session.get(Worker, worker_id)
        if row is None:
            row = Worker(id=worker_id, host=socket.gethostname(), pid=os.getpid(), started_at=now)
            session.add(row)
        row.host = socket.gethostname()
        row.pid = os.getpid()
        row.process = process_tag()
        row.device = device
        row.heartbeat_at = now
        row.stopped_at = None


def heartbeat_worker(db: Database, worker_id: str) -> None:
    """Refresh a worker's heartbeat (a stopped worker stays stopped: only `register_worker` revives a row, so a
    beat racing the worker's goodbye cannot make an exiting worker look alive)."""
    with db.write() as session:
        session.execute(
            update(Worker)
            .where(Worker.id == worker_id, Worker.stopped_at.is_(None))
            .values(heartbeat_at=utcnow())
            .execution_options(synchronize_session=False)
        )


def unregister_worker(db: Database, worker_id: str) -> None:
    """Mark a worker stopped (kept for the record; old stopped rows are pruned)."""
    now = utcnow()
    with db.write() as session:
        session.execute(
            update(Worker)
            .where(Worker.id == worker_id)
            .values(stopped_at=now)
            .execution_options(synchronize_session=False)
        )
        # Keep the table small: forget workers stopped more than a day ago.
        session.execute(delete(Worker).where(Worker.stopped_at < now - timedelta(days=1)))


def _alive_clause(settings: Settings) -> Any:
    cutoff = utcnow() - timedelta(seconds=settings.heartbeat_timeout_s)
    return (Worker.stopped_at.is_(None)) & (Worker.heartbeat_at >= cutoff)


def worker_alive(db: Database) -> bool:
    """True when some worker (on any machine) has a fresh heartbeat and has not stopped."""
    with db.read() as session:
        return session.scalars(select(Worker.id).where(_alive_clause(db.settings)).limit(1)).first() is not None


def live_workers(db: Database) -> list[dict[str, Any]]:
    """The live workers: id, host, pid, device, started_at, heartbeat_at."""
    with db.read() as session:
        rows = session.scalars(select(Worker).where(_alive_clause(db.settings)).order_by(Worker.started_at)).all()
        return [
            {
                "id": r.id,
                "host": r.host,
                "pid": r.pid,
                "device": r.device,
                "started_at": r.started_at,
                "heartbeat_at": r.heartbeat_at,
            }
            for r in rows
        ]


def worker_environment(settings: Settings) -> dict[str, str]:
    """The environment of a worker spawned here: this process's, plus the settings it runs with (so the worker uses
    the same ones), plus the thread count and OpenMP wait policy of a worker sharing its machine with the app server
    (`core.jobs.threads`; values already in the environment are kept)."""
    env = dict(os.environ)
    env.update(worker_thread_env(shares_machine=True, environ=env))
    for name in settings.model_fields_set:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, tuple | list | dict):
            text = json.dumps(list(value) if isinstance(value, tuple) else value)
        else:
            text = str(value)
        env[f"PRODCAT_{name.upper()}"] = text
    env["PRODCAT_DATA_DIR"] = str(settings.data_dir)  # always absolute: the worker's cwd is the repository root
    if settings.database_url:
        env["PRODCAT_DATABASE_URL"] = settings.database_url
    return env


def ensure_worker(db: Database, *, exit_when_idle: float | None = None) -> bool:
    """Start a detached `python -m core.jobs.worker` here when no worker is alive; True if one was started.

    The check and a placeholder row for the new worker are written in one write transaction, so two UIs pressing at
    once start one worker (the second sees the placeholder's fresh heartbeat). The worker takes the row over when it
    registers; if it dies before that, the placeholder goes stale after `heartbeat_timeout_s` and a later call
    starts another. Two workers would be harmless anyway: claiming is atomic. `exit_when_idle` defaults to
    `settings.worker_idle_exit_s` (PRODCAT_WORKER_IDLE_EXIT_S).
    """
    settings = db.settings
    if exit_when_idle is None:
        exit_when_idle = settings.worker_idle_exit_s
    worker_id = new_worker_id("spawned")
    now = utcnow()
    with db.write() as session:
        if session.scalars(select(Worker.id).where(_alive_clause(settings)).limit(1)).first() is not None:
            return False
        session.add(Worker(id=worker_id, host=socket.gethostname(), pid=0, started_at=now, heartbeat_at=now))
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.logs_dir / "worker.log"
    command = [
        sys.executable,
        "-m",
        "core.jobs.worker",
        "--exit-when-idle",
        f"{exit_when_idle:g}",
        "--worker-id",
        worker_id,
    ]
    try:
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=worker_environment(settings),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,  # detached: survives the UI's restart and its Ctrl-C
                close_fds=True,
            )
    except OSError:
        with db.write() as session:
            session.execute(delete(Worker).where(Worker.id == worker_id))
        raise
    _spawned[:] = [p for p in _spawned if p.poll() is None]
    _spawned.append(process)
    log.info("started worker %s (pid %s), log in %s", worker_id, process.pid, log_path)
    return True
