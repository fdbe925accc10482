"""A training job's staging folder (`checkpoints/.job<id>`), where its checkpoint is written before it is registered,
and the removal of the folders of jobs that no longer run (a worker killed mid-write leaves one, with a temp file).

The registered checkpoint gets its final name (`v<id>.safetensors`) by a rename in the registering transaction, so
nothing in a staging folder is ever loaded; removing a dead job's folder only gives its disk space back.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import select

from core.db import Database, in_chunks
from core.schema import JobStatus, TrainingJob
from core.settings import Settings

log = logging.getLogger(__name__)

PREFIX = ".job"


def staging_dir(settings: Settings, job_id: int) -> Path:
    """Job `job_id`'s staging folder."""
    return settings.checkpoints_dir / f"{PREFIX}{int(job_id)}"


@contextmanager
def staged_checkpoint(settings: Settings, job_id: int) -> Iterator[Path]:
    """A fresh, empty staging folder for the job, removed afterwards whatever happens (a kill -9 aside: then
    `remove_dead_staging` removes it once the job is no longer running)."""
    staging = staging_dir(settings, job_id)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _staged_jobs(checkpoints: Path) -> dict[int, Path]:
    try:
        entries = list(checkpoints.iterdir())
    except OSError:  # no checkpoints yet (or unreadable: nothing to clean from here)
        return {}
    found = {}
    for path in entries:
        number = path.name.removeprefix(PREFIX)
        if path.name.startswith(PREFIX) and number.isdigit() and path.is_dir():
            found[int(number)] = path
    return found


def remove_dead_staging(db: Database) -> list[int]:
    """Remove the staging folders of jobs that are not running (finished, failed as stale, or unknown here); returns
    their job ids. A running job's folder is left alone: its worker may be writing it right now, on any machine
    sharing the data directory."""
    staged = _staged_jobs(db.settings.checkpoints_dir)
    if not staged:
        return []
    running: set[int] = set()
    with db.read() as session:
        for chunk in in_chunks(sorted(staged)):
            running.update(
                session.scalars(
                    select(TrainingJob.id).where(
                        TrainingJob.id.in_(chunk), TrainingJob.status == JobStatus.RUNNING.value
                    )
                )
            )
    removed = []
    for job_id, path in sorted(staged.items()):
        if job_id in running:
            continue
        try:
            shutil.rmtree(path)
        except OSError as exc:
            log.warning("could not remove the staging folder of training job %s: %s", job_id, exc)
            continue
        removed.append(job_id)
    if removed:
        log.info("removed the checkpoint staging folders of training jobs that no longer run: %s", removed)
    return removed
