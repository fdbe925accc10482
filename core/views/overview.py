"""The home overview and sidebar: catalogue counts, the active model, the current training job (cheap queries), and
how a job's progress, curves and error read on a page."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from sqlalchemy import func, select

from core.db import Database
from core.jobs.queue import LIVE_STATES, JobView, fail_stale_jobs, is_stale, job_view
from core.ml.backbone import started_from_random
from core.ml.versions import AccuracyFigure
from core.schema import Category, Image, Label, ModelVersion, TrainingJob, VersionStatus

# How often the sidebar re-reads the job while one is queued or running (it does not poll otherwise).
SIDEBAR_REFRESH_S = 3.0


@dataclass(frozen=True)
class Overview:
    """Counts and state for the home page and the sidebar of every page."""

    images: int
    labelled: int
    categories: int  # live (not archived)
    active_version_id: int | None = None
    active_version_label: str | None = None
    test_accuracy: float | None = None  # the active version's, at training (`accuracy` says on how many images)
    pretrained_source: str | None = None
    job: JobView | None = None
    test_images: int = 0

    @property
    def accuracy(self) -> AccuracyFigure | None:
        """The active version's one accuracy figure (as `VersionView.accuracy`); None without a model."""
        return None if self.active_version_id is None else AccuracyFigure(self.test_accuracy, self.test_images)

    @property
    def accuracy_label(self) -> str | None:
        """`test accuracy 81.2% on 200 test images (at training)`, for the sidebar and the home page."""
        return None if self.accuracy is None else self.accuracy.describe()

    @property
    def unlabelled(self) -> int:
        return self.images - self.labelled

    @property
    def has_model(self) -> bool:
        return self.active_version_id is not None

    @property
    def refresh_every_s(self) -> float | None:
        """How often a page should re-read this overview: every few seconds while a job is live, else never."""
        return SIDEBAR_REFRESH_S if self.job is not None and self.job.live else None

    @property
    def pretrained_notice(self) -> str | None:
        """A warning to show when the active model was trained from random weights (no pretrained backbone).

        Versions record where their weights started (`bundled:efficientnet_lite0`, `hub:resnet18`,
        `file:w.safetensors`, or `none`); only a random start warrants it.
        """
        if self.active_version_id is None or not started_from_random(self.pretrained_source):
            return None
        return (
            f"Model v{self.active_version_id} was trained without pretrained weights (random initialisation): "
            "expect low accuracy. Choose a pretrained weights file on the Categories & data page (or set "
            "PRODCAT_PRETRAINED=auto, or PRODCAT_PRETRAINED_FILE), and retrain: the next retrain starts a new lineage "
            "from those weights."
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
        version: tuple[int, str, int, str, float | None, str, int | None] | None = session.execute(
            select(
                ModelVersion.id,
                ModelVersion.arch,
                ModelVersion.image_size,
                ModelVersion.mode,
                ModelVersion.test_accuracy,
                ModelVersion.pretrained_source,
                ModelVersion.metrics[("test", "n_images")].as_integer(),
            )
            .where(ModelVersion.status == VersionStatus.ACTIVE)
            .order_by(ModelVersion.id.desc())
            .limit(1)
        ).first()
        job = session.scalar(
            select(TrainingJob).where(TrainingJob.status.in_(LIVE_STATES)).order_by(TrainingJob.id.desc()).limit(1)
        ) or session.scalar(select(TrainingJob).order_by(TrainingJob.id.desc()).limit(1))
        job_summary = job_view(job) if job is not None else None
        stale = job is not None and not _stale_checked and is_stale(job, db.settings)
    if stale:  # its worker died while this app was up: fail it now, so no page shows it running
        fail_stale_jobs(db)
        return home_overview(db, _stale_checked=True)
    if version is None:
        return Overview(images=images, labelled=labelled, categories=categories, job=job_summary)
    vid, arch, size, mode, accuracy, pretrained, test_images = version
    return Overview(
        images=images,
        labelled=labelled,
        categories=categories,
        active_version_id=int(vid),
        active_version_label=f"v{vid} ({arch}, {size} px, {mode})",
        test_accuracy=accuracy,
        pretrained_source=pretrained,
        job=job_summary,
        test_images=int(test_images or 0),
    )


# --- how a job reads on a page ------------------------------------------------------------------------------------


def error_headline(error: str | None) -> str:
    """The first non-empty line of a job's error (the message; a traceback may follow it)."""
    return next((line.strip() for line in (error or "").splitlines() if line.strip()), "")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class JobProgress:
    """A progress bar for a job: `fraction` in [0, 1] (None when nothing countable is known yet) and its text."""

    fraction: float | None
    text: str


def job_progress(progress: Mapping[str, Any]) -> JobProgress:
    """Read a job's latest progress report (a stored `core.jobs.queue.ProgressReport`) as a bar.

    `step`/`steps` is the finest count there is (images cached or embedded, batches over the whole run), so it sets
    the bar when known; quick mode reports only steps. Otherwise epochs do, counting only finished ones: epoch 2 of
    6 under way fills 1/6.
    """
    phase = str(progress.get("phase") or "")
    epoch, epochs = _number(progress.get("epoch")), _number(progress.get("epochs"))
    step, steps = _number(progress.get("step")), _number(progress.get("steps"))
    text, fraction = phase, None
    if epoch and epochs:
        text += f", epoch {epoch:.0f}/{epochs:.0f}"
        finished = epoch if progress.get("stage") == "done" else epoch - 1
        fraction = finished / epochs
    if step is not None and steps:
        if steps > 1:  # "1/1" says nothing
            text += f", step {step:.0f}/{steps:.0f}" if epoch else f" {step:.0f}/{steps:.0f}"
        fraction = step / steps
    if fraction is not None:
        fraction = min(max(fraction, 0.0), 1.0)
    return JobProgress(fraction, text.strip(", "))


CURVES = {"loss": ("loss",), "accuracy": ("train_acc", "val_acc")}


def training_curves(history: Sequence[Mapping[str, Any]]) -> dict[str, pd.DataFrame]:
    """Per-epoch curves worth drawing: {"loss": frame of loss, "accuracy": frame of train_acc/val_acc}, by epoch.

    A series with no value at all is left out, and a chart with no series too (quick mode has no loss curve), so
    a page never draws an empty chart.
    """
    points = [p for p in history if _number(p.get("epoch"))]
    frame = pd.DataFrame(
        {key: [_number(p.get(key)) for p in points] for keys in CURVES.values() for key in keys},
        index=pd.Index([int(p["epoch"]) for p in points], name="epoch"),
        dtype="float64",
    )
    curves: dict[str, pd.DataFrame] = {}
    for chart, keys in CURVES.items():
        kept = [key for key in keys if frame[key].notna().any()]
        if kept:
            curves[chart] = frame[kept]
    return curves
