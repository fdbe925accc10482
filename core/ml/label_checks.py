"""Label checks after every retrain: out-of-sample probabilities for every labelled image, stored per image and version.

The training job hands over the backbone features of every labelled image (the cached ones in quick mode, the tuned
backbone's in full mode). K-fold heads on them give each image probabilities from a head that never saw its label
(`models.label_checks`), cleanlab turns those into a label quality, a label-issue flag and the likeliest category,
and the rows go to `image_checks`. Review queues, the dashboard and the data-health summary read them from there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import func, select

from core.db import Database
from core.ml.context import load_context
from core.ml.features import FeatureCache, image_shas
from core.schema import ImageCheck, Label, ModelVersion

OUTLIER_PERCENTILE = 99
# Outlier scores compare with at most this many labelled images (a seeded sample beyond it): the cost grows with
# images x references, so 100k labels stay minutes-free while the sample still covers every category densely.
MAX_REFERENCES = 20_000


@dataclass(frozen=True)
class LabelledSet:
    """Labelled images as a training job saw them: ids, class indices into `class_category_ids`, features."""

    image_ids: list[int]
    labels: np.ndarray
    features: np.ndarray
    class_category_ids: list[int]
    feature_blocks: tuple[int, ...] | None = None  # widths of the features' blocks (a stage-pooled network's)


@dataclass(frozen=True)
class LabelCheck:
    """What the check found for each image of a LabelledSet (rows in the same order)."""

    labelled: LabelledSet
    probs: np.ndarray
    quality: np.ndarray
    issue: np.ndarray
    suggested: np.ndarray
    suggested_probability: np.ndarray
    outlier: np.ndarray
    estimated_issues: int
    folds: int
    l2: float
    seconds: float

    @property
    def outlier_threshold(self) -> float | None:
        """Outlier score above which an image counts as unlike anything labelled: the labelled images' own 99th
        percentile (one labelled image in a hundred is that far from its nearest labelled neighbours)."""
        finite = self.outlier[np.isfinite(self.outlier)]
        return float(np.percentile(finite, OUTLIER_PERCENTILE)) if len(finite) >= 20 else None

    def summary(self) -> dict[str, Any]:
        """What the version's metrics keep about its label check (JSON)."""
        return {
            "checked": len(self.labelled.image_ids),
            "estimated_issues": int(self.estimated_issues),
            "flagged": int(self.issue.sum()),
            "folds": int(self.folds),
            "head_l2": float(self.l2),
            "outlier_threshold": self.outlier_threshold,
            "seconds": round(float(self.seconds), 2),
        }


def check_labels(labelled: LabelledSet, *, folds: int, seed: int = 0, config: Any = None) -> LabelCheck:
    """K-fold out-of-sample probabilities, cleanlab's findings and a leave-one-out outlier score for every row.

    `config` (the job's models.training.TrainConfig) gives the K-fold heads the same head settings as the model's
    own (L2 strength when fixed, iterations, threads). Raises models.errors.NotEnoughData when there are too few
    labels to cross-validate.
    """
    from models.label_checks import cross_validated_probs, find_label_problems
    from models.training import head_device

    started = time.monotonic()
    cv = cross_validated_probs(
        labelled.features,
        labelled.labels,
        num_classes=len(labelled.class_category_ids),
        folds=folds,
        seed=seed,
        config=config,
        blocks=labelled.feature_blocks,
    )
    problems = find_label_problems(labelled.labels, cv.probs)
    outlier = _labelled_outlier_scores(labelled.features, seed=seed, device=head_device(config) if config else None)
    return LabelCheck(
        labelled=labelled,
        probs=cv.probs,
        quality=problems.quality,
        issue=problems.issue,
        suggested=problems.suggested,
        suggested_probability=problems.suggested_probability,
        outlier=outlier,
        estimated_issues=problems.estimated_issues,
        folds=cv.folds,
        l2=cv.l2,
        seconds=time.monotonic() - started,
    )


def _reference_rows(n: int, seed: int) -> np.ndarray | None:
    """Rows of a seeded MAX_REFERENCES sample of n labelled images, or None when all of them are used."""
    if n <= MAX_REFERENCES:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=MAX_REFERENCES, replace=False))


def _labelled_outlier_scores(features: np.ndarray, *, seed: int, device: Any = None) -> np.ndarray:
    """Each labelled image's outlier score against the (sampled) labelled images, never against itself."""
    from models.label_checks import UnitRows, outlier_scores

    refs = _reference_rows(len(features), seed)
    if refs is None:
        return outlier_scores(features, UnitRows(features, device), same_rows=True)
    sample = UnitRows(features[refs], device)
    scores = outlier_scores(features, sample)
    scores[refs] = outlier_scores(features[refs], sample, same_rows=True)
    return scores


def _number(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


def _rows(version_id: int, check: LabelCheck) -> list[dict[str, Any]]:
    labelled, classes = check.labelled, check.labelled.class_category_ids
    return [
        {
            "image_id": int(image_id),
            "model_version_id": int(version_id),
            "label_category_id": int(classes[int(labelled.labels[n])]),
            "label_quality": float(check.quality[n]),
            "label_issue": bool(check.issue[n]),
            "suggested_category_id": int(classes[int(check.suggested[n])]),
            "suggested_probability": float(check.suggested_probability[n]),
            "outlier_score": _number(check.outlier[n]),
            "probs": [round(float(p), 5) for p in check.probs[n]],
        }
        for n, image_id in enumerate(labelled.image_ids)
    ]


def store_label_checks(db: Database, version_id: int, check: LabelCheck) -> int:
    """Write the check's rows for this version (a row already there for an image is kept); returns rows offered."""
    rows = _rows(version_id, check)
    insert_checks(db, rows)
    return len(rows)


_REFERENCES: dict[tuple[str, int, str], Any] = {}  # (data dir, version id, device) -> UnitRows of its checked images
_MAX_REFERENCES = 2


def _reference_index(db: Database, version_id: int, backbone_id: str, dim: int, device: Any) -> Any:
    """The features of the images a version's label check covered (its labelled images at training time), as
    models.label_checks.UnitRows on `device`: what outlier scores measure distance to. Fixed per version, so kept in
    memory for the last two versions asked; None while there are none."""
    from models.label_checks import UnitRows

    key = (str(db.settings.data_dir), int(version_id), str(device))
    if key in _REFERENCES:
        return _REFERENCES[key]
    with db.read() as session:
        ids = list(
            session.scalars(
                select(ImageCheck.image_id)
                .where(ImageCheck.model_version_id == version_id, ImageCheck.label_category_id.is_not(None))
                .order_by(ImageCheck.image_id)
            )
        )
    rows = _reference_rows(len(ids), int(version_id))
    ids = ids if rows is None else [ids[r] for r in rows]
    store = FeatureCache(db.settings, backbone_id, dim).store
    index = store.read_index()
    shas = [sha for sha in image_shas(db, ids) if sha in index]
    if not shas:  # none yet (the job may still write them): look again next time
        return None
    refs = UnitRows(np.asarray(store.gather(index, shas), dtype=np.float32), device)
    while len(_REFERENCES) >= _MAX_REFERENCES:
        _REFERENCES.pop(next(iter(_REFERENCES)))
    _REFERENCES[key] = refs
    return refs


def store_outlier_scores(
    db: Database,
    version_id: int,
    image_ids: Sequence[int],
    features: np.ndarray,
    *,
    backbone_id: str,
    device: Any = None,
) -> None:
    """Outlier scores of newly predicted images against the version's checked (labelled) images, computed on
    `device` (the classifier's; default the CPU); an image that has a check row already (say, a labelled one,
    scored leave-one-out by the job) keeps it."""
    from models.label_checks import outlier_scores

    if not backbone_id or not len(image_ids):
        return
    refs = _reference_index(db, version_id, backbone_id, int(features.shape[1]), device)
    if refs is None:
        return
    scores = outlier_scores(features, refs)
    insert_checks(
        db,
        [
            {**_EMPTY_CHECK, "image_id": int(i), "model_version_id": int(version_id), "outlier_score": _number(s)}
            for i, s in zip(image_ids, scores, strict=True)
        ],
    )


_EMPTY_CHECK: dict[str, Any] = {
    "label_category_id": None,
    "label_quality": None,
    "label_issue": False,
    "suggested_category_id": None,
    "suggested_probability": None,
    "probs": None,
}


def insert_checks(db: Database, rows: Sequence[dict[str, Any]]) -> None:
    """Batch insert into image_checks; a row another writer stored meanwhile (same image and version) stays."""
    db.insert_ignoring_duplicates(ImageCheck, rows)


@dataclass(frozen=True)
class CategoryIssues:
    """One category's likely wrong labels: flagged by the check and still carrying the label it doubted."""

    category_id: int
    category: str
    open_issues: int


@dataclass(frozen=True)
class LabelHealth:
    """The active (or given) version's label check: how many labels it checked, how many it counted as likely wrong,
    and how many of those still carry the label it doubted, per category (most open issues first)."""

    version_id: int | None
    checked: int
    flagged: int
    open_issues: int
    categories: list[CategoryIssues]

    @property
    def available(self) -> bool:
        return self.checked > 0

    def describe(self) -> str:
        """One line for people."""
        if self.version_id is None:
            return "No model yet: labels are checked after the first retrain."
        if not self.available:
            return f"Model v{self.version_id} has no label check (trained before checks existed): retrain to check."
        worst = ", ".join(f"{c.category} {c.open_issues}" for c in self.categories if c.open_issues)[:300]
        return (
            f"Label check of v{self.version_id}: {self.open_issues} likely label errors still open among "
            f"{self.checked} checked labels ({self.flagged} found)" + (f": {worst}" if worst else "")
        )


def label_health(db: Database, *, version_id: int | None = None) -> LabelHealth:
    """The version's label check (default: the active version): its stored summary, and the flagged labels still
    unchanged per category. Reads only the flagged rows (an index on version and flag), so it stays fast at 100k."""
    with db.read() as session:
        ctx = load_context(session, version_id)
        if ctx.version_id is None:
            return LabelHealth(None, 0, 0, 0, [])
        metrics = session.scalar(select(ModelVersion.metrics).where(ModelVersion.id == ctx.version_id)) or {}
        rows = session.execute(
            select(Label.category_id, func.count())
            .select_from(ImageCheck)
            .join(Label, Label.image_id == ImageCheck.image_id)
            .where(
                ImageCheck.model_version_id == ctx.version_id,
                ImageCheck.label_issue.is_(True),
                ImageCheck.label_category_id == Label.category_id,
            )
            .group_by(Label.category_id)
        ).all()
    summary = metrics.get("label_check") or {}
    categories = sorted(
        (CategoryIssues(int(c), ctx.names.get(int(c), "?"), int(n)) for c, n in rows),
        key=lambda c: (-c.open_issues, c.category),
    )
    return LabelHealth(
        version_id=ctx.version_id,
        checked=int(summary.get("checked") or 0),
        flagged=int(summary.get("flagged") or 0),
        open_issues=sum(c.open_issues for c in categories),
        categories=categories,
    )
