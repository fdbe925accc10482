"""Data health: what in the catalogue needs a person's attention (likely wrong labels, unusual photos, duplicate
groups, unlabelled photos, categories too small or out of balance), each with the review queue that shows it."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select

from core.catalog.duplicates import DuplicateCounts, duplicate_counts
from core.catalog.stats import UNLABELLED, catalogue_stats
from core.db import Database
from core.ml.context import load_context
from core.ml.label_checks import LabelHealth, label_health
from core.ml.training import MIN_TRAIN_PER_CATEGORY, MIN_VAL_PER_CATEGORY
from core.schema import ImageCheck
from core.views.review import LabelState, ReviewOrder

IMBALANCE_WARNING = 10.0  # largest / smallest labelled category: above this the small ones are barely learned


@dataclass(frozen=True)
class CategoryHealth:
    """One live category: labelled images per split, and how many of its labels the check doubts."""

    category: str
    train: int
    val: int
    test: int
    likely_wrong: int

    @property
    def labelled(self) -> int:
        return self.train + self.val + self.test

    @property
    def too_small(self) -> bool:
        """Below what a retrain needs (it is left out of training until it has more)."""
        return self.train < MIN_TRAIN_PER_CATEGORY or self.val < MIN_VAL_PER_CATEGORY


@dataclass(frozen=True)
class Finding:
    """One thing to look at: a headline, a sentence, and where to look (review-queue filters or a page key)."""

    title: str
    detail: str
    review: dict[str, str] = field(default_factory=dict)
    page: str | None = None


@dataclass(frozen=True)
class DataHealth:
    total: int
    unlabelled: int
    labels: LabelHealth
    unusual: int  # images the active version's check found unlike anything labelled
    duplicates: DuplicateCounts
    categories: list[CategoryHealth]

    @property
    def imbalance(self) -> float | None:
        """Largest over smallest labelled category (None with fewer than two labelled categories)."""
        sizes = [c.labelled for c in self.categories if c.labelled]
        return max(sizes) / min(sizes) if len(sizes) >= 2 else None

    def findings(self) -> list[Finding]:
        """What to look at, most useful first; empty when nothing needs attention."""
        found: list[Finding] = []
        if self.labels.open_issues:
            found.append(
                Finding(
                    f"{self.labels.open_issues} likely wrong labels",
                    "Labels that K-fold heads, which never saw them, contradict: each card suggests the likelier one.",
                    {"label_state": LabelState.LABEL_ISSUES, "order": ReviewOrder.SUSPECTED_MISLABEL},
                )
            )
        if self.unusual:
            found.append(
                Finding(
                    f"{self.unusual} unusual photos",
                    "Unlike anything labelled so far: a new category, a wrong upload, or a hard case worth labelling.",
                    {"order": ReviewOrder.MOST_UNUSUAL},
                )
            )
        if self.duplicates.groups:
            found.append(
                Finding(
                    f"{self.duplicates.groups} groups of near-duplicates ({self.duplicates.images} photos)",
                    "Resized, re-encoded, cropped or watermarked copies: keep one of each.",
                    page="duplicates",
                )
            )
        small = [c.category for c in self.categories if c.too_small]
        if small:
            found.append(
                Finding(
                    f"{len(small)} categories too small to train",
                    f"Need {MIN_TRAIN_PER_CATEGORY} train and {MIN_VAL_PER_CATEGORY} validation images each: "
                    + ", ".join(small[:10])
                    + ("…" if len(small) > 10 else ""),
                    {"label_state": LabelState.UNLABELLED, "order": ReviewOrder.LOWEST_CONFIDENCE},
                )
            )
        if self.imbalance is not None and self.imbalance > IMBALANCE_WARNING:
            found.append(
                Finding(
                    f"Categories out of balance ({self.imbalance:.0f} to 1)",
                    "The smallest categories are learned poorly: label more of them.",
                )
            )
        if self.unlabelled:
            found.append(
                Finding(
                    f"{self.unlabelled} unlabelled photos",
                    "The model's least confident first: each label there teaches it the most.",
                    {"label_state": LabelState.UNLABELLED, "order": ReviewOrder.LOWEST_CONFIDENCE},
                )
            )
        return found


def _unusual(db: Database) -> int:
    with db.read() as session:
        ctx = load_context(session, None)
        if ctx.version_id is None or ctx.outlier_threshold is None:
            return 0
        return int(
            session.scalar(
                select(func.count()).where(
                    ImageCheck.model_version_id == ctx.version_id, ImageCheck.outlier_score > ctx.outlier_threshold
                )
            )
            or 0
        )


def data_health(db: Database) -> DataHealth:
    """The whole catalogue's health, by SQL counts (fast at 100k images)."""
    stats = catalogue_stats(db)
    labels = label_health(db)
    doubted = {c.category: c.open_issues for c in labels.categories}
    categories = [
        CategoryHealth(r.category, r.train, r.val, r.test, doubted.get(r.category, 0))
        for r in stats.rows
        if r.category != UNLABELLED and not r.archived
    ]
    return DataHealth(
        total=stats.total_images,
        unlabelled=stats.unlabelled,
        labels=labels,
        unusual=_unusual(db),
        duplicates=duplicate_counts(db),
        categories=categories,
    )
