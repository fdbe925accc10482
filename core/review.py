"""Review queues: which images a person should look at next, ordered in SQL by the model's doubt, one page at a time.

Orders (`ReviewOrder`): lowest confidence, smallest margin (top-1 minus top-2), highest entropy, suspected
mislabel (cleanlab label quality, lowest first) and newest. Score orders use the model version's stored
predictions (default: the active version); images without a prediction for that version sort last, by id.
With no model at all there is nothing to rank by, so every order shows the newest uploads first.

Filters, all combinable:
- `label_state`: all, unlabelled, labelled, or disagrees (labelled AND predicted AND prediction != label).
- `category`: the image's *current label* when it has one, otherwise its *prediction* ("what this image is
  filed as, or would be filed as"). An unlabelled image without a prediction matches no category.
- `split`: train, val or test.
- `true_category` / `predicted_category`: the label, resp. the prediction, must be exactly this category (what
  clicking a confusion-matrix cell sets). Either one also implies "has a label" resp. "has a prediction".

Category arguments are names or ids. Merges are followed: a class trained as "Sneakers" and later merged into
"Shoes" counts as a "Shoes" prediction, and filtering on "Sneakers" filters on "Shoes".

Suspected mislabel ranks only images whose prediction is out-of-sample: labelled images of the val and test
splits (test images are never trained on; val images only fit the one-parameter temperature). Train images
are left out on purpose: the model has fitted their labels, wrong ones included, so its probabilities
there agree with mislabels and would hide exactly the errors we look for. Labels in a category the model
has no class for cannot be scored either. Unscored images follow the scored ones, by id.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, Select, String, and_, case, false, func, not_, select, type_coerce
from sqlalchemy.orm import Session

from core.db import Database
from core.errors import NotFound, ProdcatError
from core.labels import resolve_category
from core.schema import Category, Image, Label, ModelVersion, Prediction, Split, VersionStatus

MAX_PAGE_SIZE = 500
OUT_OF_SAMPLE_SPLITS: tuple[str, ...] = (Split.VAL.value, Split.TEST.value)
_SCORE_CHUNK = 5_000  # rows of probabilities parsed and scored at a time


class ReviewOrder(enum.StrEnum):
    """How a review queue is sorted; values are what the CLI accepts."""

    LOWEST_CONFIDENCE = "lowest-confidence"
    SMALLEST_MARGIN = "smallest-margin"
    HIGHEST_ENTROPY = "highest-entropy"
    SUSPECTED_MISLABEL = "suspected-mislabel"
    NEWEST = "newest"


class LabelState(enum.StrEnum):
    """Which images by their label: all, without a label, with one, or with one the prediction disagrees with."""

    ALL = "all"
    UNLABELLED = "unlabelled"
    LABELLED = "labelled"
    DISAGREES = "disagrees"


@dataclass(frozen=True)
class ReviewItem:
    """One image in a review queue, with its label, the version's prediction and the score it was ranked by.

    `score` is the ordering value: confidence, margin, entropy, or the label-quality score (0..1, low = likely
    mislabelled); None for NEWEST and for images that could not be scored. `top3` is (category, probability).
    """

    image_id: int
    original_name: str
    thumb_path: Path
    label: str | None
    predicted: str | None
    confidence: float | None
    margin: float | None
    entropy: float | None
    score: float | None
    split: str
    top3: list[tuple[str, float]] = field(default_factory=list)
    label_category_id: int | None = None
    predicted_category_id: int | None = None
    model_version_id: int | None = None
    created_at: datetime | None = None

    @property
    def disagrees(self) -> bool:
        """Labelled and predicted, and the two differ."""
        return self.label is not None and self.predicted is not None and self.label != self.predicted


@dataclass(frozen=True)
class ReviewPage:
    """One page of a queue: `total` images match the filters, spread over `pages` pages of `page_size`."""

    items: list[ReviewItem]
    total: int
    page: int
    pages: int
    page_size: int = 24
    order: ReviewOrder = ReviewOrder.LOWEST_CONFIDENCE
    version_id: int | None = None


@dataclass(frozen=True)
class _Context:
    """The version the queue is about and the category bookkeeping needed to read its predictions."""

    version_id: int | None
    class_category_ids: list[int]
    merged: dict[int, int]  # archived-by-merge category id -> final live target
    names: dict[int, str]

    def resolve(self, category_id: int) -> int:
        """Follow merges to the category an id stands for today."""
        seen: set[int] = set()
        while category_id in self.merged and category_id not in seen:
            seen.add(category_id)
            category_id = self.merged[category_id]
        return category_id

    @property
    def groups(self) -> list[int]:
        """Distinct current categories of the version's classes, in class order (merged classes share one)."""
        return list(dict.fromkeys(self.resolve(c) for c in self.class_category_ids))

    def class_to_group(self) -> np.ndarray:
        groups = self.groups
        return np.array([groups.index(self.resolve(c)) for c in self.class_category_ids], dtype=np.int64)

    def predicted_expr(self) -> ColumnElement[Any]:
        """Prediction.category_id with merged classes mapped onto their target (in SQL)."""
        remap = {c: self.resolve(c) for c in self.class_category_ids if self.resolve(c) != c}
        if not remap:
            return Prediction.category_id
        return case(remap, value=Prediction.category_id, else_=Prediction.category_id)

    def sources_of(self, category_id: int) -> list[int]:
        """The class category ids a prediction can carry that mean `category_id` today."""
        return [c for c in self.class_category_ids if self.resolve(c) == category_id]


def _enum(kind: type[enum.StrEnum], value: Any, what: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise ProdcatError(f"unknown {what} {value!r}: choose one of {choices}") from None


def _split(value: str | Split | None) -> str | None:
    if value is None or value == "":
        return None
    return str(_enum(Split, value, "split").value)


def load_context(session: Session, version_id: int | None) -> _Context:
    """Version classes (the given one, else the active one, else none), category names and merge targets."""
    if version_id is None:
        row = session.execute(
            select(ModelVersion.id, ModelVersion.class_category_ids)
            .where(ModelVersion.status == VersionStatus.ACTIVE)
            .order_by(ModelVersion.id.desc())
            .limit(1)
        ).first()
    else:
        row = session.execute(
            select(ModelVersion.id, ModelVersion.class_category_ids).where(ModelVersion.id == int(version_id))
        ).first()
        if row is None:
            raise NotFound(f"no model version {version_id}: see `models list` for the versions")
    categories = session.execute(select(Category.id, Category.name, Category.merged_into_id)).all()
    return _Context(
        version_id=int(row[0]) if row is not None else None,
        class_category_ids=[int(c) for c in row[1]] if row is not None else [],
        merged={int(i): int(t) for i, _, t in categories if t is not None},
        names={int(i): n for i, n, _ in categories},
    )


def _category_id(session: Session, ctx: _Context, value: str | int | None) -> int | None:
    if value is None or value == "":
        return None
    return ctx.resolve(resolve_category(session, value).id)


def _prediction_on(ctx: _Context) -> ColumnElement[bool]:
    if ctx.version_id is None:
        return false()  # no model yet: the outer join finds no prediction for any image
    # "+ 0" keeps the version out of index lookups (SQLite's documented idiom): without ANALYZE statistics
    # SQLite takes "model_version_id = ?" as selective and walks all of a version's predictions in index
    # order with a random table read each (~0.25 s at 100k). Prediction rows are found by image id through
    # the (image_id, model_version_id) unique index instead, after the cheap filters on images and labels.
    return and_(Prediction.image_id == Image.id, Prediction.model_version_id + 0 == ctx.version_id)


@dataclass(frozen=True)
class _Filter:
    """WHERE terms plus the joins they need: None (not joined), "outer", or "inner" (the terms imply a row)."""

    conds: list[ColumnElement[bool]]
    label: str | None = None
    prediction: str | None = None


def _join(kind: str | None, wanted: str | None) -> str | None:
    """The stronger of two join needs (inner > outer > none)."""
    ranks = {None: 0, "outer": 1, "inner": 2}
    return kind if ranks[kind] >= ranks[wanted] else wanted


def _joined(
    query: Select[Any], ctx: _Context, label: str | None = "outer", prediction: str | None = "outer"
) -> Select[Any]:
    # Only the joins a query needs, inner where the filters imply the row exists: SQLite can then skip
    # tables and choose the cheaper table to drive the loop from.
    if label is not None:
        query = query.join(Label, Label.image_id == Image.id, isouter=label == "outer")
    if prediction is not None:
        query = query.join(Prediction, _prediction_on(ctx), isouter=prediction == "outer")
    return query


def _conditions(
    ctx: _Context,
    *,
    category_id: int | None,
    label_state: LabelState,
    split: str | None,
    true_id: int | None,
    predicted_id: int | None,
) -> _Filter:
    conds: list[ColumnElement[bool]] = []
    label: str | None = None
    prediction: str | None = None
    if label_state is LabelState.UNLABELLED:
        conds.append(Label.image_id.is_(None))
        label = "outer"
    elif label_state is LabelState.LABELLED:
        label = "inner"
    elif label_state is LabelState.DISAGREES:
        conds.append(ctx.predicted_expr() != Label.category_id)
        label = prediction = "inner"
    if split is not None:
        conds.append(Image.split == split)
    if category_id is not None:
        sources = ctx.sources_of(category_id)
        by_prediction = and_(Label.image_id.is_(None), Prediction.category_id.in_(sources)) if sources else false()
        conds.append((Label.category_id == category_id) | by_prediction)
        label, prediction = _join(label, "outer"), _join(prediction, "outer")
    if true_id is not None:
        conds.append(Label.category_id == true_id)
        label = "inner"
    if predicted_id is not None:
        sources = ctx.sources_of(predicted_id)
        conds.append(Prediction.category_id.in_(sources) if sources else false())
        prediction = "inner"
    return _Filter(conds, label, prediction)


def _scorable(ctx: _Context) -> ColumnElement[bool]:
    """Images the suspected-mislabel score is defined for (see the module docstring)."""
    known = set(ctx.groups)
    label_ids = [cid for cid in ctx.names if ctx.resolve(cid) in known]
    if ctx.version_id is None or not label_ids:
        return false()
    return and_(
        Label.image_id.is_not(None),
        Prediction.id.is_not(None),
        Image.split.in_(OUT_OF_SAMPLE_SPLITS),
        Label.category_id.in_(label_ids),
    )


def _sql_order(order: ReviewOrder) -> list[Any]:
    if order is ReviewOrder.LOWEST_CONFIDENCE:
        return [Prediction.confidence.asc().nulls_last(), Image.id.asc()]
    if order is ReviewOrder.SMALLEST_MARGIN:
        return [Prediction.margin.asc().nulls_last(), Image.id.asc()]
    if order is ReviewOrder.HIGHEST_ENTROPY:
        return [Prediction.entropy.desc().nulls_last(), Image.id.asc()]
    if order is ReviewOrder.NEWEST:
        return [Image.created_at.desc(), Image.id.desc()]
    return [Image.id.asc()]


def label_quality(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """cleanlab's label-quality score per row (0..1, low = the given label is likely wrong).

    Uses models.metrics.label_quality_scores when the models library provides it, cleanlab directly otherwise.
    """
    if len(labels) == 0:
        return np.zeros(0)
    try:
        from models.metrics import label_quality_scores
    except ImportError:  # the models library may not offer it (yet): same cleanlab call
        from cleanlab.rank import get_label_quality_scores as label_quality_scores
    return np.asarray(label_quality_scores(np.asarray(labels, dtype=np.int64), np.asarray(probs)), dtype=np.float64)


def _mislabel_scores(session: Session, ctx: _Context, flt: _Filter) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, quality scores) of every scorable image matching the filters, lowest score first."""
    groups = ctx.groups
    group_of_class = ctx.class_to_group()
    # The raw JSON text of the probabilities: parsed below in one go per chunk.
    columns = select(Image.id, Label.category_id, type_coerce(Prediction.probs, String)).select_from(Image)
    query = _joined(columns, ctx, "inner", "inner").where(*flt.conds, _scorable(ctx))
    ids_parts: list[np.ndarray] = []
    score_parts: list[np.ndarray] = []
    for chunk in session.execute(query.execution_options(yield_per=_SCORE_CHUNK)).partitions():
        ids = np.fromiter((r[0] for r in chunk), dtype=np.int64, count=len(chunk))
        labels = np.fromiter((groups.index(ctx.resolve(int(r[1]))) for r in chunk), dtype=np.int64, count=len(chunk))
        # One json.loads for the whole chunk instead of one per row.
        raw = np.asarray(json.loads("[" + ",".join(r[2] for r in chunk) + "]"), dtype=np.float64)
        probs = np.zeros((len(chunk), len(groups)))
        np.add.at(probs.T, group_of_class, raw.T)  # merged classes add their probabilities up
        probs /= np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)
        ids_parts.append(ids)
        score_parts.append(label_quality(labels, probs))
    if not ids_parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    ids, scores = np.concatenate(ids_parts), np.concatenate(score_parts)
    ranked = np.lexsort((ids, scores))
    return ids[ranked], scores[ranked]


def _items(
    session: Session, ctx: _Context, data_dir: Path, ids: Sequence[int], scores: dict[int, float], order: ReviewOrder
) -> list[ReviewItem]:
    if not ids:
        return []
    rows = session.execute(
        _joined(
            select(
                Image.id,
                Image.original_name,
                Image.thumb_path,
                Image.split,
                Image.created_at,
                Label.category_id,
                Prediction.category_id,
                Prediction.confidence,
                Prediction.margin,
                Prediction.entropy,
                Prediction.probs,
            ).select_from(Image),
            ctx,
        ).where(Image.id.in_(list(ids)))
    ).all()
    by_id = {int(r[0]): r for r in rows}
    groups = ctx.groups
    group_of_class = ctx.class_to_group() if groups else np.zeros(0, dtype=np.int64)
    items = []
    for image_id in ids:
        r = by_id.get(int(image_id))
        if r is None:  # deleted between the two queries
            continue
        label_id = int(r[5]) if r[5] is not None else None
        pred_id = ctx.resolve(int(r[6])) if r[6] is not None else None
        top3: list[tuple[str, float]] = []
        if r[10] is not None and len(r[10]) == len(group_of_class):
            summed = np.zeros(len(groups))
            np.add.at(summed, group_of_class, np.asarray(r[10], dtype=np.float64))
            top3 = [(ctx.names.get(groups[j], "?"), float(summed[j])) for j in np.argsort(-summed, kind="stable")[:3]]
        if order is ReviewOrder.SUSPECTED_MISLABEL:
            score = scores.get(int(image_id))
        else:
            score = {
                ReviewOrder.LOWEST_CONFIDENCE: r[7],
                ReviewOrder.SMALLEST_MARGIN: r[8],
                ReviewOrder.HIGHEST_ENTROPY: r[9],
            }.get(order)
        items.append(
            ReviewItem(
                image_id=int(image_id),
                original_name=r[1],
                thumb_path=data_dir / r[2],
                label=ctx.names.get(label_id) if label_id is not None else None,
                predicted=ctx.names.get(pred_id) if pred_id is not None else None,
                confidence=r[7],
                margin=r[8],
                entropy=r[9],
                score=float(score) if score is not None else None,
                split=r[3],
                top3=top3,
                label_category_id=label_id,
                predicted_category_id=pred_id,
                model_version_id=ctx.version_id if pred_id is not None else None,
                created_at=r[4],
            )
        )
    return items


def review_items(db: Database, image_ids: Sequence[int], *, version_id: int | None = None) -> list[ReviewItem]:
    """The review-card data of the given images, in the order given, with the predictions the version (default:
    the active one) stored for them. Unknown ids are left out; `score` is None (nothing ranks them).

    Raises NotFound for an unknown version.
    """
    ids = list(dict.fromkeys(int(i) for i in image_ids))  # an image twice in a batch shows once
    with db.read() as session:
        ctx = load_context(session, version_id)
        return _items(session, ctx, db.settings.data_dir, ids, {}, ReviewOrder.NEWEST)


@dataclass(frozen=True)
class BatchTargets:
    """The photos a "label these" action on an upload batch changes, and how many duplicates it leaves alone."""

    image_ids: list[int]
    kept_duplicates: int = 0


def batch_targets(
    items: Sequence[ReviewItem], *, selected: Collection[int], duplicate_ids: Collection[int]
) -> BatchTargets:
    """What "apply to selection" on an upload batch labels: the ticked photos, or with none ticked the whole batch
    except duplicates of catalogue images that already have a label (earlier work, not part of this upload: one
    click must not overwrite it). Ticking such a duplicate still relabels it on purpose.
    """
    if selected:
        chosen = set(selected)
        return BatchTargets([item.image_id for item in items if item.image_id in chosen])
    duplicates = set(duplicate_ids)
    kept = {item.image_id for item in items if item.image_id in duplicates and item.label is not None}
    return BatchTargets([item.image_id for item in items if item.image_id not in kept], len(kept))


def review_queue(
    db: Database,
    *,
    order: ReviewOrder | str = ReviewOrder.LOWEST_CONFIDENCE,
    category: str | int | None = None,
    label_state: LabelState | str = LabelState.ALL,
    split: Split | str | None = None,
    true_category: str | int | None = None,
    predicted_category: str | int | None = None,
    page: int = 1,
    page_size: int = 24,
    version_id: int | None = None,
) -> ReviewPage:
    """One page of the images to review, filtered and ordered (see the module docstring for every rule).

    Sorting and paging run in SQL on the prediction indexes (the suspected-mislabel order scores the
    out-of-sample candidates with numpy, in chunks). A page past the end shows the last page. Raises
    ProdcatError for an unknown order/state/split or a bad page, NotFound for an unknown category or version.
    """
    order = _enum(ReviewOrder, order, "review order")
    label_state = _enum(LabelState, label_state, "label state")
    split_value = _split(split)
    if not 1 <= int(page_size) <= MAX_PAGE_SIZE:
        raise ProdcatError(f"page size {page_size} is out of range: use 1 to {MAX_PAGE_SIZE}")
    if int(page) < 1:
        raise ProdcatError(f"page {page} does not exist: pages start at 1")
    page_size = int(page_size)
    with db.read() as session:
        ctx = load_context(session, version_id)
        flt = _conditions(
            ctx,
            category_id=_category_id(session, ctx, category),
            label_state=label_state,
            split=split_value,
            true_id=_category_id(session, ctx, true_category),
            predicted_id=_category_id(session, ctx, predicted_category),
        )
        # No model yet: every image is unscored, so the newest uploads come first whatever the order asked.
        sort = order if ctx.version_id is not None else ReviewOrder.NEWEST
        counted = _joined(select(func.count()).select_from(Image), ctx, flt.label, flt.prediction)
        total = int(session.scalar(counted.where(*flt.conds)) or 0)
        pages = max(1, math.ceil(total / page_size))
        page = min(int(page), pages)
        offset = (page - 1) * page_size
        scores: dict[int, float] = {}
        if sort is ReviewOrder.SUSPECTED_MISLABEL:
            ranked_ids, ranked_scores = _mislabel_scores(session, ctx, flt)
            window = slice(offset, offset + page_size)
            ids = [int(i) for i in ranked_ids[window]]
            scores = {int(i): float(v) for i, v in zip(ranked_ids[window], ranked_scores[window], strict=True)}
            if len(ids) < page_size:
                rest = session.scalars(
                    _joined(
                        select(Image.id).select_from(Image),
                        ctx,
                        _join(flt.label, "outer"),
                        _join(flt.prediction, "outer"),
                    )
                    .where(*flt.conds, not_(_scorable(ctx)))
                    .order_by(Image.id)
                    .offset(max(0, offset - len(ranked_ids)))
                    .limit(page_size - len(ids))
                )
                ids += [int(i) for i in rest]
        else:
            needs_prediction = _join(flt.prediction, None if sort is ReviewOrder.NEWEST else "outer")
            ids = [
                int(i)
                for i in session.scalars(
                    _joined(select(Image.id).select_from(Image), ctx, flt.label, needs_prediction)
                    .where(*flt.conds)
                    .order_by(*_sql_order(sort))
                    .offset(offset)
                    .limit(page_size)
                )
            ]
        items = _items(session, ctx, db.settings.data_dir, ids, scores, order)
    return ReviewPage(
        items=items, total=total, page=page, pages=pages, page_size=page_size, order=order, version_id=ctx.version_id
    )
