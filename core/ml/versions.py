"""Model versions: list them, load one as a classifier, activate one (rollback), evaluate one on the test split.

One accuracy per version everywhere (`VersionView.accuracy`, an `AccuracyFigure`): the test accuracy stored when it was
trained, with its test-image count. A page that shows another measurement (today's labels, the promotion check's
images) builds an AccuracyFigure with that basis, so it reads as what it is.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from core.auth import Action, authorize, check, record
from core.catalog.merges import Merges, category_names
from core.db import Database
from core.errors import CheckpointError, DeviceUnavailable, NotFound
from core.schema import Category, Image, Label, ModelVersion, Split, VersionStatus, utcnow


class AccuracyBasis(enum.StrEnum):
    """Which measurement an accuracy is. Versions are compared and named by AT_TRAINING; the others are labelled."""

    AT_TRAINING = "at training"  # stored when the version was trained, on the labelled test split of that day
    TODAYS_LABELS = "today's labels"  # recomputed on the test split as labelled now (labels corrected since count)
    SAME_IMAGES = "same images"  # re-measured on another version's test images and labels (the promotion check)


@dataclass(frozen=True)
class AccuracyFigure:
    """One accuracy with the test set it was measured on, worded the same way on every page and in the CLI."""

    value: float | None
    test_images: int
    basis: AccuracyBasis = AccuracyBasis.AT_TRAINING
    of_version: int | None = None  # SAME_IMAGES: whose test images

    @property
    def percent(self) -> str:
        """`81.2%`, or `n/a` when nothing was measured."""
        return "n/a" if self.value is None else f"{self.value:.1%}"

    def describe(self) -> str:
        """`test accuracy 81.2% on 200 test images (at training)`; `(today's labels)`; `on v4's 200 test images`."""
        if self.value is None or not self.test_images:
            return f"no test accuracy: no labelled test images ({self.basis})"
        images = f"{self.test_images} test image{'' if self.test_images == 1 else 's'}"
        if self.basis is AccuracyBasis.SAME_IMAGES and self.of_version is not None:
            return f"test accuracy {self.percent} on v{self.of_version}'s {images}"
        return f"test accuracy {self.percent} on {images} ({self.basis})"


@dataclass(frozen=True)
class VersionView:
    """A model version as the pages and the CLI show it."""

    id: int
    status: str
    arch: str
    image_size: int
    mode: str
    class_names: list[str]
    class_category_ids: list[int]
    weights_path: str
    temperature: float
    test_accuracy: float | None
    macro_f1: float | None
    ece: float | None
    metrics: dict[str, Any] = field(repr=False)
    test_image_ids_hash: str
    created_at: datetime
    activated_at: datetime | None
    pretrained_source: str
    job_id: int | None
    parent_id: int | None
    test_images: int = 0  # labelled test images `test_accuracy` was measured on, at training

    @property
    def classes(self) -> list[str]:
        return self.class_names

    @property
    def accuracy(self) -> AccuracyFigure:
        """THE accuracy of this version, everywhere: measured on its test split when it was trained."""
        return AccuracyFigure(self.test_accuracy, self.test_images)

    @property
    def label(self) -> str:
        """Short human name, e.g. 'v3 (resnet18, 224 px, quick)'."""
        return f"v{self.id} ({self.arch}, {self.image_size} px, {self.mode})"


def _view(row: ModelVersion) -> VersionView:
    test = (row.metrics or {}).get("test") or {}
    return VersionView(
        id=row.id,
        status=row.status,
        arch=row.arch,
        image_size=row.image_size,
        mode=row.mode,
        class_names=list(row.class_names),
        class_category_ids=[int(c) for c in row.class_category_ids],
        weights_path=row.weights_path,
        temperature=row.temperature,
        test_accuracy=row.test_accuracy,
        macro_f1=test.get("macro_f1"),
        ece=test.get("ece"),
        metrics=dict(row.metrics or {}),
        test_image_ids_hash=row.test_image_ids_hash,
        created_at=row.created_at,
        activated_at=row.activated_at,
        pretrained_source=row.pretrained_source,
        job_id=row.job_id,
        parent_id=row.parent_id,
        test_images=_count(test.get("n_images")),
    )


def _count(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def list_versions(db: Database) -> list[VersionView]:
    """Every model version, newest first."""
    with db.read() as session:
        return [_view(r) for r in session.scalars(select(ModelVersion).order_by(ModelVersion.id.desc()))]


def get_version(db: Database, version_id: int) -> VersionView:
    """One version by id (NotFound names the id)."""
    with db.read() as session:
        row = session.get(ModelVersion, int(version_id))
        if row is None:
            raise NotFound(f"no model version {version_id}: see `models list` for the versions")
        return _view(row)


def active_version(db: Database) -> VersionView | None:
    """The version that serves predictions, or None before the first training."""
    with db.read() as session:
        row = session.scalar(
            select(ModelVersion).where(ModelVersion.status == VersionStatus.ACTIVE).order_by(ModelVersion.id.desc())
        )
        return _view(row) if row is not None else None


def checkpoint_path(db: Database, version: VersionView | ModelVersion) -> Path:
    """Absolute path of a version's .safetensors file (stored relative to the data directory)."""
    path = Path(version.weights_path)
    return path if path.is_absolute() else db.settings.data_dir / path


def checkpoint_files(db: Database, version_id: int) -> list[Path]:
    """[weights (.safetensors), sidecar (.json)] of a version, both checked to exist.

    Raises NotFound for an unknown version and CheckpointError naming the first missing file.
    """
    from models.checkpoint import sidecar_path

    weights = checkpoint_path(db, get_version(db, version_id))
    files = [weights, sidecar_path(weights)]
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"model v{version_id}: checkpoint file {path} is missing")
    return files


def model_archive_bytes(db: Database, version_id: int, *, actor: str) -> bytes:
    """A zip of a version's weights and sidecar, named `model-v<id>.safetensors` and `model-v<id>.json` (the pair
    `models.checkpoint.load_checkpoint` reads), for one download by an admin (audited). Errors as `checkpoint_files`."""
    with db.write() as session:
        check(session, db.settings.auth, actor, Action.EXPORT)
        record(session, actor, Action.EXPORT, f"model version {int(version_id)}", kind="model download")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in checkpoint_files(db, version_id):
            # Weights hardly compress and are large: stored as they are; the JSON sidecar is deflated.
            method = zipfile.ZIP_DEFLATED if path.suffix == ".json" else zipfile.ZIP_STORED
            archive.write(path, f"model-v{version_id}{path.suffix}", compress_type=method)
    return buffer.getvalue()


def forget_loaded_classifiers() -> None:
    """Drop the classifiers `load_classifier` keeps loaded (the worker does before training, to free GPU memory)."""
    _load_cached.cache_clear()


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, version_id: int, mtime_ns: int, size: int, device: str) -> Any:
    # Keyed by file identity as well as version id: a replaced checkpoint file is re-read, never served stale.
    from models.checkpoint import load_checkpoint
    from models.errors import CheckpointInvalid
    from models.inference import Classifier

    try:
        import torch

        model, meta = load_checkpoint(Path(path), device=torch.device(device))
    except CheckpointInvalid as exc:
        raise CheckpointError(f"model v{version_id}: checkpoint {path} is not usable ({exc})") from exc
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"model v{version_id}: checkpoint {path} cannot be read ({exc})") from exc
    return Classifier(model, meta, torch.device(device))


def _inference_device(db: Database) -> str:
    from models.devices import pick_device

    try:
        return str(pick_device(db.settings.device))
    except ValueError as exc:
        raise DeviceUnavailable(f"{exc}: set PRODCAT_DEVICE to a device this machine has") from None


def load_classifier(db: Database, version_id: int | None = None) -> tuple[Any, VersionView]:
    """(models.inference.Classifier, VersionView) for a version (default: the active one).

    Raises NotFound when there is no such (or no active) version and CheckpointError when its file is missing
    or corrupt; callers keep serving whatever they held before.
    """
    if version_id is None:
        version = active_version(db)
        if version is None:
            raise NotFound("no active model yet: label some images and train one (Train page or `prodcat train`)")
    else:
        version = get_version(db, version_id)
    path = checkpoint_path(db, version)
    try:
        stat = path.stat()
    except OSError as exc:
        raise CheckpointError(f"model v{version.id}: checkpoint file {path} is missing ({exc.strerror})") from exc
    classifier = _load_cached(str(path), version.id, stat.st_mtime_ns, stat.st_size, _inference_device(db))
    return classifier, version


def activate_version(db: Database, version_id: int, *, actor: str) -> VersionView:
    """Make a version the one that serves predictions (the previous active one is retired), for a person: the
    actor must be a trainer or admin, and an audit row records who.

    Activating an older version is the rollback. The checkpoint is loaded first: if it is missing or corrupt,
    CheckpointError is raised and the current active version stays.
    """
    return _activate(db, version_id, actor=actor, checked=True)


def promote_version(db: Database, version_id: int, *, job_id: int) -> VersionView:
    """Activate a version a training job made, by the promotion rule (the job's requester was authorized to train
    when it was queued); the audit row names the job."""
    return _activate(db, version_id, actor=f"job #{job_id}", checked=False)


def _activate(db: Database, version_id: int, *, actor: str, checked: bool) -> VersionView:
    if checked:
        authorize(db, actor, Action.ACTIVATE)  # before the checkpoint is loaded: a refusal costs nothing
    load_classifier(db, version_id)  # proves the file is usable before anything changes
    with db.write() as session:
        if checked:
            check(session, db.settings.auth, actor, Action.ACTIVATE)
        record(session, actor, Action.ACTIVATE, f"model version {int(version_id)}")
        target = session.get(ModelVersion, int(version_id))
        if target is None:
            raise NotFound(f"no model version {version_id}")
        if target.status != VersionStatus.ACTIVE:
            for other in session.scalars(select(ModelVersion).where(ModelVersion.status == VersionStatus.ACTIVE)):
                other.status = VersionStatus.RETIRED
            target.status = VersionStatus.ACTIVE
            target.activated_at = utcnow()
        session.flush()
        return _view(target)


# --- evaluation on the fixed splits -------------------------------------------------------------------------


def labelled_images(db: Database, split: Split | str | None = None) -> list[tuple[int, int]]:
    """(image_id, category_id) of labelled images in live (not archived) categories, by image id."""
    with db.read() as session:
        query = (
            select(Label.image_id, Label.category_id)
            .join(Image, Image.id == Label.image_id)
            .join(Category, Category.id == Label.category_id)
            .where(Category.archived_at.is_(None))
            .order_by(Label.image_id)
        )
        if split is not None:
            query = query.where(Image.split == str(split))
        return [(int(i), int(c)) for i, c in session.execute(query)]


def hash_test_set(pairs: Sequence[tuple[int, int]]) -> str:
    """Identity of a labelled test set: versions measured under the same hash saw the same images with the same
    labels (a corrected test label changes it, so stored accuracies are not compared across it)."""
    return hashlib.sha256(";".join(f"{i}:{c}" for i, c in sorted(pairs)).encode()).hexdigest()


def metrics_for(
    db: Database,
    probs: np.ndarray,
    class_category_ids: Sequence[int],
    true_category_ids: Sequence[int],
) -> dict[str, Any]:
    """classification_metrics over the union of the model's classes and the true labels' categories.

    Labels in a category the model never saw count as errors (their probability column is zero), so a version
    that lacks a new category is not flattered by leaving those images out.
    """
    from models.metrics import classification_metrics

    classes = Merges.load(db).classes(class_category_ids)
    names = category_names(db)
    columns = list(dict.fromkeys([*classes.groups, *(int(c) for c in true_category_ids)]))
    full = classes.group_probs(probs, columns=columns)
    y_true = np.array([columns.index(int(c)) for c in true_category_ids], dtype=np.int64)
    metrics = classification_metrics(y_true, full, [names.get(c, str(c)) for c in columns])
    metrics["n_images"] = len(y_true)
    return metrics


def evaluate_version(
    db: Database,
    version_id: int,
    *,
    split: Split | str = Split.TEST,
    pairs: Sequence[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Metrics of a version on the current labelled images of a split (default: test), with its image-set hash.

    `pairs` ((image_id, category_id), e.g. a candidate's test set as it was when the candidate was measured)
    replaces the current labels, so two versions are compared on exactly the same images and labels.
    """
    from core.ml.pixel_cache import PixelCache

    classifier, version = load_classifier(db, version_id)
    pairs = list(pairs) if pairs is not None else labelled_images(db, split)
    if not pairs:
        note = f"the {split} split has no labelled images"
        return {"n_images": 0, "note": note, "test_set_hash": hash_test_set([])}
    ids = [i for i, _ in pairs]
    meta = classifier.meta
    # A lazy view: the classifier reads 64 rows at a time, so a large test split is never held in memory.
    pixels = PixelCache(db.settings, meta.image_size, meta.crop_pct, meta.interpolation).rows(db, ids)
    probs = classifier.predict_pixels(pixels, batch_size=64)
    metrics = metrics_for(db, probs, version.class_category_ids, [c for _, c in pairs])
    metrics["test_set_hash"] = hash_test_set(pairs)
    return metrics
