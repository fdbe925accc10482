"""Catalogue counts: images, labelled/unlabelled, and a category x split table, all by SQL GROUP BY."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from core.db import Database
from core.schema import Category, Image, Label, Split

if TYPE_CHECKING:
    import pandas as pd

UNLABELLED = "(unlabelled)"
SPLITS: tuple[str, ...] = tuple(s.value for s in Split)


@dataclass(frozen=True)
class CategorySplitRow:
    """Images per split for one category (or for the unlabelled images)."""

    category: str
    train: int = 0
    val: int = 0
    test: int = 0
    archived: bool = False

    @property
    def total(self) -> int:
        return self.train + self.val + self.test


@dataclass(frozen=True)
class CatalogueStats:
    """Counts for the whole catalogue. `rows` has every live category (zero counts included), archived ones
    that still hold labels, and a final "(unlabelled)" row; `pd.DataFrame(stats.records())` or `to_frame()`."""

    total_images: int
    labelled: int
    unlabelled: int
    categories: int  # live (not archived) categories
    rows: list[CategorySplitRow] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        """The table as plain dicts (category, train, val, test, total, archived): JSON- and pandas-ready."""
        return [
            {
                "category": r.category,
                "train": r.train,
                "val": r.val,
                "test": r.test,
                "total": r.total,
                "archived": r.archived,
            }
            for r in self.rows
        ]

    def to_frame(self) -> pd.DataFrame:
        """The category x split table as a DataFrame indexed by category, with a total column."""
        import pandas as pd  # only callers who want a frame pay for importing pandas

        frame = pd.DataFrame(self.records(), columns=["category", "train", "val", "test", "total", "archived"])
        return frame.set_index("category")

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_images": self.total_images,
            "labelled": self.labelled,
            "unlabelled": self.unlabelled,
            "categories": self.categories,
            "table": self.records(),
        }


def catalogue_stats(db: Database) -> CatalogueStats:
    """Count images per category and split in the database (two small GROUP BY queries, no rows loaded)."""
    with db.read() as session:
        counted = session.execute(
            select(Label.category_id, Image.split, func.count())
            .select_from(Image)
            .outerjoin(Label, Label.image_id == Image.id)
            .group_by(Label.category_id, Image.split)
        ).all()
        categories = session.execute(
            select(Category.id, Category.name, Category.archived_at).order_by(Category.name)
        ).all()

    per_category: dict[int | None, dict[str, int]] = {}
    for category_id, split, n in counted:
        per_category.setdefault(category_id, {})[str(split)] = int(n)

    rows: list[CategorySplitRow] = []
    for category_id, name, archived_at in categories:
        counts = per_category.get(category_id, {})
        # Archived categories are listed only while images still carry them.
        if archived_at is not None and not counts:
            continue
        rows.append(_row(name, counts, archived=archived_at is not None))
    unlabelled_counts = per_category.get(None, {})
    rows.append(_row(UNLABELLED, unlabelled_counts, archived=False))

    total = sum(sum(c.values()) for c in per_category.values())
    unlabelled = sum(unlabelled_counts.values())
    return CatalogueStats(
        total_images=total,
        labelled=total - unlabelled,
        unlabelled=unlabelled,
        categories=sum(1 for _, _, archived_at in categories if archived_at is None),
        rows=rows,
    )


def _row(name: str, counts: dict[str, int], *, archived: bool) -> CategorySplitRow:
    return CategorySplitRow(
        category=name,
        train=counts.get(Split.TRAIN.value, 0),
        val=counts.get(Split.VAL.value, 0),
        test=counts.get(Split.TEST.value, 0),
        archived=archived,
    )
