"""Training orchestration: what a retrain would use (the plan), and one training job from labels to active model.

`run_training` is what the worker calls for a claimed job: it gathers the labelled images of live categories
per fixed split, caches their pixels (and, in quick mode, backbone features), trains, calibrates on the
validation split, measures on the test split, writes the checkpoint (temporary name, then moved), registers
the model version and promotes it according to `settings.promote_policy`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from sqlalchemy import func, select

from core.catalog.corrections import correction_clause
from core.catalog.merges import Merges
from core.db import Database
from core.errors import CheckpointError, DeviceUnavailable, JobCancelled, NotFound, TrainingRefused
from core.ml.backbone import Lineage, plan_lineage
from core.ml.contract import JobParams, ProgressReport
from core.ml.features import FeatureCache, backbone_id, split_features
from core.ml.label_checks import LabelCheck, LabelledSet, check_labels, store_label_checks
from core.ml.pixel_cache import CachedRows, PixelCache
from core.ml.staging import staged_checkpoint
from core.ml.versions import (
    active_version,
    checkpoint_path,
    evaluate_version,
    get_version,
    hash_test_set,
    labelled_images,
    metrics_for,
    promote_version,
)
from core.schema import Category, Image, Label, LabelEvent, ModelVersion, Split, TrainingJob, VersionStatus
from core.settings import Settings
from models.modes import TrainMode
from models.stages import block_dims

if TYPE_CHECKING:
    from models.training import TrainConfig, TrainData

ProgressFn = Callable[[ProgressReport], None]
StopFn = Callable[[], bool]

MIN_TRAIN_PER_CATEGORY = 2
MIN_VAL_PER_CATEGORY = 1
MIN_CATEGORIES = 2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CategoryPlan:
    """Labelled images of one live category per split."""

    id: int
    name: str
    train: int
    val: int
    test: int

    @property
    def total(self) -> int:
        return self.train + self.val + self.test


@dataclass(frozen=True)
class LeftOut:
    """A category with labels that a retrain leaves out for now, and what it still needs to become a class."""

    category: CategoryPlan
    train_needed: int
    val_needed: int

    @property
    def need(self) -> str:
        """What to label, e.g. "label 1 more train image and 1 more validation image"."""
        parts = [
            f"{n} more {split} image{'' if n == 1 else 's'}"
            for n, split in ((self.train_needed, "train"), (self.val_needed, "validation"))
            if n > 0
        ]
        return "label " + " and ".join(parts)

    @property
    def note(self) -> str:
        """The plan's note, e.g. "'Scarves' left out: label 1 more train image"."""
        return f"{self.category.name!r} left out: {self.need}"


def _left_out(category: CategoryPlan) -> LeftOut | None:
    """None when the category has enough labelled train and validation images to be a class."""
    train_needed = max(0, MIN_TRAIN_PER_CATEGORY - category.train)
    val_needed = max(0, MIN_VAL_PER_CATEGORY - category.val)
    if category.total == 0 or (train_needed == 0 and val_needed == 0):
        return None
    return LeftOut(category, train_needed, val_needed)


@dataclass
class TrainingPlan:
    """What a retrain would use now (`trainable`), which labelled categories it leaves out and why (`left_out`,
    also worded in `notes`), and why it would be refused (`problems`, empty when it can run)."""

    categories: list[CategoryPlan]
    corrections_since_active: int  # as defined in core.catalog.corrections (bookkeeping and undone changes excluded)
    suggested_mode: TrainMode
    mode: str  # a TrainMode, or the unknown text asked for (then `problems` says so)
    active_version_id: int | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def labelled(self) -> int:
        """Labelled images in live categories (left-out ones included)."""
        return sum(c.total for c in self.categories)

    @property
    def left_out(self) -> list[LeftOut]:
        """Categories with labels but below MIN_TRAIN_PER_CATEGORY train or MIN_VAL_PER_CATEGORY validation images."""
        return [gap for c in self.categories if (gap := _left_out(c)) is not None]

    @property
    def trainable(self) -> list[CategoryPlan]:
        """Categories that become classes: live ones with enough labelled train and validation images."""
        return [c for c in self.categories if c.total > 0 and _left_out(c) is None]


def suggested_mode(settings: Settings) -> TrainMode:
    """Full fine-tuning where a GPU makes it minutes; head-only (quick) elsewhere.

    The first call imports torch to look for a GPU (seconds); the answer is kept per device setting.
    """
    return _mode_for_device(str(settings.device))


@functools.cache
def _mode_for_device(device: str) -> TrainMode:
    from models.devices import pick_device

    try:
        return TrainMode.FULL if pick_device(device).type == "cuda" else TrainMode.QUICK
    except Exception:
        return TrainMode.QUICK


def training_plan(db: Database, *, mode: TrainMode | str | None = None) -> TrainingPlan:
    """Labelled images per live category and split, corrections since the active version, and any problems."""
    with db.read() as session:
        live = list(session.execute(select(Category.id, Category.name).where(Category.archived_at.is_(None))))
        counts: dict[tuple[int, str], int] = {
            (int(cat), str(split)): int(n)
            for cat, split, n in session.execute(
                select(Label.category_id, Image.split, func.count())
                .join(Image, Image.id == Label.image_id)
                .group_by(Label.category_id, Image.split)
            )
        }
        active = session.scalar(select(ModelVersion).where(ModelVersion.status == VersionStatus.ACTIVE))
        events = select(func.count()).select_from(LabelEvent).where(correction_clause())
        if active is not None:
            events = events.where(LabelEvent.created_at > active.created_at)
        corrections = int(session.scalar(events) or 0)
        active_id = active.id if active is not None else None

    categories = sorted(
        (
            CategoryPlan(
                id=int(cid),
                name=str(name),
                train=counts.get((cid, Split.TRAIN.value), 0),
                val=counts.get((cid, Split.VAL.value), 0),
                test=counts.get((cid, Split.TEST.value), 0),
            )
            for cid, name in live
        ),
        key=lambda c: c.id,
    )
    suggested = suggested_mode(db.settings)
    plan = TrainingPlan(
        categories=categories,
        corrections_since_active=corrections,
        suggested_mode=suggested,
        mode=mode or suggested,
        active_version_id=active_id,
    )
    try:
        plan.mode = TrainMode(plan.mode)
    except ValueError:
        choices = " or ".join(f"'{m}'" for m in TrainMode)
        plan.problems.append(f"unknown training mode {plan.mode!r}: choose {choices}")
    plan.notes.extend(gap.note for gap in plan.left_out)
    if len(plan.trainable) < MIN_CATEGORIES:
        plan.problems.append(_too_few_classes(plan))
    for cat in plan.trainable:
        if cat.test == 0:
            plan.notes.append(f"the test split has no labelled image of {cat.name!r}: its accuracy cannot be measured")
    for cat in categories:
        if cat.total == 0:
            plan.notes.append(f"{cat.name!r} has no labelled images and will not be a class of the new model")
    return plan


def _too_few_classes(plan: TrainingPlan) -> str:
    """Why fewer than MIN_CATEGORIES classes are trainable, and what to label."""
    trainable = plan.trainable
    if not plan.categories:
        return f"add at least {MIN_CATEGORIES} categories and label images in each"
    if not trainable and not plan.left_out:
        return f"label images in at least {MIN_CATEGORIES} categories: none has labelled images yet"
    have = ", ".join(repr(c.name) for c in trainable) or "none"
    need = (
        f"label images in at least {MIN_CATEGORIES} categories with {MIN_TRAIN_PER_CATEGORY} train and "
        f"{MIN_VAL_PER_CATEGORY} validation images each: trainable so far: {have}"
    )
    gaps = "; ".join(f"{g.category.name!r}: {g.need}" for g in plan.left_out)
    return f"{need}" + (f" ({gaps})" if gaps else "")


# --- helpers ------------------------------------------------------------------------------------------------


def _check_stop(should_stop: StopFn) -> None:
    if should_stop():
        raise JobCancelled("training cancelled by request")


def data_snapshot(pairs: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """Identity of the labels a model was trained on: count and hash of (image_id, category_id) pairs."""
    digest = hashlib.sha256(json.dumps(sorted(pairs)).encode()).hexdigest()
    return {"labels": len(pairs), "labels_hash": digest}


def build_train_config(settings: Settings, job: JobParams, *, arch: str | None = None) -> TrainConfig:
    """models.training.TrainConfig from settings defaults (arch, image size, device) overridden by the job's settings.

    `arch` is the lineage's architecture (`core.ml.backbone.plan_lineage`); without it, the configured one or resnet18.
    Raises TrainingRefused naming any unknown or invalid parameter.
    """
    from models.pretrained import HUB_DEFAULT_ARCH
    from models.training import TrainConfig

    values: dict[str, Any] = {
        "arch": arch or settings.default_arch or HUB_DEFAULT_ARCH,
        "image_size": settings.image_size,
        "device": settings.device,
    }
    values.update({k: v for k, v in job.overrides.items() if v is not None})
    values["mode"] = job.mode
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise TrainingRefused(f"bad training parameters: {exc}") from exc


def _softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / max(float(temperature), 1e-6)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# --- the training job ---------------------------------------------------------------------------------------


@dataclass
class _Split:
    ids: list[int]
    labels: np.ndarray  # class indices
    category_ids: list[int]


@dataclass
class _Labelled:
    """The labelled images of the trainable categories per split, as the job found them, and their identity."""

    class_ids: list[int]
    class_names: list[str]
    splits: dict[str, _Split]
    snapshot: dict[str, Any]
    notes: list[str]  # the plan's notes (say, a category without test images)


class _StartingNetwork(NamedTuple):
    """The network a job starts from: the active version's weights when compatible, else a fresh one."""

    model: Any
    pretrained_source: str
    notes: list[str]
    parent_id: int | None


@dataclass
class _Measured:
    """A trained model's calibration and its metrics on the validation and test splits."""

    temperature: float
    metrics: dict[str, Any]
    test_accuracy: float | None
    test_hash: str
    test_pairs: list[tuple[int, int]]


def run_training(db: Database, job_id: int, *, on_progress: ProgressFn, should_stop: StopFn) -> int:
    """Train, calibrate, evaluate, register and (per policy) activate a model version for a claimed job.

    Returns the new model version id. Raises TrainingRefused when the data cannot make a model (the messages say
    what to label), JobCancelled when should_stop() turns true. Nothing is registered unless everything succeeded.
    """
    from models.devices import describe_device, describe_devices, pick_device
    from models.errors import TrainingStopped
    from models.factory import preprocessing_config

    job = _job_params(db, job_id)
    active = active_version(db)
    lineage = plan_lineage(
        db.settings,
        parent=active,
        job_arch=job.overrides.get("arch"),
        image_size=job.overrides.get("image_size"),
    )
    config = build_train_config(db.settings, job, arch=lineage.arch)
    try:
        device = pick_device(config.device)
    except ValueError as exc:
        raise DeviceUnavailable(f"{exc}: set PRODCAT_DEVICE for this worker to a device it has") from None
    train_devices = _train_devices(db.settings, job.mode)
    if len(train_devices) == 1:  # one device named for full training: the job runs there
        device, config.device = train_devices[0], str(train_devices[0])
    device_text = describe_devices(train_devices) if len(train_devices) > 1 else describe_device(device)
    started = time.monotonic()
    on_progress(ProgressReport(phase="preparing", device=device_text))
    labelled = _gather_labelled(db, job.mode)
    _check_stop(should_stop)

    start = _starting_network(db, config, lineage, labelled.class_ids, active_id=active.id if active else None)
    cfg = preprocessing_config(start.model, config.image_size)
    pixels = _fill_pixel_cache(db, cfg, labelled.splits, on_progress=on_progress, device_text=device_text)
    _check_stop(should_stop)

    train = (
        _train_quick
        if job.mode == TrainMode.QUICK
        else functools.partial(_train_full, job_id=int(job_id), devices=train_devices)
    )
    run = _RunInputs(db, start.model, cfg, pixels, labelled, config, device, on_progress, should_stop)
    try:
        trained = train(run)
    except TrainingStopped as exc:
        raise JobCancelled("training cancelled by request") from exc
    _check_stop(should_stop)

    on_progress(ProgressReport(phase="evaluating", device=device_text))
    measured = _calibrate_and_measure(db, trained.logits, labelled, trained.metrics)
    measured.metrics["notes"] = start.notes + labelled.notes
    measured.metrics["seconds"] = round(time.monotonic() - started, 2)
    measured.metrics["device"] = device_text
    _check_stop(should_stop)

    on_progress(ProgressReport(phase="checking labels", device=device_text))
    check = _check_labels(db.settings, trained, labelled, config)
    measured.metrics["label_check"] = check.summary() if isinstance(check, LabelCheck) else {"note": check}
    _check_stop(should_stop)

    on_progress(ProgressReport(phase="saving", device=device_text))
    version_id = _save_and_register(db, int(job_id), config, cfg, start, labelled, measured)
    if isinstance(check, LabelCheck):
        store_label_checks(db, version_id, check)
    if _promote(
        db,
        version_id,
        job_id=int(job_id),
        test_accuracy=measured.test_accuracy,
        test_hash=measured.test_hash,
        test_pairs=measured.test_pairs,
    ):
        _refresh_predictions(db, version_id, on_progress=on_progress, device_text=device_text)
    return version_id


def _train_devices(settings: Settings, mode: TrainMode) -> list[Any]:
    """The devices a full-mode job trains on (PRODCAT_TRAIN_DEVICES; several: one process each under DDP), or none
    (quick mode, or the setting unset: the job's one device)."""
    if mode != TrainMode.FULL or not settings.train_devices:
        return []
    from models.devices import pick_train_devices

    try:
        return pick_train_devices(settings.train_devices)
    except ValueError as exc:
        raise DeviceUnavailable(f"{exc}: set PRODCAT_TRAIN_DEVICES for this worker to devices it has") from None


def _check_labels(settings: Settings, trained: _Trained, labelled: _Labelled, config: TrainConfig) -> LabelCheck | str:
    """The label check over every labelled split's features, or why there is none (disabled, too few labels)."""
    from models.errors import NotEnoughData

    if settings.label_check_folds < 2:
        return "label checks are off (PRODCAT_LABEL_CHECK_FOLDS below 2)"
    splits = [labelled.splits[s.value] for s in Split]
    checked = LabelledSet(
        image_ids=[i for d in splits for i in d.ids],
        labels=np.concatenate([d.labels for d in splits]),
        features=np.concatenate([trained.features[s.value] for s in Split]),
        class_category_ids=labelled.class_ids,
        feature_blocks=trained.feature_blocks,
    )
    if config.head_l2 is None and trained.head_l2 is not None:
        # The quick head's L2, picked on validation, serves the K-fold heads too: K fits instead of the grid's six on
        # the first fold and K - 1 more (measured: the K-fold step 1.93x faster at 10,000 labels, precision@K the same;
        # docs/benchmarks.md, "Label checks").
        config = replace(config, head_l2=trained.head_l2)
    try:
        return check_labels(checked, folds=settings.label_check_folds, seed=config.seed, config=config)
    except NotEnoughData as exc:
        return f"labels not checked: {exc}"


def _job_params(db: Database, job_id: int) -> JobParams:
    with db.read() as session:
        job = session.get(TrainingJob, int(job_id))
        if job is None:
            raise NotFound(f"no training job {job_id}")
        mode, params = str(job.mode), dict(job.params or {})
    return JobParams.parse(mode, params)


def _gather_labelled(db: Database, mode: TrainMode) -> _Labelled:
    """The labelled images of the plan's trainable categories per split; TrainingRefused when the plan has problems."""
    plan = training_plan(db, mode=mode)
    if plan.problems:
        error = TrainingRefused("training refused: " + "; ".join(plan.problems))
        error.problems = plan.problems  # type: ignore[attr-defined]  # TrainingRefused (core/errors.py) declares none
        raise error
    class_ids = [c.id for c in plan.trainable]
    index_of = {cid: i for i, cid in enumerate(class_ids)}
    splits: dict[str, _Split] = {}
    all_pairs: list[tuple[int, int]] = []
    for split in Split:
        pairs = [(i, c) for i, c in labelled_images(db, split) if c in index_of]
        all_pairs.extend(pairs)
        splits[split.value] = _Split(
            ids=[i for i, _ in pairs],
            labels=np.array([index_of[c] for _, c in pairs], dtype=np.int64),
            category_ids=[c for _, c in pairs],
        )
    snapshot = {
        **data_snapshot(all_pairs),
        **{f"{s}_images": len(d.ids) for s, d in splits.items()},
        "class_category_ids": class_ids,
    }
    return _Labelled(class_ids, [c.name for c in plan.trainable], splits, snapshot, plan.notes)


def _fill_pixel_cache(
    db: Database, cfg: Any, splits: dict[str, _Split], *, on_progress: ProgressFn, device_text: str
) -> dict[str, CachedRows]:
    """Decode every split's images once per preprocessing config (shared with prediction and evaluation) and return
    lazy views: training reads one batch of rows at a time, never a whole split into memory."""
    cache = PixelCache.for_config(db.settings, cfg)
    cache.fill(
        db,
        splits["train"].ids + splits["val"].ids + splits["test"].ids,
        progress=lambda done, total: on_progress(
            ProgressReport(phase="caching", step=done, steps=total, device=device_text)
        ),
    )
    return {s: cache.rows(db, d.ids) for s, d in splits.items()}


def _calibrate_and_measure(
    db: Database, logits: dict[str, np.ndarray], labelled: _Labelled, train_metrics: dict[str, Any]
) -> _Measured:
    """Fit the temperature on validation, then measure calibrated probabilities on validation and test."""
    from models.calibration import fit_temperature

    val, test = labelled.splits["val"], labelled.splits["test"]
    class_ids = labelled.class_ids
    temperature = float(fit_temperature(logits["val"], val.labels))
    metrics: dict[str, Any] = {"train": train_metrics}
    metrics["val"] = metrics_for(db, _softmax(logits["val"], temperature), class_ids, val.category_ids)
    test_pairs = list(zip(test.ids, test.category_ids, strict=True))
    test_accuracy: float | None = None
    if test.ids:
        metrics["test"] = metrics_for(db, _softmax(logits["test"], temperature), class_ids, test.category_ids)
        test_accuracy = float(metrics["test"]["accuracy"])
    else:
        metrics["test"] = {"n_images": 0, "note": "the test split has no labelled images: accuracy not measured"}
    metrics["temperature"] = temperature
    return _Measured(temperature, metrics, test_accuracy, hash_test_set(test_pairs), test_pairs)


def _save_and_register(
    db: Database,
    job_id: int,
    config: TrainConfig,
    cfg: Any,
    start: _StartingNetwork,
    labelled: _Labelled,
    measured: _Measured,
) -> int:
    """Write the checkpoint and register it as a candidate version; returns its id.

    The checkpoint goes to a job-specific staging folder (core.ml.staging) and gets its final name in the registering
    transaction, so a job killed at any point leaves either nothing registered or a complete version; the folder of a
    job killed mid-write is removed once the job is failed.
    """
    from models.checkpoint import CheckpointMeta, save_checkpoint
    from models.stages import stage_layout

    settings = db.settings
    model = start.model.to("cpu").eval()
    meta = CheckpointMeta.from_preprocess(
        config.arch,
        labelled.class_names,
        cfg,
        temperature=measured.temperature,
        train_config=config.to_dict(),
        seed=config.seed,
        data_snapshot=labelled.snapshot,
        pretrained_source=start.pretrained_source,
        backbone_id=backbone_id(model, cfg),
        **CheckpointMeta.layout_fields(stage_layout(model)),
    )
    with staged_checkpoint(settings, job_id) as staging:
        save_checkpoint(staging / "model.safetensors", model, meta)
        return _register(
            db,
            staging,
            job_id=job_id,
            config=config,
            class_names=labelled.class_names,
            class_ids=labelled.class_ids,
            pretrained_source=start.pretrained_source,
            temperature=measured.temperature,
            metrics=measured.metrics,
            test_accuracy=measured.test_accuracy,
            test_hash=measured.test_hash,
            parent_id=start.parent_id,
        )


def _refresh_predictions(db: Database, version_id: int, *, on_progress: ProgressFn, device_text: str) -> None:
    """Store the promoted version's predictions for every image; one unreadable original is logged, not fatal (the
    model is already promoted)."""
    from core.ml.predict import refresh_predictions

    unreadable: list[Any] = []
    refresh_predictions(
        db,
        version_id,
        progress=lambda done, total: on_progress(
            ProgressReport(phase="predicting", step=done, steps=total, device=device_text)
        ),
        unreadable=unreadable,
    )
    for refusal in unreadable[:20]:
        log.warning("no prediction of v%s for %s", version_id, refusal)


def _head_row_names(class_category_ids: Sequence[int], merges: Merges) -> list[str]:
    """Names matching the parent's head rows to today's categories (by id): a class merged since then answers to
    the category it went into, unless that category has its own row already (which keeps it)."""
    own = {int(c) for c in class_category_ids}
    names: list[str] = []
    for c in class_category_ids:
        target = merges.resolve(int(c))
        taken = target != int(c) and (target in own or str(target) in names)
        names.append(f"merged:{c}" if taken else str(target))
    return names


def _starting_network(
    db: Database, config: TrainConfig, lineage: Lineage, class_ids: list[int], *, active_id: int | None = None
) -> _StartingNetwork:
    """The active version's weights (head resized to today's classes) when the lineage continues, else fresh ones."""
    import torch

    from models.checkpoint import load_checkpoint
    from models.errors import CheckpointInvalid, WeightsInvalid, WeightsUnavailable
    from models.factory import build_network
    from models.stages import stage_layout, with_measured_layout, with_stage_features
    from models.training import resize_head

    torch.manual_seed(config.seed)  # a fresh network's (or new head rows') initial weights follow the job's seed
    notes: list[str] = []
    parent = get_version(db, lineage.continue_from) if lineage.continue_from is not None else None
    if parent is not None:
        try:
            model, _ = load_checkpoint(checkpoint_path(db, parent), device="cpu")
            if list(parent.class_category_ids) != class_ids:
                # Rows follow categories by id, so a renamed category keeps its learned row; new ones start fresh.
                old_rows = _head_row_names(parent.class_category_ids, Merges.load(db))
                resize_head(model, old_rows, [str(c) for c in class_ids], seed=config.seed)
                notes.append(f"head resized from {len(parent.class_category_ids)} to {len(class_ids)} classes")
            notes.append(f"started from v{parent.id}")
            if config.mode == TrainMode.QUICK:  # the head is fitted from zero: today's pooling costs nothing more
                model, older = with_measured_layout(model, parent.arch)
                if (now := stage_layout(model)) is not None and older is not None:
                    notes.append(f"features re-pooled as {now.describe()} (v{parent.id}: {older.describe()})")
            return _StartingNetwork(model, parent.pretrained_source, notes, parent.id)
        except (CheckpointInvalid, OSError, ValueError) as exc:
            notes.append(f"could not start from v{parent.id} ({exc}); started from a fresh network")
            lineage = plan_lineage(db.settings, parent=None, job_arch=config.arch, image_size=config.image_size)
    assert lineage.weights is not None
    try:
        model = build_network(lineage.weights, len(class_ids))
        if config.mode == TrainMode.QUICK:  # measured for quick heads only (models/stages.py)
            model = with_stage_features(model, lineage.weights.arch)
    except (WeightsInvalid, WeightsUnavailable) as exc:
        raise TrainingRefused(f"pretrained weights refused: {exc}") from exc
    notes.append(lineage.describe())
    return _StartingNetwork(model, lineage.weights.label, notes, active_id)


def _train_data(pixels: dict[str, CachedRows], labelled: _Labelled) -> TrainData:
    from models.training import TrainData

    return TrainData(
        train_pixels=pixels["train"],
        train_labels=labelled.splits["train"].labels,
        val_pixels=pixels["val"],
        val_labels=labelled.splits["val"].labels,
        class_names=labelled.class_names,
    )


@dataclass
class _Trained:
    """A trained network's logits on val and test, its backbone features of every labelled split, train metrics."""

    logits: dict[str, np.ndarray]
    features: dict[str, np.ndarray]
    metrics: dict[str, Any]
    feature_blocks: tuple[int, ...] | None = None  # a stage-pooled network's block widths (models.stages)
    head_l2: float | None = None  # the L2 strength the quick head's fit picked on validation (full mode: None)


@dataclass
class _RunInputs:
    """What the training steps of one job work on: the catalogue, the starting network and its preprocessing, the
    labelled splits and their cached pixels, the training settings, the device, and the job's progress and stop
    callbacks."""

    db: Database
    model: Any
    cfg: Any
    pixels: dict[str, CachedRows]
    labelled: _Labelled
    config: TrainConfig
    device: Any
    on_progress: ProgressFn
    should_stop: StopFn

    def train_data(self) -> TrainData:
        return _train_data(self.pixels, self.labelled)


def _labelled_features(run: _RunInputs, model: Any) -> tuple[dict[str, np.ndarray], FeatureCache]:
    """`model`'s backbone features of every labelled split, from the feature cache (computing only what is new)."""
    features_cache = FeatureCache(run.db.settings, backbone_id(model, run.cfg), int(model.num_features))
    features: dict[str, np.ndarray] = {}
    for split, data in run.labelled.splits.items():
        features[split] = split_features(
            run.db,
            model,
            run.cfg,
            run.pixels[split],
            data.ids,
            features_cache,
            run.config,
            run.device,
            on_progress=run.on_progress,
            should_stop=run.should_stop,
            phase=f"features ({split})",
        )
    _check_stop(run.should_stop)
    return features, features_cache


def _train_quick(run: _RunInputs) -> _Trained:
    """models.training.train_quick on cached backbone features."""
    from models.training import head_logits, train_quick

    features, features_cache = _labelled_features(run, run.model)
    result = train_quick(
        run.config,
        run.train_data(),
        model=run.model,
        cfg=run.cfg,
        on_progress=lambda p: run.on_progress(ProgressReport.from_library(p, "fitting head")),
        should_stop=run.should_stop,
        train_features=features["train"],
        val_features=features["val"],
    )
    # Validation's logits are the ones from before the head was refitted on train + validation (models.training
    # .train_quick): calibration and the validation metrics need a head that has not seen those images.
    val_logits = result.val_logits if result.val_logits is not None else head_logits(result.model, features["val"])
    logits = {"val": val_logits, "test": head_logits(result.model, features["test"])}
    head_l2 = result.extra.get("head_l2")
    return _Trained(
        logits,
        features,
        {
            "accuracy": result.history[0].train_acc,
            "n_images": len(run.labelled.splits["train"].ids),
            "features_computed": features_cache.computed,
            "backbone_id": features_cache.backbone_id,
            "head_l2": head_l2,
        },
        block_dims(result.model),
        head_l2=head_l2,
    )


def _train_full(run: _RunInputs, *, job_id: int, devices: Sequence[Any] = ()) -> _Trained:
    """Fine-tune every layer (on several `devices`: one process each under DDP, in the job's staging folder), then
    the tuned backbone's features of every labelled split (val and test logits come from them through the head: one
    forward pass, and the label checks reuse the features)."""
    from models.training import head_logits, train_full

    def report(progress: Any) -> None:
        run.on_progress(ProgressReport.from_library(progress, f"training ({progress.phase})"))

    if len(devices) > 1:
        from models.distributed import train_full_distributed

        with staged_checkpoint(run.db.settings, job_id) as folder:
            result = train_full_distributed(
                run.config,
                run.train_data(),
                model=run.model,
                cfg=run.cfg,
                devices=devices,
                folder=folder,
                on_progress=report,
                should_stop=run.should_stop,
            )
    else:
        result = train_full(
            run.config, run.train_data(), model=run.model, cfg=run.cfg, on_progress=report, should_stop=run.should_stop
        )
    features, _ = _labelled_features(run, result.model)
    logits = {split: head_logits(result.model, features[split]) for split in ("val", "test")}
    last = result.history[-1] if result.history else None
    return _Trained(
        logits,
        features,
        {
            "accuracy": last.train_acc if last else None,
            "loss": last.train_loss if last else None,
            "n_images": len(run.labelled.splits["train"].ids),
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "stopped_early": result.stopped_early,
            **({"devices": result.extra["devices"]} if "devices" in result.extra else {}),
        },
        block_dims(result.model),
    )


def _register(
    db: Database,
    staging: Path,
    *,
    job_id: int,
    config: TrainConfig,
    class_names: list[str],
    class_ids: list[int],
    pretrained_source: str,
    temperature: float,
    metrics: dict[str, Any],
    test_accuracy: float | None,
    test_hash: str,
    parent_id: int | None,
) -> int:
    """Insert the candidate row and move its checkpoint files into place in one transaction."""
    from core.durable import sync_directory

    settings = db.settings
    with db.write() as session:
        row = ModelVersion(
            arch=config.arch,
            image_size=config.image_size,
            mode=config.mode.value,
            class_names=class_names,
            class_category_ids=class_ids,
            weights_path="",
            pretrained_source=pretrained_source,
            temperature=temperature,
            status=VersionStatus.CANDIDATE,
            metrics=_json_safe(metrics),
            test_accuracy=test_accuracy,
            test_image_ids_hash=test_hash,
            parent_id=parent_id,
            job_id=job_id,
        )
        session.add(row)
        session.flush()
        stem = f"v{row.id}"
        for path in sorted(staging.iterdir()):
            if path.name.startswith("model"):
                path.replace(settings.checkpoints_dir / (stem + path.name[len("model") :]))
        sync_directory(settings.checkpoints_dir)  # the renames reach the disk before the row that names them
        row.weights_path = str((settings.checkpoints_dir / f"{stem}.safetensors").relative_to(settings.data_dir))
        return int(row.id)


def _json_safe(value: Any) -> Any:
    """Metrics as plain JSON (numpy scalars and arrays become Python numbers and lists)."""
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


@dataclass
class PromotionDecision:
    """Whether a new candidate became active and why; stored as `metrics["promotion"]` of its version.

    `active_version` and `active_accuracy_same_images` are recorded when the candidate was compared with the active
    version (policy if_not_worse); `active_error` when that version could not be measured again.
    """

    policy: str
    reason: str = ""
    promoted: bool = False
    active_version: int | None = None
    active_accuracy_same_images: float | None = None
    active_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The stored record: the comparison's keys only when a comparison was made."""
        record: dict[str, Any] = {"policy": self.policy, "reason": self.reason, "promoted": self.promoted}
        if self.active_version is not None:
            record["active_version"] = self.active_version
            record["active_accuracy_same_images"] = self.active_accuracy_same_images
        if self.active_error is not None:
            record["active_error"] = self.active_error
        return _json_safe(record)


def _decide_promotion(
    db: Database, *, test_accuracy: float | None, test_hash: str, test_pairs: Sequence[tuple[int, int]]
) -> PromotionDecision:
    """What settings.promote_policy says about a candidate measured at `test_accuracy` (before activating it)."""
    policy = db.settings.promote_policy
    current = active_version(db)
    decision = PromotionDecision(policy=policy)
    if policy == "always" or (policy == "if_not_worse" and current is None):
        decision.promoted = True
        decision.reason = "no active version" if current is None else "policy: always"
    elif policy == "if_not_worse":
        assert current is not None
        if test_accuracy is None:
            decision.promoted = True
            decision.reason = "no labelled test images to compare on"
        else:
            baseline: float | None = None
            try:
                if current.test_image_ids_hash == test_hash and current.test_accuracy is not None:
                    baseline = float(current.test_accuracy)
                else:
                    # The test set changed since the active version was measured: measure it again on the
                    # candidate's images and labels.
                    again = evaluate_version(db, current.id, pairs=test_pairs)
                    assert again["test_set_hash"] == test_hash
                    baseline = float(again["accuracy"])
            except CheckpointError as exc:
                decision.active_error = str(exc)
            decision.active_version = current.id
            decision.active_accuracy_same_images = baseline
            decision.promoted = baseline is None or test_accuracy >= baseline
            decision.reason = (
                "not worse than the active version" if decision.promoted else "worse than the active version"
            )
    else:
        decision.reason = "policy: manual (activate it from the Models page or `models activate`)"
    return decision


def _promote(
    db: Database,
    version_id: int,
    *,
    job_id: int,
    test_accuracy: float | None,
    test_hash: str,
    test_pairs: Sequence[tuple[int, int]],
) -> bool:
    """Apply settings.promote_policy to a new candidate; returns True when it became active.

    The active version is compared on the candidate's own test images and labels (`test_pairs`, as they were when
    the candidate was measured): labels corrected while the job ran do not tilt the comparison either way.
    """
    decision = _decide_promotion(db, test_accuracy=test_accuracy, test_hash=test_hash, test_pairs=test_pairs)
    if decision.promoted:
        try:
            promote_version(db, version_id, job_id=job_id)
        except CheckpointError as exc:
            decision.promoted = False
            decision.reason = f"could not activate: {exc}"
    with db.write() as session:
        row = session.get(ModelVersion, version_id)
        assert row is not None
        row.metrics = {**(row.metrics or {}), "promotion": decision.to_json()}
    return decision.promoted
