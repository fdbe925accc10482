"""The home overview: counts, the active model (with the no-pretrained-weights notice), the current job."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import null

from core.db import Database
from core.schema import JobStatus, ModelVersion, TrainingJob, utcnow
from core.views.overview import SIDEBAR_REFRESH_S, error_headline, home_overview, job_progress, training_curves
from tests.core.factories import BASE_TIME, populate

pytestmark = pytest.mark.both_databases


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


def test_the_sidebar_polls_only_while_a_job_is_live(db: Database) -> None:
    assert home_overview(db).refresh_every_s is None  # no job at all
    with db.write() as session:
        session.add(TrainingJob(**_job(JobStatus.RUNNING, 1, live=True)))
    assert home_overview(db).refresh_every_s == SIDEBAR_REFRESH_S
    with db.write() as session:
        job = session.query(TrainingJob).one()
        job.status, job.active_slot = JobStatus.SUCCEEDED.value, None
    assert home_overview(db).refresh_every_s is None


@pytest.mark.parametrize(
    ("progress", "fraction", "text"),
    [
        # Quick mode reports steps only (images cached, then embedded): the bar moves with them.
        ({"phase": "caching", "step": 120, "steps": 300}, 0.4, "caching 120/300"),
        ({"phase": "features (train)", "stage": "features", "step": 0, "steps": 240}, 0.0, "features (train) 0/240"),
        # Epochs alone: only finished epochs count (epoch 2 of 4 under way fills a quarter).
        ({"phase": "train", "epoch": 2, "epochs": 4}, 0.25, "train, epoch 2/4"),
        ({"phase": "done", "stage": "done", "epoch": 4, "epochs": 4}, 1.0, "done, epoch 4/4"),
        # Full mode: global steps over the whole run are finer than epochs.
        ({"phase": "training (train)", "epoch": 2, "epochs": 6, "step": 150, "steps": 600}, 0.25,
         "training (train), epoch 2/6, step 150/600"),
        ({"phase": "preparing"}, None, "preparing"),
        ({}, None, ""),
    ],
)  # fmt: skip
def test_job_progress_bar(progress: dict, fraction: float | None, text: str) -> None:
    bar = job_progress(progress)
    assert bar.fraction == (None if fraction is None else pytest.approx(fraction))
    assert bar.text == text


def test_training_curves_leave_out_what_has_no_values() -> None:
    # Quick mode: one point with accuracies and no loss: no (empty) loss chart.
    curves = training_curves([{"epoch": 1, "loss": None, "train_acc": 0.9, "val_acc": 0.8}])
    assert list(curves) == ["accuracy"]
    assert curves["accuracy"].to_dict() == {"train_acc": {1: 0.9}, "val_acc": {1: 0.8}}
    full = training_curves([{"epoch": 1, "loss": 0.9, "val_acc": None}, {"epoch": 2, "loss": 0.5, "val_acc": 0.7}])
    assert full["loss"]["loss"].tolist() == [0.9, 0.5] and full["accuracy"].columns.tolist() == ["val_acc"]
    assert training_curves([]) == {}


def test_error_headline_is_the_message_without_the_traceback() -> None:
    error = 'ValueError: matmul: size 4 is different from 3\n\nTraceback (most recent call last):\n  File "x"'
    assert error_headline(error) == "ValueError: matmul: size 4 is different from 3"
    assert error_headline("\n  out of memory  \n") == "out of memory"
    assert error_headline("") == ""


def test_b8_the_sidebar_and_every_version_list_read_one_accuracy_with_its_test_set_named(db: Database) -> None:
    from core.ml.versions import AccuracyBasis, AccuracyFigure, active_version, get_version, list_versions

    info = populate(db, n_images=300, labelled_fraction=0.6, seed=4)
    assert info.version_id is not None
    with db.write() as session:  # stored at training: 52.5% on 40 test images
        version = session.get(ModelVersion, info.version_id)
        assert version is not None
        version.test_accuracy = 0.525
        version.metrics = {**version.metrics, "test": {**version.metrics["test"], "accuracy": 0.525, "n_images": 40}}
    overview = home_overview(db)
    expected = "test accuracy 52.5% on 40 test images (at training)"
    assert overview.accuracy_label == expected
    assert get_version(db, info.version_id).accuracy.describe() == expected
    active = active_version(db)
    assert active is not None and active.accuracy == overview.accuracy  # one figure, whoever reads it
    assert [v.accuracy.describe() for v in list_versions(db)] == [expected]
    # Other measurements say what they are.
    today = AccuracyFigure(0.541, 38, AccuracyBasis.TODAYS_LABELS)
    assert today.describe() == "test accuracy 54.1% on 38 test images (today's labels)"
    again = AccuracyFigure(0.532, 41, AccuracyBasis.SAME_IMAGES, of_version=2)
    assert again.describe() == "test accuracy 53.2% on v2's 41 test images"
    assert AccuracyFigure(None, 0).describe() == "no test accuracy: no labelled test images (at training)"


def test_the_overview_job_is_the_one_job_summary_type(db: Database) -> None:
    from core.jobs.queue import JobView, get_job

    with db.write() as session:
        session.add(TrainingJob(**_job(JobStatus.RUNNING, 1, live=True), params={"epochs": 2}, worker_id="w1"))
    job = home_overview(db).job
    assert isinstance(job, JobView) and job.describe() == "#1, running, requested by alice"
    stored = get_job(db, job.id)
    assert (job.params, job.worker_id, job.heartbeat_at, job.report) == (
        stored.params,
        stored.worker_id,
        stored.heartbeat_at,
        stored.report,
    )
