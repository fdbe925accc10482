"""Categories as they are today: merged categories resolve to the one they went into (Merges), and a model's
classes group into today's categories (ClassGroups). Every reader of labels or predictions resolves through
these."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import Database
from core.schema import Category


def category_names(db: Database) -> dict[int, str]:
    """Current names of every category (renames show under the new name)."""
    with db.read() as session:
        return {int(i): n for i, n in session.execute(select(Category.id, Category.name))}


@dataclass(frozen=True)
class Merges:
    """Which category was merged into which. A class trained as 'Sneakers' and later merged into 'Shoes' stands for
    'Shoes' today: every reader of labels or predictions resolves categories through this one rule."""

    targets: dict[int, int] = field(default_factory=dict)  # merged category id -> the category it went into

    @classmethod
    def load(cls, db: Database) -> Merges:
        with db.read() as session:
            return cls.of(session)

    @classmethod
    def of(cls, session: Session) -> Merges:
        rows = session.execute(select(Category.id, Category.merged_into_id).where(Category.merged_into_id.is_not(None)))
        return cls({int(i): int(t) for i, t in rows if t is not None})  # the query keeps merged ones only

    def resolve(self, category_id: int) -> int:
        """The live category an id stands for today (merges followed to the end)."""
        seen: set[int] = set()
        category_id = int(category_id)
        while category_id in self.targets and category_id not in seen:
            seen.add(category_id)
            category_id = self.targets[category_id]
        return category_id

    def classes(self, class_category_ids: Sequence[int]) -> ClassGroups:
        return ClassGroups(tuple(int(c) for c in class_category_ids), self)


@dataclass(frozen=True)
class ClassGroups:
    """A version's classes as today's categories: classes whose categories were merged form one group, and the
    group's probability is the sum of theirs. `groups` are category ids in class order."""

    class_category_ids: tuple[int, ...]
    merges: Merges

    @functools.cached_property
    def groups(self) -> list[int]:
        return list(dict.fromkeys(self.merges.resolve(c) for c in self.class_category_ids))

    @functools.cached_property
    def class_to_group(self) -> np.ndarray:
        """Per class, the index of its group in `groups`."""
        position = {g: n for n, g in enumerate(self.groups)}
        return np.array([position[self.merges.resolve(c)] for c in self.class_category_ids], dtype=np.int64)

    def group_probs(self, probs: np.ndarray, *, columns: Sequence[int] | None = None) -> np.ndarray:
        """(N, len(columns)) probabilities per category: merged classes added up. `columns` (category ids, default
        `groups`) may list categories the model has no class for: their column stays 0."""
        probs = np.asarray(probs, dtype=np.float64).reshape(-1, len(self.class_category_ids))
        columns = list(self.groups if columns is None else columns)
        position = {c: n for n, c in enumerate(columns)}
        out = np.zeros((len(probs), len(columns)))
        for j, category in enumerate(self.class_category_ids):
            out[:, position[self.merges.resolve(category)]] += probs[:, j]
        return out

    def sources_of(self, category_id: int) -> list[int]:
        """The class category ids a prediction can carry that mean `category_id` today."""
        return [c for c in self.class_category_ids if self.merges.resolve(c) == category_id]
