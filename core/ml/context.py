"""A model version's classes as today's categories, with their names and merges: what every reader of
predictions (review queues, dashboard, label checks) resolves categories through."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import SQLColumnExpression, case, select
from sqlalchemy.orm import Session

from core.catalog.merges import ClassGroups, Merges
from core.errors import NotFound
from core.schema import Category, ModelVersion, Prediction, VersionStatus


@dataclass(frozen=True)
class VersionContext:
    """The version the queue is about, its classes as today's categories, and category names."""

    version_id: int | None
    classes: ClassGroups
    names: dict[int, str]
    outlier_threshold: float | None = None  # the version's label check: above it, unlike anything labelled

    def resolve(self, category_id: int) -> int:
        """Follow merges to the category an id stands for today."""
        return self.classes.merges.resolve(category_id)

    @property
    def groups(self) -> list[int]:
        """Distinct current categories of the version's classes, in class order (merged classes share one)."""
        return self.classes.groups

    def predicted_expr(self) -> SQLColumnExpression[int]:
        """Prediction.category_id with merged classes mapped onto their target (in SQL)."""
        ids = self.classes.class_category_ids
        remap = {c: self.resolve(c) for c in ids if self.resolve(c) != c}
        if not remap:
            return Prediction.category_id
        return case(remap, value=Prediction.category_id, else_=Prediction.category_id)

    def sources_of(self, category_id: int) -> list[int]:
        """The class category ids a prediction can carry that mean `category_id` today."""
        return self.classes.sources_of(category_id)


def load_context(session: Session, version_id: int | None) -> VersionContext:
    """Version classes (the given one, else the active one, else none), category names and merge targets."""
    if version_id is None:
        row = session.execute(
            select(ModelVersion.id, ModelVersion.class_category_ids, ModelVersion.metrics)
            .where(ModelVersion.status == VersionStatus.ACTIVE)
            .order_by(ModelVersion.id.desc())
            .limit(1)
        ).first()
    else:
        row = session.execute(
            select(ModelVersion.id, ModelVersion.class_category_ids, ModelVersion.metrics).where(
                ModelVersion.id == int(version_id)
            )
        ).first()
        if row is None:
            raise NotFound(f"no model version {version_id}: see `models list` for the versions")
    categories = session.execute(select(Category.id, Category.name, Category.merged_into_id)).all()
    merges = Merges({int(i): int(t) for i, _, t in categories if t is not None})
    return VersionContext(
        version_id=int(row[0]) if row is not None else None,
        classes=merges.classes(row[1] if row is not None else []),
        names={int(i): n for i, n, _ in categories},
        outlier_threshold=((row[2] or {}).get("label_check") or {}).get("outlier_threshold") if row else None,
    )
