"""Data for the dashboard (its plotly figures are core.views.figures): confusion matrix, per-class metrics, history,
balance, calibration, corrections per day. Pages call `dashboard(db)` (or one function per chart) and render what
comes back.

Where the numbers come from:
- Confusion matrix, per-class table and calibration are *recomputed* from the current labels and the version's
  stored predictions on the labelled images of the test split, so a label corrected today shows up today
  (the metrics stored with a version are a snapshot taken at training time). Only when a version has no stored
  predictions on labelled test images do we fall back to its stored `metrics["test"]["confusion_matrix"]`.
  Labels in archived categories are left out, like `core.ml.versions.labelled_images`; merged classes count as
  their target category; labels in a category the model has no class for count as errors (an extra column).
- Accuracy / macro F1 per version over time come from each version's stored test metrics: every version was
  measured on the same fixed test split, at its own time.
- Label changes and corrections are defined once, in `core.catalog.corrections` (the training plan counts the same):
  a person's set/bulk/clear that still stands; a correction changed an existing label or overrode the shown
  prediction. Imports, merges, renames, undos and the changes undone are not counted. Days are UTC dates.

Everything returns None or an empty frame on an empty database or before the first model.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from core.catalog.corrections import correction_clause, label_change_clause
from core.catalog.stats import catalogue_stats
from core.db import Database
from core.errors import NotFound
from core.ml.context import load_context
from core.ml.versions import VersionView
from core.schema import Category, Image, Label, LabelEvent, ModelVersion, Prediction, Split, VersionStatus
from core.views.review import LabelState, ReviewOrder
from models.metrics import ECE_BINS, calibration_bins, calibration_error

DEFAULT_DAYS = 90


# --- recomputed evaluation of one version ----------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """A version's stored predictions against current labels on one split (rows aligned; indices into classes)."""

    version_id: int
    split: str
    class_names: list[str]
    y_true: np.ndarray
    y_pred: np.ndarray
    confidence: np.ndarray
    image_ids: np.ndarray

    @property
    def n_images(self) -> int:
        return len(self.y_true)


def evaluation(db: Database, *, version_id: int | None = None, split: Split | str = Split.TEST) -> Evaluation | None:
    """Labelled images of `split` that have a prediction from the version (default: active); None without a version."""
    split_value = Split(split).value
    with db.read() as session:
        ctx = load_context(session, version_id)
        if ctx.version_id is None:
            return None
        rows = session.execute(
            select(Image.id, Label.category_id, Prediction.category_id, Prediction.confidence)
            .select_from(Image)
            .join(Label, Label.image_id == Image.id)
            .join(Category, Category.id == Label.category_id)
            # "+ 0": find predictions by image id, not by walking the whole version (see core.views.review).
            .join(Prediction, (Prediction.image_id == Image.id) & (Prediction.model_version_id + 0 == ctx.version_id))
            .where(Image.split == split_value, Category.archived_at.is_(None))
            .order_by(Image.id)
        ).all()
    columns = list(ctx.groups)
    for _, label_id, _, _ in rows:
        if ctx.resolve(int(label_id)) not in columns:
            columns.append(ctx.resolve(int(label_id)))  # a category the model has no class for
    index = {c: j for j, c in enumerate(columns)}
    return Evaluation(
        version_id=ctx.version_id,
        split=split_value,
        class_names=[ctx.names.get(c, str(c)) for c in columns],
        y_true=np.array([index[ctx.resolve(int(r[1]))] for r in rows], dtype=np.int64),
        y_pred=np.array([index[ctx.resolve(int(r[2]))] for r in rows], dtype=np.int64),
        confidence=np.array([float(r[3]) for r in rows], dtype=np.float64),
        image_ids=np.array([int(r[0]) for r in rows], dtype=np.int64),
    )


# --- confusion matrix --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfusionData:
    """Counts[true, predicted] over `class_names`; `source` is "predictions" (recomputed) or "stored metrics"."""

    version_id: int
    split: str
    class_names: list[str]
    counts: np.ndarray
    source: str = "predictions"

    @property
    def n_images(self) -> int:
        return int(self.counts.sum())

    @property
    def normalised(self) -> np.ndarray:
        """Row-normalised: the share of each true category predicted as each category (empty rows stay 0)."""
        totals = self.counts.sum(axis=1, keepdims=True)
        return np.divide(self.counts, totals, out=np.zeros(self.counts.shape), where=totals > 0)

    @property
    def accuracy(self) -> float | None:
        return float(np.trace(self.counts) / self.n_images) if self.n_images else None

    def to_frame(self, *, normalised: bool = False) -> pd.DataFrame:
        """Rows: true category; columns: predicted category."""
        values = self.normalised if normalised else self.counts
        frame = pd.DataFrame(values, index=self.class_names, columns=self.class_names)
        frame.index.name, frame.columns.name = "true", "predicted"
        return frame


def _confusion_from(ev: Evaluation) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    labels = list(range(len(ev.class_names)))
    if ev.n_images == 0:
        return np.zeros((len(labels), len(labels)), dtype=np.int64)
    return confusion_matrix(ev.y_true, ev.y_pred, labels=labels).astype(np.int64)


def _stored_confusion(db: Database, version_id: int, split: str) -> ConfusionData | None:
    with db.read() as session:
        row = session.get(ModelVersion, version_id)
        metrics = ((row.metrics or {}).get(split) or {}) if row is not None else {}
        matrix = metrics.get("confusion_matrix")
        names = metrics.get("class_names") or (list(row.class_names) if row is not None else [])
    if not matrix or len(matrix) != len(names):
        return None
    return ConfusionData(version_id, split, list(names), np.asarray(matrix, dtype=np.int64), "stored metrics")


def confusion_matrix_data(
    db: Database, *, version_id: int | None = None, split: Split | str = Split.TEST
) -> ConfusionData | None:
    """The version's confusion matrix on `split` (see the module docstring for where it comes from)."""
    ev = evaluation(db, version_id=version_id, split=split)
    if ev is None:
        return None
    if ev.n_images == 0:
        return _stored_confusion(db, ev.version_id, ev.split)
    return ConfusionData(ev.version_id, ev.split, ev.class_names, _confusion_from(ev))


@dataclass(frozen=True)
class ReviewFilters:
    """Review-queue arguments for one confusion-matrix cell: `review_queue(db, **filters.as_kwargs())`."""

    true_category: str
    predicted_category: str
    split: str
    label_state: LabelState
    order: ReviewOrder
    version_id: int | None = None

    def as_kwargs(self) -> dict[str, Any]:
        return {
            "true_category": self.true_category,
            "predicted_category": self.predicted_category,
            "split": self.split,
            "label_state": self.label_state,
            "order": self.order,
            "version_id": self.version_id,
        }


def cell_review_filters(
    true_name: str, predicted_name: str, *, split: Split | str = Split.TEST, version_id: int | None = None
) -> ReviewFilters:
    """What a click on cell (true, predicted) shows: those labelled images of the split.

    Off-diagonal cells (errors) are ordered suspected-mislabel first, so the confident "errors" that are
    really wrong labels come up first; diagonal cells lowest confidence first (right, but barely).
    """
    diagonal = true_name == predicted_name
    return ReviewFilters(
        true_category=true_name,
        predicted_category=predicted_name,
        split=Split(split).value,
        label_state=LabelState.LABELLED,
        order=ReviewOrder.LOWEST_CONFIDENCE if diagonal else ReviewOrder.SUSPECTED_MISLABEL,
        version_id=version_id,
    )


def cell_filters_for_point(data: ConfusionData, point: Mapping[str, Any]) -> ReviewFilters:
    """The review filters for a point selected in `confusion_figure` (one entry of `st.plotly_chart`'s selection).

    The point's index names the cell (markers are row-major); its x and y are the escaped names the figure shows,
    used only when no index came with it. No version is pinned: the review page follows whichever version is
    active when it reads the filters, so a cell opened before a retrain or a rollback shows the serving model's view.
    """
    n = len(data.class_names)
    index = point.get("point_index")
    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < n * n:
        true_name, predicted_name = data.class_names[index // n], data.class_names[index % n]
    else:
        true_name, predicted_name = html.unescape(str(point["y"])), html.unescape(str(point["x"]))
    return cell_review_filters(true_name, predicted_name, split=data.split)


# --- per-class metrics ---------------------------------------------------------------------------------------

PER_CLASS_COLUMNS = ["category", "precision", "recall", "f1", "support"]


def per_class_table(ev: Evaluation | None) -> pd.DataFrame:
    """Precision, recall, F1 and support per category (sklearn), plus "macro avg" as the last row."""
    if ev is None or ev.n_images == 0:
        return pd.DataFrame(columns=PER_CLASS_COLUMNS)
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(len(ev.class_names)))
    p, r, f, s = precision_recall_fscore_support(ev.y_true, ev.y_pred, labels=labels, zero_division=0)
    frame = pd.DataFrame({"category": ev.class_names, "precision": p, "recall": r, "f1": f, "support": s})
    macro = {"category": "macro avg", "precision": p.mean(), "recall": r.mean(), "f1": f.mean(), "support": s.sum()}
    return pd.concat([frame, pd.DataFrame([macro])], ignore_index=True)


def summary_scores(ev: Evaluation | None) -> dict[str, float | int | None]:
    """Accuracy, macro F1 and image count of an evaluation (None values when there is nothing to measure)."""
    if ev is None or ev.n_images == 0:
        return {"accuracy": None, "macro_f1": None, "n_images": 0}
    from sklearn.metrics import accuracy_score, f1_score

    labels = list(range(len(ev.class_names)))
    return {
        "accuracy": float(accuracy_score(ev.y_true, ev.y_pred)),
        "macro_f1": float(f1_score(ev.y_true, ev.y_pred, labels=labels, average="macro", zero_division=0)),
        "n_images": ev.n_images,
    }


# --- history of versions -------------------------------------------------------------------------------------

HISTORY_COLUMNS = ["version", "created_at", "status", "mode", "arch", "accuracy", "macro_f1", "ece", "n_test"]


def version_history(db: Database) -> pd.DataFrame:
    """Test accuracy, macro F1 and ECE of every version as stored at its training, oldest first."""
    with db.read() as session:
        rows: Sequence[tuple[int, datetime, str, str, str, float | None, dict[str, Any] | None]] = session.execute(
            select(
                ModelVersion.id,
                ModelVersion.created_at,
                ModelVersion.status,
                ModelVersion.mode,
                ModelVersion.arch,
                ModelVersion.test_accuracy,
                ModelVersion.metrics,
            ).order_by(ModelVersion.id)
        ).all()
    records = []
    for vid, created, status, mode, arch, accuracy, metrics in rows:
        test = (metrics or {}).get("test") or {}
        records.append(
            {
                "version": int(vid),
                "created_at": created,
                "status": status,
                "mode": mode,
                "arch": arch,
                "accuracy": accuracy if accuracy is not None else test.get("accuracy"),
                "macro_f1": test.get("macro_f1"),
                "ece": test.get("ece"),
                "n_test": test.get("n_images"),
            }
        )
    return pd.DataFrame(records, columns=HISTORY_COLUMNS)


# --- class balance ---------------------------------------------------------------------------------------------


def class_balance(db: Database) -> pd.DataFrame:
    """Images per category and split (long form: category, split, images), unlabelled images included."""
    frame = catalogue_stats(db).to_frame()
    splits = [s.value for s in Split]
    long = frame.reset_index().melt(id_vars="category", value_vars=splits, var_name="split", value_name="images")
    return long[["category", "split", "images"]]


# --- calibration -------------------------------------------------------------------------------------------------

BIN_COLUMNS = ["bin_lower", "bin_upper", "count", "mean_confidence", "accuracy"]


@dataclass(frozen=True)
class CalibrationData:
    """Top-label confidence vs being right on labelled test images, in equal-width bins, with the ECE."""

    version_id: int
    confidence: np.ndarray
    correct: np.ndarray
    bins: pd.DataFrame
    ece: float | None
    n_images: int = field(default=0)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, *, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """models.metrics.calibration_bins as a frame: count, mean confidence, accuracy (NaN in empty bins)."""
    bins = pd.DataFrame(calibration_bins(confidence, correct, n_bins=n_bins))
    empty = bins["count"] == 0
    return pd.DataFrame(
        {
            "bin_lower": bins["lo"],
            "bin_upper": bins["hi"],
            "count": bins["count"],
            "mean_confidence": bins["confidence"].mask(empty),
            "accuracy": bins["accuracy"].mask(empty),
        }
    )


def calibration_data(ev: Evaluation | None, *, n_bins: int = ECE_BINS) -> CalibrationData | None:
    """Reliability bins and ECE of an evaluation (the same bins and definition as the ECE stored with a version:
    models.metrics); None when there is no version or no labelled test image."""
    if ev is None or ev.n_images == 0:
        return None
    correct = ev.y_true == ev.y_pred
    bins = reliability_bins(ev.confidence, correct, n_bins=n_bins)
    ece = calibration_error(ev.confidence, correct, n_bins=n_bins)
    return CalibrationData(ev.version_id, ev.confidence, correct, bins, ece, ev.n_images)


# --- corrections per day ---------------------------------------------------------------------------------------

CORRECTION_COLUMNS = ["date", "label_changes", "corrections"]


def corrections_per_day(db: Database, *, days: int = DEFAULT_DAYS, today: date | None = None) -> pd.DataFrame:
    """Per UTC day of the last `days` days: label changes people made and how many were corrections.

    Every day appears (zeros included) once there is any event; empty frame when there is none at all.
    """
    today = today or datetime.now(UTC).date()
    since = datetime.combine(today - timedelta(days=days - 1), datetime.min.time(), tzinfo=UTC)
    day = func.date(LabelEvent.created_at)
    with db.read() as session:
        rows: Sequence[tuple[object, int, int | None]] = session.execute(  # day: str or date, by database
            select(day, func.count(), func.sum(case((correction_clause(), 1), else_=0)))
            .where(LabelEvent.created_at >= since, label_change_clause())
            .group_by(day)
        ).all()
    if not rows:
        return pd.DataFrame(columns=CORRECTION_COLUMNS)
    counted = {date.fromisoformat(str(d)[:10]): (int(n), int(c or 0)) for d, n, c in rows}
    span = [today - timedelta(days=k) for k in range(days - 1, -1, -1)]
    return pd.DataFrame(
        [
            {"date": d, "label_changes": counted.get(d, (0, 0))[0], "corrections": counted.get(d, (0, 0))[1]}
            for d in span
        ],
        columns=CORRECTION_COLUMNS,
    )


# --- the newest version against the one before it --------------------------------------------------------------


@dataclass(frozen=True)
class VersionComparison:
    """The newest version against its baseline: what happened to it (`headline`), overall and per-category scores.

    Accuracies are on the same test images when `same_images` (the promotion check re-measures the active version
    on the candidate's images); otherwise each was measured when it was trained. `per_class` has one row per
    category: recall and F1 of both versions, as stored at each one's training.
    """

    newest_id: int
    baseline_id: int
    baseline_role: str
    headline: str
    newest_accuracy: float | None
    baseline_accuracy: float | None
    newest_macro_f1: float | None
    baseline_macro_f1: float | None
    same_images: bool
    per_class: pd.DataFrame


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _baseline(newest: VersionView, versions: Sequence[VersionView]) -> tuple[VersionView, str]:
    """The version to compare with: the one active when the newest was trained, else the one it started from, else
    the one active now, else the version before it; with why it was chosen."""
    by_id = {v.id: v for v in versions}
    promotion = newest.metrics.get("promotion") or {}
    active = next((v.id for v in versions if v.status == VersionStatus.ACTIVE), None)
    for vid, role in (
        (promotion.get("active_version"), f"active when v{newest.id} was trained"),
        (newest.parent_id, f"the version v{newest.id} started from"),
        (active, "active now"),
    ):
        if isinstance(vid, int) and vid != newest.id and vid in by_id:
            return by_id[vid], role
    return max((v for v in versions if v.id < newest.id), key=lambda v: v.id), f"the version before v{newest.id}"


def version_comparison(versions: Sequence[VersionView]) -> VersionComparison | None:
    """What became of the newest version and how it compares with its baseline; None with fewer than two versions.

    The headline is worded from the promotion record stored with the version (`metrics["promotion"]`: promoted,
    reason) and its status now, so a version promoted and later rolled back reads as exactly that.
    """
    if len(versions) < 2:
        return None
    newest = max(versions, key=lambda v: v.id)
    baseline, role = _baseline(newest, versions)
    promotion = newest.metrics.get("promotion") or {}
    replaced = promotion.get("active_version")
    active = next((v for v in versions if v.status == VersionStatus.ACTIVE), None)

    same_images = bool(newest.test_image_ids_hash) and newest.test_image_ids_hash == baseline.test_image_ids_hash
    baseline_accuracy = baseline.test_accuracy
    remeasured = promotion.get("active_accuracy_same_images")
    if baseline.id == replaced and isinstance(remeasured, int | float):
        baseline_accuracy, same_images = float(remeasured), True
    n, b, status = f"v{newest.id}", f"v{baseline.id}", newest.status

    def scores(*, naming: bool) -> str:
        if newest.test_accuracy is None or baseline_accuracy is None:
            return f"no test accuracy to compare with {b}" if naming else "no test accuracy to compare"
        where = "on the same test images" if same_images else "(each measured when it was trained)"
        versus = f"{_percent(baseline_accuracy)} for {b}" if naming else _percent(baseline_accuracy)
        return f"accuracy {_percent(newest.test_accuracy)} vs {versus} {where}"

    serving = f"{'v' + str(active.id) if active else 'no version'} serves now"
    reason = str(promotion.get("reason") or "no reason recorded")
    if promotion.get("promoted") is True:
        if replaced == baseline.id:
            headline = f"{n} replaced {b}: {scores(naming=False)}."
        else:
            headline = f"{n} became active ({reason}); {scores(naming=True)}."
        if status != VersionStatus.ACTIVE:
            headline = f"{headline[:-1]}. It was {status} later: {serving}."
    elif promotion.get("promoted") is False:
        headline = f"{n} was not promoted automatically: {reason} ({scores(naming=True)})."
        if status == VersionStatus.CANDIDATE:
            headline += " Activate it below to serve it anyway."
        elif status == VersionStatus.ACTIVE:
            headline += " It was activated by hand and serves now."
        else:
            headline += f" It was activated by hand later and is {status} now: {serving}."
    else:  # no promotion record (versions registered by hand)
        headline = f"{n} ({status}) against {b}: {scores(naming=False)}."

    new_classes = (newest.metrics.get("test") or {}).get("per_class") or {}
    old_classes = (baseline.metrics.get("test") or {}).get("per_class") or {}
    rows = [
        {
            "category": name,
            f"{b} recall": (old_classes.get(name) or {}).get("recall"),
            f"{n} recall": (new_classes.get(name) or {}).get("recall"),
            f"{b} F1": (old_classes.get(name) or {}).get("f1"),
            f"{n} F1": (new_classes.get(name) or {}).get("f1"),
        }
        for name in dict.fromkeys([*old_classes, *new_classes])
    ]
    columns = ["category", f"{b} recall", f"{n} recall", f"{b} F1", f"{n} F1"]
    return VersionComparison(
        newest_id=newest.id,
        baseline_id=baseline.id,
        baseline_role=role,
        headline=headline,
        newest_accuracy=newest.test_accuracy,
        baseline_accuracy=baseline_accuracy,
        newest_macro_f1=newest.macro_f1,
        baseline_macro_f1=baseline.macro_f1,
        same_images=same_images,
        per_class=pd.DataFrame(rows, columns=columns),
    )


# --- everything at once ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dashboard:
    """All dashboard data for one version (default: active). `version_id` None = no model yet."""

    version_id: int | None
    version_label: str | None
    scores: dict[str, Any]
    confusion: ConfusionData | None
    per_class: pd.DataFrame
    history: pd.DataFrame
    balance: pd.DataFrame
    calibration: CalibrationData | None
    corrections: pd.DataFrame


def _version_label(session: Session, version_id: int) -> str:
    row = session.execute(
        select(ModelVersion.arch, ModelVersion.image_size, ModelVersion.mode).where(ModelVersion.id == version_id)
    ).first()
    if row is None:
        raise NotFound(f"no model version {version_id}")
    return f"v{version_id} ({row[0]}, {row[1]} px, {row[2]})"


def dashboard(db: Database, *, version_id: int | None = None, days: int = DEFAULT_DAYS) -> Dashboard:
    """Everything the dashboard page shows, in one call (test split; cheap queries, no image is decoded)."""
    ev = evaluation(db, version_id=version_id)
    label = None
    if ev is not None:
        with db.read() as session:
            label = _version_label(session, ev.version_id)
    confusion = None
    if ev is not None:
        confusion = (
            ConfusionData(ev.version_id, ev.split, ev.class_names, _confusion_from(ev))
            if ev.n_images
            else _stored_confusion(db, ev.version_id, ev.split)
        )
    return Dashboard(
        version_id=ev.version_id if ev is not None else None,
        version_label=label,
        scores=summary_scores(ev),
        confusion=confusion,
        per_class=per_class_table(ev),
        history=version_history(db),
        balance=class_balance(db),
        calibration=calibration_data(ev),
        corrections=corrections_per_day(db, days=days),
    )
