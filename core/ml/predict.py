"""Predictions: stored per image and model version for the catalogue, computed on the fly for loose files."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import exists, select

from core.catalog.merges import ClassGroups, Merges, category_names
from core.db import Database, in_chunks
from core.errors import ImageRefused, NotFound
from core.ml.features import classifier_features
from core.ml.label_checks import store_outlier_scores
from core.ml.pixel_cache import PixelCache
from core.ml.versions import active_version, load_classifier
from core.schema import Image, Prediction

# progress(done, total)
PredictProgress = Callable[[int, int], None]
BATCH = 256


@dataclass(frozen=True)
class TopK:
    """One of the k most likely categories."""

    category_id: int
    category: str
    probability: float


@dataclass(frozen=True)
class PredictionView:
    """A model version's calibrated prediction for one catalogue image."""

    image_id: int
    model_version_id: int
    category_id: int
    category: str
    confidence: float
    margin: float
    entropy: float
    probs: list[float] = field(repr=False)
    top_k: list[TopK] = field(default_factory=list)


@dataclass(frozen=True)
class FilePrediction:
    """Prediction for a loose file (not imported). `error` is set (and the rest empty) when it is not usable."""

    name: str
    category: str | None
    confidence: float | None
    top_k: list[TopK] = field(default_factory=list)
    error: str | None = None
    model_version_id: int | None = None


def _ranked(probs: Sequence[float], classes: ClassGroups, names: dict[int, str], k: int) -> list[TopK]:
    """The k most likely categories. A class whose category was merged since training counts as the category it
    was merged into (probabilities added), so 'Sneakers' merged into 'Shoes' is never shown on its own."""
    totals = classes.group_probs(np.asarray(probs))[0]
    order = np.argsort(-totals, kind="stable")[: max(int(k), 1)]  # stable: class order on ties
    return [TopK(classes.groups[j], names.get(classes.groups[j], "?"), float(totals[j])) for j in order]


def _scores(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top index, margin top1-top2, entropy in nats) per row: models.metrics' definitions."""
    from models.metrics import entropy_scores, margin_scores

    return probs.argmax(axis=1), margin_scores(probs), entropy_scores(probs)


def _view(row: dict[str, Any], classes: ClassGroups, names: dict[int, str], k: int) -> PredictionView:
    top_k = _ranked(row["probs"], classes, names, k)
    return PredictionView(
        image_id=row["image_id"],
        model_version_id=row["model_version_id"],
        category_id=top_k[0].category_id,
        category=top_k[0].category,
        confidence=top_k[0].probability,
        margin=row["margin"],
        entropy=row["entropy"],
        probs=list(row["probs"]),
        top_k=top_k,
    )


def predict_images(
    db: Database,
    image_ids: Sequence[int],
    *,
    version_id: int | None = None,
    top_k: int = 3,
    unreadable: list[ImageRefused] | None = None,
) -> dict[int, PredictionView]:
    """Predictions of a version (default: the active one) for catalogue images, computing and storing missing ones.

    A stored original that cannot be read raises ImageRefused, unless a list is passed as `unreadable`: then the
    refusals are appended to it (their `image_id` set), those images get no prediction and the others still do.
    """
    classifier, version = load_classifier(db, version_id)
    ids = list(dict.fromkeys(int(i) for i in image_ids))
    if not ids:
        return {}
    have = _stored(db, version.id, ids)
    missing = [i for i in ids if i not in have]
    if missing:
        _store_missing(db, classifier, version, missing, unreadable)
        have.update(_stored(db, version.id, missing))
    names, classes = category_names(db), Merges.load(db).classes(version.class_category_ids)
    return {i: _view(have[i], classes, names, top_k) for i in ids if i in have}


def _store_missing(
    db: Database, classifier: Any, version: Any, missing: Sequence[int], unreadable: list[ImageRefused] | None
) -> None:
    """Compute and store the version's prediction (and outlier score) of these images, which had none when the
    caller looked (a row another writer stores meanwhile is kept); NotFound for an id with no image."""
    known: set[int] = set()
    with db.read() as session:
        for part in in_chunks(missing):
            known.update(session.scalars(select(Image.id).where(Image.id.in_(part))))
    unknown = [i for i in missing if i not in known]
    if unknown:
        raise NotFound(f"no image with id {', '.join(map(str, unknown[:10]))}")
    meta = classifier.meta
    cache = PixelCache(db.settings, meta.image_size, meta.crop_pct, meta.interpolation)
    for start in range(0, len(missing), BATCH):
        part, features = classifier_features(
            db, classifier, missing[start : start + BATCH], lambda todo: _readable_pixels(db, cache, todo, unreadable)
        )
        if not part:
            continue
        probs = np.asarray(classifier.probs_from_features(features), dtype=np.float64)
        top, margin, entropy = _scores(probs)
        db.insert_ignoring_duplicates(
            Prediction,
            [
                {
                    "image_id": image_id,
                    "model_version_id": version.id,
                    "category_id": int(version.class_category_ids[int(top[n])]),
                    "confidence": float(probs[n, top[n]]),
                    "margin": float(margin[n]),
                    "entropy": float(entropy[n]),
                    "probs": [round(float(p), 6) for p in probs[n]],
                }
                for n, image_id in enumerate(part)
            ],
        )
        store_outlier_scores(db, version.id, part, features, backbone_id=meta.backbone_id, device=classifier.device)


def _readable_pixels(
    db: Database, cache: PixelCache, ids: list[int], unreadable: list[ImageRefused] | None
) -> tuple[list[int], np.ndarray]:
    """(ids, pixels) of this batch; with `unreadable` given, an image that cannot be read is left out, not fatal."""
    try:
        return ids, cache.ensure(db, ids)
    except ImageRefused:
        if unreadable is None:
            raise
    good: list[int] = []
    rows: list[np.ndarray] = []
    for image_id in ids:  # the slow path, only for a batch holding a bad original: find which one(s)
        try:
            rows.append(cache.ensure(db, [image_id])[0])
            good.append(image_id)
        except ImageRefused as exc:
            exc.image_id = image_id
            unreadable.append(exc)
    return good, (np.stack(rows) if rows else np.empty((0,)))


_COLUMNS = ("image_id", "model_version_id", "category_id", "confidence", "margin", "entropy", "probs")


def _stored(db: Database, version_id: int, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Stored rows of this version for these images, as plain dicts (usable after the session closed)."""
    found: dict[int, dict[str, Any]] = {}
    columns = [getattr(Prediction, c) for c in _COLUMNS]
    with db.read() as session:
        for part in in_chunks(list(ids)):
            query = select(*columns).where(Prediction.model_version_id == version_id, Prediction.image_id.in_(part))
            found.update({row.image_id: dict(row._mapping) for row in session.execute(query)})
    return found


def refresh_predictions(
    db: Database,
    version_id: int,
    *,
    progress: PredictProgress | None = None,
    unreadable: list[ImageRefused] | None = None,
) -> int:
    """Store this version's prediction for every catalogue image that lacks one; returns how many were tried.

    With `unreadable` given, images whose stored original cannot be read are listed there and skipped.
    """
    with db.read() as session:
        all_ids = list(session.scalars(select(Image.id).order_by(Image.id)))
        done = set(session.scalars(select(Prediction.image_id).where(Prediction.model_version_id == version_id)))
    todo = [i for i in all_ids if i not in done]
    if not todo:
        return 0
    classifier, version = load_classifier(db, version_id)
    if progress is not None:  # at once, then every BATCH images: features take seconds a chunk on a CPU
        progress(0, len(todo))
    for start in range(0, len(todo), BATCH):
        _store_missing(db, classifier, version, todo[start : start + BATCH], unreadable)  # no views to build
        if progress is not None:
            progress(min(start + BATCH, len(todo)), len(todo))
    return len(todo)


def missing_image_ids(db: Database, version_id: int, *, limit: int, skip: Collection[int] = ()) -> list[int]:
    """Up to `limit` catalogue images (lowest ids first, `skip` left out) with no stored prediction of this version."""
    has_row = exists().where(Prediction.image_id == Image.id, Prediction.model_version_id == int(version_id))
    query = select(Image.id).where(~has_row)
    if skip:
        query = query.where(Image.id.not_in(sorted(int(i) for i in skip)))
    with db.read() as session:
        return list(session.scalars(query.order_by(Image.id).limit(max(int(limit), 0))))


def predict_missing(
    db: Database, *, limit: int = BATCH * 2, skip: Collection[int] = (), unreadable: list[ImageRefused] | None = None
) -> int:
    """Store the ACTIVE version's prediction for up to `limit` images that lack one; returns how many were tried.

    One bounded page per call (the worker calls it while idle, so a queued job waits at most one page); 0 when there
    is no active version or nothing is missing. Images in `skip` are not tried (the worker passes those it found
    unreadable); with `unreadable` given, a stored original that cannot be read is listed there instead of raising.
    A CheckpointError of the version propagates.
    """
    version = active_version(db)
    if version is None:
        return 0
    todo = missing_image_ids(db, version.id, limit=limit, skip=skip)
    if todo:
        classifier, version = load_classifier(db, version.id)
        _store_missing(db, classifier, version, todo, unreadable)
    return len(todo)


def _decode_upload(name: str, data: bytes, db: Database, cfg: Any) -> np.ndarray:
    """Validate and decode like ingest does, then the same normalisation and pixels as stored images."""
    from core.catalog.imaging import inspect_and_decode, normalise
    from models.preprocess import to_model_pixels

    decoded = inspect_and_decode(name, data, db.settings)
    return to_model_pixels(normalise(decoded.image), cfg)


def predict_uploads(db: Database, uploads: Iterable[Any], *, top_k: int = 3) -> list[FilePrediction]:
    """Predict in-memory files (objects with `.name` and `.data` or `.read()`) without importing them.

    A file that is not an acceptable image gets its `error`; the others are still predicted.
    """
    classifier, version = load_classifier(db)
    names, classes = category_names(db), Merges.load(db).classes(version.class_category_ids)
    results: list[FilePrediction | None] = []
    good: list[tuple[int, str, np.ndarray]] = []

    def flush() -> None:
        # Decoded pixels are scored BATCH at a time, so thousands of files never sit in memory together.
        if not good:
            return
        probs = np.asarray(classifier.predict_pixels(np.stack([p for _, _, p in good]), batch_size=64), np.float64)
        for (slot, name, _), row in zip(good, probs, strict=True):
            ranked = _ranked(row, classes, names, top_k)
            results[slot] = FilePrediction(
                name=name,
                category=ranked[0].category,
                confidence=ranked[0].probability,
                top_k=ranked,
                model_version_id=version.id,
            )
        good.clear()

    for upload in uploads:
        name = str(getattr(upload, "name", "upload"))
        try:
            data = upload.data if hasattr(upload, "data") else upload.read()
            good.append((len(results), name, _decode_upload(name, data, db, classifier.cfg)))
            results.append(None)
        except ImageRefused as exc:
            results.append(FilePrediction(name=name, category=None, confidence=None, error=exc.reason))
        except OSError as exc:
            results.append(FilePrediction(name=name, category=None, confidence=None, error=f"cannot read ({exc})"))
        if len(good) >= BATCH:
            flush()
    flush()
    return [r for r in results if r is not None]


@dataclass
class _PathUpload:
    name: str
    path: Path

    def read(self) -> bytes:
        return self.path.read_bytes()


def predict_files(db: Database, paths: Iterable[Path | str], *, top_k: int = 3) -> list[FilePrediction]:
    """Predict image files on disk without importing them (one result per path, errors included)."""
    return predict_uploads(db, [_PathUpload(str(p), Path(p)) for p in paths], top_k=top_k)
