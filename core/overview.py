"""The home overview and sidebar: catalogue counts, the active model, the current training job (cheap queries)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from core.db import Database
from core.jobs import fail_stale_jobs, is_stale
from core.schema import Category, Image, JobStatus, Label, ModelVersion, TrainingJob, VersionStatus

LIVE_JOB_STATES: tuple[str, ...] = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


@dataclass(frozen=True)
class JobSummary:
    """The live training job, or else the most recent one."""

    id: int
    status: str
    mode: str
    requested_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str
    progress: dict[str, Any] = field(default_factory=dict)
    model_version_id: int | None = None

    @property
    def live(self) -> bool:
        """Queued or running."""
        return self.status in LIVE_JOB_STATES


@dataclass(frozen=True)
class Overview:
    """Counts and state for the home page and the sidebar of every page."""

    images: int
    labelled: int
    categories: int  # live (not archived)
    active_version_id: int | None = None
    active_version_label: str | None = None
    test_accuracy: float | None = None
    pretrained_source: str | None = None
    job: JobSummary | None = None

    @property
    def unlabelled(self) -> int:
        return self.images - self.labelled

    @property
    def has_model(self) -> bool:
        return self.active_version_id is not None

    @property
    def pretrained_notice(self) -> str | None:
        """A warning to show when the active model was trained from random weights (no pretrained backbone)."""
        if self.active_version_id is None or self.pretrained_source not in ("none", ""):
            return None
        return (
            f"Model v{self.active_version_id} was trained without pretrained weights (random initialisation): "
            "expect low accuracy. Set PRODCAT_PRETRAINED_FILE to a local weights file, or allow the hub, and retrain."
        )


def _job(row: TrainingJob) -> JobSummary:
    return JobSummary(
        id=row.id,
        status=row.status,
        mode=row.mode,
        requested_by=row.requested_by,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        error=row.error,
        progress=dict(row.progress or {}),
        model_version_id=row.model_version_id,
    )


def home_overview(db: Database, *, _stale_checked: bool = False) -> Overview:
    """Counts, the active version and the current (else last) training job: five indexed queries, no rows scanned
    beyond counting."""
    with db.read() as session:
        images = int(session.scalar(select(func.count()).select_from(Image)) or 0)
        labelled = int(session.scalar(select(func.count()).select_from(Label)) or 0)
        categories = int(
            session.scalar(select(func.count()).select_from(Category).where(Category.archived_at.is_(None))) or 0
        )
        version = session.execute(
            select(
                ModelVersion.id,
                ModelVersion.arch,
                ModelVersion.image_size,
                ModelVersion.mode,
                ModelVersion.test_accuracy,
                ModelVersion.pretrained_source,
            )
            .where(ModelVersion.status == VersionStatus.ACTIVE)
            .order_by(ModelVersion.id.desc())
            .limit(1)
        ).first()
        job = session.scalar(
            select(TrainingJob).where(TrainingJob.status.in_(LIVE_JOB_STATES)).order_by(TrainingJob.id.desc()).limit(1)
        ) or session.scalar(select(TrainingJob).order_by(TrainingJob.id.desc()).limit(1))
        job_summary = _job(job) if job is not None else None
        stale = job is not None and not _stale_checked and is_stale(job, db.settings)
    if stale:  # its worker died while this app was up: fail it now, so no page shows it running
        fail_stale_jobs(db)
        return home_overview(db, _stale_checked=True)
    if version is None:
        return Overview(images=images, labelled=labelled, categories=categories, job=job_summary)
    vid, arch, size, mode, accuracy, pretrained = version
    return Overview(
        images=images,
        labelled=labelled,
        categories=categories,
        active_version_id=int(vid),
        active_version_label=f"v{vid} ({arch}, {size} px, {mode})",
        test_accuracy=accuracy,
        pretrained_source=pretrained,
        job=job_summary,
    )
