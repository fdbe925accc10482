"""The home overview: counts, the active model (with the no-pretrained-weights notice), the current job."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import null

from core.db import Database
from core.overview import home_overview
from core.schema import JobStatus, ModelVersion, TrainingJob, utcnow
from tests.core.factories import BASE_TIME, populate


def test_empty_database(db: Database) -> None:
    overview = home_overview(db)
    assert (overview.images, overview.labelled, overview.unlabelled, overview.categories) == (0, 0, 0, 0)
    assert not overview.has_model and overview.pretrained_notice is None and overview.job is None


def test_counts_model_and_notice(db: Database) -> None:
    info = populate(db, n_images=500, labelled_fraction=0.5, seed=2)
    overview = home_overview(db)
    assert overview.images == 500 and overview.labelled == int((info.labels >= 0).sum())
    assert overview.unlabelled == 500 - overview.labelled and overview.categories == 5
    assert overview.active_version_id == info.version_id
    assert overview.test_accuracy is not None and 0 < overview.test_accuracy < 1
    assert overview.pretrained_notice is not None and "without pretrained weights" in overview.pretrained_notice
    with db.write() as session:
        version = session.get(ModelVersion, info.version_id)
        assert version is not None
        version.pretrained_source = "hub"
    assert home_overview(db).pretrained_notice is None


def _job(status: str, minutes: int, *, live: bool) -> dict[str, object]:
    return dict(
        mode="quick",
        status=status,
        # A finished job holds no live slot; null() because a plain None would get the column default (1).
        active_slot=1 if live else null(),
        requested_by="alice",
        created_at=BASE_TIME + timedelta(minutes=minutes),
        progress={"epoch": 1, "epochs": 3} if live else {},
        heartbeat_at=utcnow() if live else None,  # its worker is alive (a silent one would get the job failed)
        error="out of memory" if status == JobStatus.FAILED else "",
    )


@pytest.mark.parametrize("with_live", [True, False])
def test_live_job_wins_else_the_latest(db: Database, with_live: bool) -> None:
    with db.write() as session:
        jobs = [_job(JobStatus.SUCCEEDED, 2, live=False), _job(JobStatus.FAILED, 3, live=False)]
        if with_live:
            jobs.insert(0, _job(JobStatus.RUNNING, 1, live=True))
        session.add_all(TrainingJob(**job) for job in jobs)
    job = home_overview(db).job
    assert job is not None
    if with_live:
        assert job.status == JobStatus.RUNNING and job.live and job.progress["epochs"] == 3
    else:
        assert job.status == JobStatus.FAILED and not job.live and job.error == "out of memory"
