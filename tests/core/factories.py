"""Fill a database fast by bulk INSERTs (no image decoding): images, labels + import events, a version, predictions.

`populate` makes N random images for benchmarks and broad tests; `build` makes a small hand-written catalogue
whose right answers a test can compute by hand. Both return what they inserted, so a test knows the truth.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from sqlalchemy import func, insert, select, text

from core.db import Database
from core.schema import Category, Image, ImageCheck, Label, LabelEvent, ModelVersion, Prediction, Split, VersionStatus
from core.settings import Settings

DEFAULT_CATEGORIES: tuple[str, ...] = ("Shoes", "Bags", "Hats", "Shirts", "Watches")
FACTORY_ACTOR = "factory"
BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)
N_PICTURES = 6  # real tiny JPEGs the fake images point at, so a grid has something to show
_CHUNK = 20_000  # rows per executemany: bounded memory at 100k images


@dataclass(frozen=True)
class FakeImage:
    """One hand-written image for `build`: its split, label name (None = unlabelled) and the model's probabilities
    in the version's class order (None = no prediction stored). `created_at` defaults to BASE_TIME + index s."""

    split: str = "test"
    label: str | None = None
    probs: Sequence[float] | None = None
    name: str | None = None
    created_at: datetime | None = None


@dataclass
class Populated:
    """What was inserted; arrays are aligned with `image_ids` (label/predicted are category ids, -1 = none)."""

    image_ids: np.ndarray
    splits: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    margin: np.ndarray
    entropy: np.ndarray
    probs: np.ndarray | None
    category_ids: dict[str, int]
    version_id: int | None
    class_names: list[str] = field(default_factory=list)

    def id_of(self, name: str) -> int:
        """Category id by name."""
        return self.category_ids[name]


def _write_pictures(settings: Settings) -> list[tuple[str, str]]:
    """(stored_path, thumb_path) relative to data_dir for a few real tiny JPEGs, written once per data dir."""
    from PIL import Image as PILImage

    paths = []
    for k in range(N_PICTURES):
        rel_thumb = Path("thumbs") / "factory" / f"pic{k}.jpg"
        rel_orig = Path("images") / "factory" / f"pic{k}.jpg"
        for rel in (rel_thumb, rel_orig):
            target = settings.data_dir / rel
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                colour = ((53 * k) % 256, (97 * k + 80) % 256, (151 * k + 40) % 256)
                PILImage.new("RGB", (16, 16), colour).save(target, format="JPEG", quality=80)
        paths.append((rel_orig.as_posix(), rel_thumb.as_posix()))
    return paths


def _scores(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(argmax, confidence, margin, entropy) exactly as core.ml.predict stores them."""
    top = probs.argmax(axis=1)
    ordered = np.sort(probs, axis=1)
    margin = ordered[:, -1] - (ordered[:, -2] if probs.shape[1] > 1 else 0.0)
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)
    return top, ordered[:, -1], margin, entropy


def _categories(db: Database, names: Sequence[str]) -> dict[str, int]:
    with db.write() as session:
        existing = {c.name: c.id for c in session.scalars(select(Category))}
        missing = [{"name": n, "created_at": BASE_TIME} for n in names if n not in existing]
        if missing:
            session.execute(insert(Category), missing)
        return {c.name: c.id for c in session.scalars(select(Category))}


def _insert_all(
    db: Database,
    *,
    splits: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray | None,
    class_ids: list[int],
    class_names: list[str],
    names: Sequence[str] | None,
    created: Sequence[datetime] | None,
    seed: int,
    with_version: bool,
) -> tuple[np.ndarray, int | None, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Insert images, labels + import events, a version and predictions; rows of `probs` with NaN get none."""
    n = len(splits)
    pictures = _write_pictures(db.settings)
    with db.write() as session:
        start = (session.scalar(select(Image.id).order_by(Image.id.desc()).limit(1)) or 0) + 1
    ids = np.arange(start, start + n, dtype=np.int64)
    predicted = np.full(n, -1, dtype=np.int64)
    conf = np.full(n, np.nan)
    margin = np.full(n, np.nan)
    entropy = np.full(n, np.nan)
    has_pred = np.zeros(n, dtype=bool)
    if probs is not None:
        has_pred = ~np.isnan(probs).any(axis=1)
        top, c, m, e = _scores(np.nan_to_num(probs[has_pred]))
        predicted[has_pred] = np.asarray(class_ids)[top]
        conf[has_pred], margin[has_pred], entropy[has_pred] = c, m, e

    version_id = None
    with db.write() as session:
        if with_version:
            version = ModelVersion(
                arch="resnet18",
                image_size=32,
                mode="quick",
                class_names=list(class_names),
                class_category_ids=list(class_ids),
                weights_path="checkpoints/factory-v.safetensors",
                pretrained_source="none",
                status=VersionStatus.ACTIVE,
                metrics={},
                created_at=BASE_TIME,
                activated_at=BASE_TIME,
            )
            session.add(version)
            session.flush()
            version_id = version.id
        for lo in range(0, n, _CHUNK):
            hi = min(n, lo + _CHUNK)
            image_rows = []
            for k in range(lo, hi):
                orig, thumb = pictures[k % len(pictures)]
                image_rows.append(
                    {
                        "id": int(ids[k]),
                        "sha256": hashlib.sha256(f"factory-{seed}-{ids[k]}".encode()).hexdigest(),
                        "stored_path": orig,
                        "thumb_path": thumb,
                        "width": 16,
                        "height": 16,
                        "format": "JPEG",
                        "file_size": 600,
                        "original_name": names[k] if names else f"img_{ids[k]:06d}.jpg",
                        "source": "factory",
                        "split": str(splits[k]),
                        "created_at": created[k] if created else BASE_TIME + timedelta(seconds=int(ids[k])),
                        "uploaded_by": FACTORY_ACTOR,
                    }
                )
            session.execute(insert(Image), image_rows)
            labelled = [k for k in range(lo, hi) if labels[k] >= 0]
            if labelled:
                session.execute(
                    insert(Label),
                    [
                        {
                            "image_id": int(ids[k]),
                            "category_id": int(labels[k]),
                            "labelled_by": FACTORY_ACTOR,
                            "labelled_at": BASE_TIME,
                        }
                        for k in labelled
                    ],
                )
                # One import event per label, so the audit trail agrees with the labels table.
                session.execute(
                    insert(LabelEvent),
                    [
                        {
                            "image_id": int(ids[k]),
                            "old_category_id": None,
                            "new_category_id": int(labels[k]),
                            "actor": FACTORY_ACTOR,
                            "action": "import",
                            "created_at": BASE_TIME,
                            "note": "factory",
                        }
                        for k in labelled
                    ],
                )
            if version_id is not None and probs is not None:
                rows = [
                    {
                        "image_id": int(ids[k]),
                        "model_version_id": version_id,
                        "category_id": int(predicted[k]),
                        "confidence": float(conf[k]),
                        "margin": float(margin[k]),
                        "entropy": float(entropy[k]),
                        "probs": [round(float(p), 6) for p in probs[k]],
                        "created_at": BASE_TIME,
                    }
                    for k in range(lo, hi)
                    if has_pred[k]
                ]
                if rows:
                    session.execute(insert(Prediction), rows)
                checks = _check_rows(version_id, ids[lo:hi], labels[lo:hi], probs[lo:hi], class_ids)
                if checks:
                    session.execute(insert(ImageCheck), checks)
        if not db.is_sqlite:
            # The ids above were given, not drawn from PostgreSQL's sequence: move it past them for later inserts.
            session.execute(text("SELECT setval(pg_get_serial_sequence('images', 'id'), (SELECT max(id) FROM images))"))
    return ids, version_id, predicted, conf, margin, entropy


def _check_rows(
    version_id: int, ids: np.ndarray, labels: np.ndarray, probs: np.ndarray, class_ids: list[int]
) -> list[dict]:
    """Label-check rows as a retrain writes them, taking the stored probabilities as the out-of-sample ones: labelled
    images get cleanlab's quality and issue flag (over this chunk) and the likeliest class; every predicted image
    gets an outlier score of 1 - confidence (a stand-in with a known order)."""
    from models.label_checks import find_label_problems

    has = ~np.isnan(probs).any(axis=1)
    index_of = {c: i for i, c in enumerate(class_ids)}
    scored = has & np.array([int(c) in index_of for c in labels])
    given = np.array([index_of[int(c)] for c in labels[scored]], dtype=np.int64)
    found = find_label_problems(given, probs[scored])
    position = {int(k): n for n, k in enumerate(np.flatnonzero(scored))}
    rows = []
    for k in np.flatnonzero(has):
        row = {
            "image_id": int(ids[k]),
            "model_version_id": version_id,
            "outlier_score": 1.0 - float(probs[k].max()),
            "label_category_id": None,
            "label_quality": None,
            "label_issue": False,
            "suggested_category_id": None,
            "suggested_probability": None,
        }
        if int(k) in position:
            n = position[int(k)]
            row |= {
                "label_category_id": int(labels[k]),
                "label_quality": float(found.quality[n]),
                "label_issue": bool(found.issue[n]),
                "suggested_category_id": int(class_ids[int(found.suggested[n])]),
                "suggested_probability": float(found.suggested_probability[n]),
            }
        rows.append(row)
    return rows


def _test_metrics(labels: np.ndarray, predicted: np.ndarray, splits: np.ndarray, class_ids: list[int]) -> dict:
    """Stored-metrics JSON shaped like models.metrics.classification_metrics (accuracy, macro F1, confusion)."""
    from sklearn.metrics import confusion_matrix, f1_score

    mask = (splits == Split.TEST.value) & (labels >= 0) & (predicted >= 0)
    if not mask.any():
        return {"n_images": 0}
    y_true, y_pred = labels[mask], predicted[mask]
    return {
        "accuracy": float((y_true == y_pred).mean()),
        "macro_f1": float(f1_score(y_true, y_pred, labels=class_ids, average="macro", zero_division=0)),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=class_ids).tolist(),
        "n_images": int(mask.sum()),
    }


def _store_metrics(db: Database, version_id: int | None, info_metrics: dict, class_names: list[str]) -> None:
    if version_id is None:
        return
    with db.write() as session:
        version = session.get(ModelVersion, version_id)
        assert version is not None
        checked = session.scalar(
            select(func.count()).where(ImageCheck.model_version_id == version_id, ImageCheck.label_quality.is_not(None))
        )
        flagged = session.scalar(
            select(func.count()).where(ImageCheck.model_version_id == version_id, ImageCheck.label_issue.is_(True))
        )
        version.metrics = {
            "test": {**info_metrics, "class_names": class_names},
            "label_check": {"checked": int(checked or 0), "flagged": int(flagged or 0)},  # as a retrain records it
        }
        version.test_accuracy = info_metrics.get("accuracy")


def populate(
    db: Database,
    *,
    n_images: int,
    categories: Sequence[str] = DEFAULT_CATEGORIES,
    labelled_fraction: float = 0.6,
    wrong_fraction: float = 0.15,
    predicted_fraction: float = 1.0,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    with_version: bool = True,
    keep_probs: bool = False,
    seed: int = 0,
) -> Populated:
    """Insert `n_images` fake images with random splits, labels (`labelled_fraction`), and, with a version,
    predictions for `predicted_fraction` of them whose top class is wrong for about `wrong_fraction`.

    100,000 images take a few seconds. `keep_probs=True` also returns the (N, C) probability matrix.
    """
    rng = np.random.default_rng(seed)
    names = list(categories)
    category_ids = _categories(db, names)
    class_ids = [category_ids[c] for c in names]
    c = len(names)
    splits = rng.choice([s.value for s in Split], size=n_images, p=list(split_fractions))
    truth = rng.integers(0, c, size=n_images)
    labelled = rng.random(n_images) < labelled_fraction
    labels = np.where(labelled, np.asarray(class_ids)[truth], -1)

    probs = None
    if with_version:
        wrong = rng.random(n_images) < wrong_fraction
        top = np.where(wrong, (truth + rng.integers(1, max(c, 2), size=n_images)) % c, truth)
        logits = rng.normal(0.0, 1.0, size=(n_images, c))
        logits[np.arange(n_images), top] += rng.uniform(0.5, 5.0, size=n_images)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        probs[rng.random(n_images) >= predicted_fraction] = np.nan

    populated = _insert_populated(
        db,
        splits,
        labels,
        probs,
        category_ids,
        names,
        image_names=None,
        created=None,
        seed=seed,
        with_version=with_version,
    )
    return populated if keep_probs else dataclasses.replace(populated, probs=None)


def build(
    db: Database,
    images: Sequence[FakeImage],
    *,
    categories: Sequence[str] = ("Shoes", "Bags", "Hats"),
    with_version: bool = True,
    seed: int = 0,
) -> Populated:
    """Insert hand-written images in order (ids ascending); `probs` are in `categories` order."""
    names = list(categories)
    category_ids = _categories(db, names)
    n = len(images)
    splits = np.array([im.split for im in images])
    labels = np.array([category_ids[im.label] if im.label else -1 for im in images], dtype=np.int64)
    probs = np.full((n, len(names)), np.nan)
    for k, im in enumerate(images):
        if im.probs is not None:
            row = np.asarray(im.probs, dtype=np.float64)
            probs[k] = row / row.sum()
    created = [im.created_at or BASE_TIME + timedelta(seconds=k) for k, im in enumerate(images)]
    image_names = [im.name or f"img_{k:03d}.jpg" for k, im in enumerate(images)]
    return _insert_populated(
        db,
        splits,
        labels,
        probs,
        category_ids,
        names,
        image_names=image_names,
        created=created,
        seed=seed,
        with_version=with_version,
    )


def _insert_populated(
    db: Database,
    splits: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray | None,
    category_ids: dict[str, int],
    names: list[str],
    *,
    image_names: list[str] | None,
    created: list[datetime] | None,
    seed: int,
    with_version: bool,
) -> Populated:
    """Insert the rows (and the version with its test metrics) and describe what was made."""
    class_ids = [category_ids[c] for c in names]
    ids, version_id, predicted, conf, margin, entropy = _insert_all(
        db,
        splits=splits,
        labels=labels,
        probs=probs,
        class_ids=class_ids,
        class_names=names,
        names=image_names,
        created=created,
        seed=seed,
        with_version=with_version,
    )
    _store_metrics(db, version_id, _test_metrics(labels, predicted, splits, class_ids), names)
    return Populated(
        image_ids=ids,
        splits=splits,
        labels=labels,
        predicted=predicted,
        confidence=conf,
        margin=margin,
        entropy=entropy,
        probs=probs,
        category_ids=category_ids,
        version_id=version_id,
        class_names=names,
    )


_SURE = [(0.9, 0.05, 0.05), (0.05, 0.9, 0.05), (0.05, 0.05, 0.9)]


def catalogue_with_findings(db: Database) -> list[int]:
    """16 images for data-health tests: one likely wrong label (Shoes that the check calls Bags), 12 labels the check
    agrees with (3 per category in train, 1 in val and test), 3 unlabelled. Returns the ids in that order."""
    images = [FakeImage(split="train", label="Shoes", probs=(0.02, 0.96, 0.02))]  # a likely wrong label
    images += [FakeImage(split=s, label=n, probs=_SURE[k % 3]) for k, (n, s) in enumerate(
        [(n, s) for s in ("train", "train", "val", "test") for n in ("Shoes", "Bags", "Hats")]
    )]  # fmt: skip
    images += [FakeImage(split="train", label=None, probs=(0.4, 0.3, 0.3)) for _ in range(3)]
    return [int(i) for i in build(db, images).image_ids]
