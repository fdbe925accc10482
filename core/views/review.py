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
- `search`: "#123" is image 123; "sku:AB-1" is a SKU that is or starts with "AB-1" (case as typed, through the
  SKU index); any other text is a case-insensitive part of the original file name or the beginning of a SKU, and
  "123" is also image 123.

Category arguments are names or ids. Merges are followed: a class trained as "Sneakers" and later merged into
"Shoes" counts as a "Shoes" prediction, and filtering on "Sneakers" filters on "Shoes".

Suspected mislabel and most unusual read the version's label check (`image_checks`, written after every retrain
from K-fold out-of-sample probabilities: see core/ml/label_checks.py), so every labelled image is ranked, train split
included, lowest label quality first. A label changed since the check is a person's newer word: it is no longer
ranked as suspect. The `label-issues` state keeps only the images the check counted as likely label errors (and
whose label is unchanged). Images without a check follow the checked ones, by id.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import ColumnElement, Select, and_, case, false, func, select
from sqlalchemy.orm import Session

from core.catalog.labels import resolve_category
from core.catalog.skus import sku_condition
from core.db import Database
from core.errors import ProdcatError
from core.ml.context import VersionContext, load_context
from core.schema import Image, ImageCheck, Label, Prediction, Split

MAX_PAGE_SIZE = 500
OUT_OF_SAMPLE_SPLITS: tuple[str, ...] = (Split.VAL.value, Split.TEST.value)


class ReviewOrder(enum.StrEnum):
    """How a review queue is sorted; values are what the CLI accepts."""

    LOWEST_CONFIDENCE = "lowest-confidence"
    SMALLEST_MARGIN = "smallest-margin"
    HIGHEST_ENTROPY = "highest-entropy"
    SUSPECTED_MISLABEL = "suspected-mislabel"
    MOST_UNUSUAL = "most-unusual"
    NEWEST = "newest"


class LabelState(enum.StrEnum):
    """Which images by their label: all, without a label, with one, with one the prediction disagrees with, or with one
    the label check counts as a likely label error."""

    ALL = "all"
    UNLABELLED = "unlabelled"
    LABELLED = "labelled"
    DISAGREES = "disagrees"
    LABEL_ISSUES = "label-issues"


@dataclass(frozen=True)
class Suggestion:
    """The label check's view of a labelled image: its label's quality (0..1, low = likely wrong), whether it counts
    as a likely label error, and the category the image probably should have (with its out-of-sample probability)."""

    quality: float
    issue: bool
    category_id: int
    category: str
    probability: float


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
    suggestion: Suggestion | None = None
    outlier_score: float | None = None
    unusual: bool = False  # unlike anything labelled so far (outlier score above the version's threshold)
    sku: str | None = None  # the product's SKU (labels CSV, `images set-sku`)

    @property
    def suggests_change(self) -> bool:
        """The label check would file this image under another category than its label (one click accepts that)."""
        return self.suggestion is not None and self.suggestion.category_id != self.label_category_id

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


_E = TypeVar("_E", bound=enum.StrEnum)


def _enum(kind: type[_E], value: str, what: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise ProdcatError(f"unknown {what} {value!r}: choose one of {choices}") from None


def _split(value: str | Split | None) -> str | None:
    if value is None or value == "":
        return None
    return str(_enum(Split, value, "split").value)


def _category_id(session: Session, ctx: VersionContext, value: str | int | None) -> int | None:
    if value is None or value == "":
        return None
    return ctx.resolve(resolve_category(session, value).id)


def _prediction_on(ctx: VersionContext) -> ColumnElement[bool]:
    if ctx.version_id is None:
        return false()  # no model yet: the outer join finds no prediction for any image
    # "+ 0" keeps the version out of index lookups (SQLite's documented idiom): without ANALYZE statistics
    # SQLite takes "model_version_id = ?" as selective and walks all of a version's predictions in index
    # order with a random table read each (~0.25 s at 100k). Prediction rows are found by image id through
    # the (image_id, model_version_id) unique index instead, after the cheap filters on images and labels.
    return and_(Prediction.image_id == Image.id, Prediction.model_version_id + 0 == ctx.version_id)


def _check_on(ctx: VersionContext) -> ColumnElement[bool]:
    if ctx.version_id is None:
        return false()
    return and_(ImageCheck.image_id == Image.id, ImageCheck.model_version_id + 0 == ctx.version_id)  # see above


def _current_quality() -> ColumnElement[Any]:
    """The checked label's quality while the label is unchanged since the check, else NULL (not a suspect)."""
    return case((ImageCheck.label_category_id == Label.category_id, ImageCheck.label_quality), else_=None)


@dataclass(frozen=True)
class _Filter:
    """WHERE terms plus the joins they need: None (not joined), "outer", or "inner" (the terms imply a row)."""

    conds: list[ColumnElement[bool]]
    label: str | None = None
    prediction: str | None = None
    check: str | None = None


def _join(kind: str | None, wanted: str | None) -> str | None:
    """The stronger of two join needs (inner > outer > none)."""
    ranks = {None: 0, "outer": 1, "inner": 2}
    return kind if ranks[kind] >= ranks[wanted] else wanted


def _joined(
    query: Select[Any],
    ctx: VersionContext,
    label: str | None = "outer",
    prediction: str | None = "outer",
    check: str | None = None,
) -> Select[Any]:
    # Only the joins a query needs, inner where the filters imply the row exists: SQLite can then skip
    # tables and choose the cheaper table to drive the loop from.
    if label is not None:
        query = query.join(Label, Label.image_id == Image.id, isouter=label == "outer")
    if prediction is not None:
        query = query.join(Prediction, _prediction_on(ctx), isouter=prediction == "outer")
    if check is not None:
        query = query.join(ImageCheck, _check_on(ctx), isouter=check == "outer")
    return query


SKU_SEARCH_PREFIX = "sku:"  # "sku:AB-1" searches SKUs only


def search_condition(search: str | None) -> ColumnElement[bool] | None:
    """WHERE term on `Image` for a search box: "#123" is image 123; "sku:AB-1" a SKU that is or starts with "AB-1"
    (core.catalog.skus.sku_condition: the index alone); other text is a case-insensitive part of the original file name
    (LIKE
    wildcards in it are literal) or the beginning of a SKU, and "123" is also image 123. None for an empty search."""
    text = (search or "").strip()
    if not text:
        return None
    if text.startswith("#") and text[1:].strip().isdigit():
        return Image.id == int(text[1:].strip())
    if text[: len(SKU_SEARCH_PREFIX)].lower() == SKU_SEARCH_PREFIX and text[len(SKU_SEARCH_PREFIX) :].strip():
        return sku_condition(text[len(SKU_SEARCH_PREFIX) :])
    found = Image.original_name.icontains(text, autoescape=True) | sku_condition(text)
    return (Image.id == int(text)) | found if text.isdigit() else found


def _conditions(
    ctx: VersionContext,
    *,
    category_id: int | None,
    label_state: LabelState,
    split: str | None,
    true_id: int | None,
    predicted_id: int | None,
    search: str | None = None,
) -> _Filter:
    conds: list[ColumnElement[bool]] = []
    if (found := search_condition(search)) is not None:
        conds.append(found)
    label: str | None = None
    prediction: str | None = None
    check: str | None = None
    if label_state is LabelState.LABEL_ISSUES:
        conds += [ImageCheck.label_issue.is_(True), ImageCheck.label_category_id == Label.category_id]
        label = check = "inner"
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
    return _Filter(conds, label, prediction, check)


def _order_joins(order: ReviewOrder, flt: _Filter) -> tuple[str | None, str | None, str | None]:
    """(label, prediction, check) joins a sorted page query needs: the filters' plus the sort key's."""
    if order is ReviewOrder.NEWEST:
        return flt.label, flt.prediction, flt.check
    if order is ReviewOrder.SUSPECTED_MISLABEL:
        return _join(flt.label, "outer"), flt.prediction, _join(flt.check, "outer")
    if order is ReviewOrder.MOST_UNUSUAL:
        return flt.label, flt.prediction, _join(flt.check, "outer")
    return flt.label, _join(flt.prediction, "outer"), flt.check


def _sql_order(order: ReviewOrder) -> list[Any]:
    if order is ReviewOrder.LOWEST_CONFIDENCE:
        return [Prediction.confidence.asc().nulls_last(), Image.id.asc()]
    if order is ReviewOrder.SMALLEST_MARGIN:
        return [Prediction.margin.asc().nulls_last(), Image.id.asc()]
    if order is ReviewOrder.HIGHEST_ENTROPY:
        return [Prediction.entropy.desc().nulls_last(), Image.id.asc()]
    if order is ReviewOrder.SUSPECTED_MISLABEL:
        return [_current_quality().asc().nulls_last(), Image.id.asc()]
    if order is ReviewOrder.MOST_UNUSUAL:
        return [ImageCheck.outlier_score.desc().nulls_last(), Image.id.asc()]
    if order is ReviewOrder.NEWEST:
        return [Image.created_at.desc(), Image.id.desc()]
    return [Image.id.asc()]


_ITEM_COLUMNS = (
    Image.id.label("image_id"),
    Image.original_name,
    Image.sku,
    Image.thumb_path,
    Image.split,
    Image.created_at,
    Label.category_id.label("label_id"),
    Prediction.category_id.label("predicted_id"),
    Prediction.confidence,
    Prediction.margin,
    Prediction.entropy,
    Prediction.probs,
    ImageCheck.label_category_id.label("checked_label_id"),
    ImageCheck.label_quality,
    ImageCheck.label_issue,
    ImageCheck.suggested_category_id,
    ImageCheck.suggested_probability,
    ImageCheck.outlier_score,
)


def _top3(ctx: VersionContext, probs: list[float] | None) -> list[tuple[str, float]]:
    """The three likeliest categories today (merged classes add their probabilities up)."""
    groups = ctx.groups
    if probs is None or not groups or len(probs) != len(ctx.classes.class_category_ids):
        return []
    summed = ctx.classes.group_probs(np.asarray(probs))[0]
    return [(ctx.names.get(groups[j], "?"), float(summed[j])) for j in np.argsort(-summed, kind="stable")[:3]]


def _suggestion(ctx: VersionContext, r: Any) -> Suggestion | None:
    """The check's finding while the label it checked is still the image's label."""
    if r.label_quality is None or r.checked_label_id is None or r.checked_label_id != r.label_id:
        return None
    target = ctx.resolve(int(r.suggested_category_id))
    return Suggestion(
        quality=float(r.label_quality),
        issue=bool(r.label_issue),
        category_id=target,
        category=ctx.names.get(target, "?"),
        probability=float(r.suggested_probability or 0.0),
    )


def _item(ctx: VersionContext, data_dir: Path, r: Any, order: ReviewOrder) -> ReviewItem:
    label_id = int(r.label_id) if r.label_id is not None else None
    pred_id = ctx.resolve(int(r.predicted_id)) if r.predicted_id is not None else None
    suggestion = _suggestion(ctx, r)
    score = {
        ReviewOrder.LOWEST_CONFIDENCE: r.confidence,
        ReviewOrder.SMALLEST_MARGIN: r.margin,
        ReviewOrder.HIGHEST_ENTROPY: r.entropy,
        ReviewOrder.SUSPECTED_MISLABEL: suggestion.quality if suggestion else None,
        ReviewOrder.MOST_UNUSUAL: r.outlier_score,
    }.get(order)
    return ReviewItem(
        image_id=int(r.image_id),
        original_name=r.original_name,
        thumb_path=data_dir / r.thumb_path,
        label=ctx.names.get(label_id) if label_id is not None else None,
        predicted=ctx.names.get(pred_id) if pred_id is not None else None,
        confidence=r.confidence,
        margin=r.margin,
        entropy=r.entropy,
        score=float(score) if score is not None else None,
        split=r.split,
        top3=_top3(ctx, r.probs),
        label_category_id=label_id,
        predicted_category_id=pred_id,
        model_version_id=ctx.version_id if pred_id is not None else None,
        created_at=r.created_at,
        suggestion=suggestion,
        outlier_score=r.outlier_score,
        sku=r.sku,
        unusual=ctx.outlier_threshold is not None
        and r.outlier_score is not None
        and r.outlier_score > ctx.outlier_threshold,
    )


def _items(
    session: Session, ctx: VersionContext, data_dir: Path, ids: Sequence[int], order: ReviewOrder
) -> list[ReviewItem]:
    """The cards of these images, in this order (an image deleted meanwhile is left out)."""
    if not ids:
        return []
    query = _joined(select(*_ITEM_COLUMNS).select_from(Image), ctx, check="outer")
    by_id = {int(r.image_id): r for r in session.execute(query.where(Image.id.in_(list(ids))))}
    return [_item(ctx, data_dir, by_id[int(i)], order) for i in ids if int(i) in by_id]


def review_items(db: Database, image_ids: Sequence[int], *, version_id: int | None = None) -> list[ReviewItem]:
    """The review-card data of the given images, in the order given, with the predictions the version (default:
    the active one) stored for them. Unknown ids are left out; `score` is None (nothing ranks them).

    Raises NotFound for an unknown version.
    """
    ids = list(dict.fromkeys(int(i) for i in image_ids))  # an image twice in a batch shows once
    with db.read() as session:
        ctx = load_context(session, version_id)
        return _items(session, ctx, db.settings.data_dir, ids, ReviewOrder.NEWEST)


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
    search: str | None = None,
) -> ReviewPage:
    """One page of the images to review, filtered and ordered (see the module docstring for every rule).

    Sorting and paging run in SQL, on the stored predictions and label checks. A page past the end shows the last
    page. Raises
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
            search=search,
        )
        # No model yet: every image is unscored, so the newest uploads come first whatever the order asked.
        sort = order if ctx.version_id is not None else ReviewOrder.NEWEST
        counted = _joined(select(func.count()).select_from(Image), ctx, flt.label, flt.prediction, flt.check)
        total = int(session.scalar(counted.where(*flt.conds)) or 0)
        pages = max(1, math.ceil(total / page_size))
        page = min(int(page), pages)
        label, prediction, check = _order_joins(sort, flt)
        ids = [
            int(i)
            for i in session.scalars(
                _joined(select(Image.id).select_from(Image), ctx, label, prediction, check)
                .where(*flt.conds)
                .order_by(*_sql_order(sort))
                .offset((page - 1) * page_size)
                .limit(page_size)
            )
        ]
        items = _items(session, ctx, db.settings.data_dir, ids, order)
    return ReviewPage(
        items=items, total=total, page=page, pages=pages, page_size=page_size, order=order, version_id=ctx.version_id
    )
