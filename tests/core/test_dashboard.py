"""Dashboard numbers against hand computations: confusion matrix, per-class metrics, calibration, corrections."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from core.catalog.labels import SeenPrediction, set_label
from core.db import Database
from core.ml.versions import list_versions
from core.views.dashboard import (
    cell_filters_for_point,
    cell_review_filters,
    class_balance,
    confusion_matrix_data,
    corrections_per_day,
    dashboard,
    evaluation,
    per_class_table,
    reliability_bins,
    version_comparison,
    version_history,
)
from core.views.figures import confusion_figure, dashboard_figures
from core.views.review import ReviewOrder, review_queue
from models.metrics import ECE_BINS
from tests.core.factories import FakeImage, Populated, build, populate

pytestmark = pytest.mark.both_databases

# Test split: Shoes->Shoes (0.9), Shoes->Bags (0.9), Hats->Hats (0.6), Bags->Bags (0.7); plus images that must
# not count: a val image, an unlabelled test image and a test image without a prediction.
CATALOGUE = [
    FakeImage(split="test", label="Shoes", probs=(0.9, 0.05, 0.05)),
    FakeImage(split="test", label="Shoes", probs=(0.05, 0.9, 0.05)),
    FakeImage(split="test", label="Hats", probs=(0.2, 0.2, 0.6)),
    FakeImage(split="test", label="Bags", probs=(0.2, 0.7, 0.1)),
    FakeImage(split="val", label="Hats", probs=(0.9, 0.05, 0.05)),
    FakeImage(split="test", label=None, probs=(0.1, 0.1, 0.8)),
    FakeImage(split="test", label="Hats", probs=None),
]


@pytest.fixture
def cat(db: Database) -> Populated:
    return build(db, CATALOGUE)


def test_confusion_matrix_counts_and_row_shares(db: Database, cat: Populated) -> None:
    cm = confusion_matrix_data(db)
    assert cm is not None and cm.source == "predictions"
    assert cm.class_names == ["Shoes", "Bags", "Hats"]
    assert cm.counts.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert cm.normalised[0].tolist() == [0.5, 0.5, 0.0]
    assert cm.accuracy == pytest.approx(3 / 4)
    assert cm.to_frame().loc["Shoes", "Bags"] == 1


def test_a_correction_shows_up_in_the_matrix_at_once(db: Database, cat: Populated) -> None:
    set_label(db, int(cat.image_ids[1]), "Bags", actor="alice")
    cm = confusion_matrix_data(db)
    assert cm is not None and cm.counts.tolist() == [[1, 0, 0], [0, 2, 0], [0, 0, 1]]


def test_clicked_cell_opens_exactly_those_images(db: Database, cat: Populated) -> None:
    filters = cell_review_filters("Shoes", "Bags")
    assert filters.order is ReviewOrder.SUSPECTED_MISLABEL
    page = review_queue(db, **filters.as_kwargs())
    assert [i.image_id for i in page.items] == [int(cat.image_ids[1])]
    diagonal = review_queue(db, **cell_review_filters("Hats", "Hats").as_kwargs())
    assert [i.image_id for i in diagonal.items] == [int(cat.image_ids[2])]  # the val Hats image is not in it


def test_every_confusion_cell_is_a_clickable_point_naming_its_categories(db: Database, cat: Populated) -> None:
    cm = confusion_matrix_data(db)
    assert cm is not None
    fig = confusion_figure(cm)
    heat, cells = fig.data
    assert heat.type == "heatmap" and heat.hoverinfo == "skip"  # the markers carry the hover text
    assert cells.type == "scatter" and cells.marker.opacity == 0 and len(cells.x) == 9
    # What a click reports (x = predicted, y = true) and what its hover shows, cell by cell.
    clicked = {(y, x): (int(c[0]), float(c[1])) for x, y, c in zip(cells.x, cells.y, cells.customdata, strict=True)}
    assert clicked[("Shoes", "Bags")] == (1, 0.5) and clicked[("Bags", "Bags")] == (1, 1.0)
    assert clicked[("Hats", "Shoes")] == (0, 0.0)
    assert {k: v[0] for k, v in clicked.items()} == {
        (t, p): int(cm.counts[i, j]) for i, t in enumerate(cm.class_names) for j, p in enumerate(cm.class_names)
    }
    plain = confusion_figure(cm, clickable=False)
    assert len(plain.data) == 1 and "images" in plain.data[0].hovertemplate


def test_per_class_table_matches_hand_computation(db: Database, cat: Populated) -> None:
    table = per_class_table(evaluation(db)).set_index("category")
    # Shoes: 1 of 1 predicted right, 1 of 2 found. Bags: 1 of 2 predicted right, 1 of 1 found. Hats: perfect.
    assert table.loc["Shoes", ["precision", "recall", "support"]].tolist() == [1.0, 0.5, 2]
    assert table.loc["Shoes", "f1"] == pytest.approx(2 / 3)
    assert table.loc["Bags", ["precision", "recall"]].tolist() == [0.5, 1.0]
    assert table.loc["Hats", "f1"] == 1.0
    assert table.loc["macro avg", "f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_calibration_bins_and_ece(db: Database, cat: Populated) -> None:
    board = dashboard(db)
    cal = board.calibration
    assert cal is not None and cal.n_images == 4
    # The same 15 bins as the ECE stored with every version (models.metrics): one page, one calibration error.
    assert len(cal.bins) == ECE_BINS == 15
    # Confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.7 (right) in bins (13/15,14/15], (8/15,9/15], (10/15,11/15].
    used = cal.bins[cal.bins["count"] > 0]
    assert used["count"].tolist() == [1, 1, 2]
    assert used["accuracy"].tolist() == [1.0, 1.0, 0.5]
    # ECE = (1*|1-0.6| + 1*|1-0.7| + 2*|0.5-0.9|) / 4
    assert cal.ece == pytest.approx((0.4 + 0.3 + 0.8) / 4)
    assert board.scores["accuracy"] == pytest.approx(0.75) and board.scores["n_images"] == 4


def test_reliability_bins_put_edges_in_the_lower_bin() -> None:
    bins = reliability_bins(np.array([0.0, 0.5, 0.51, 1.0]), np.array([True, False, True, True]), n_bins=2)
    assert bins["count"].tolist() == [2, 2]
    assert bins["accuracy"].tolist() == [0.5, 1.0]


def test_corrections_per_day(db: Database, cat: Populated) -> None:
    today = datetime.now(UTC).date()
    unlabelled = int(cat.image_ids[5])
    version = int(cat.version_id or 0)
    hats = cat.id_of("Hats")
    # Accepting the model's "Hats" on an unlabelled image: a label change, not a correction.
    set_label(db, unlabelled, "Hats", actor="alice", seen_prediction=SeenPrediction(version, hats, 0.8))
    # Changing an existing label: a correction.
    set_label(db, int(cat.image_ids[1]), "Bags", actor="alice")
    frame = corrections_per_day(db, days=7, today=today)
    assert len(frame) == 7 and frame["date"].iloc[-1] == today
    assert frame[["label_changes", "corrections"]].iloc[-1].tolist() == [2, 1]
    assert frame[["label_changes", "corrections"]].iloc[:-1].to_numpy().sum() == 0  # imports are not counted


def test_history_and_balance(db: Database, cat: Populated) -> None:
    history = version_history(db)
    assert history["version"].tolist() == [cat.version_id]
    assert history["accuracy"].iloc[0] == pytest.approx(0.75)  # stored by the factory at "training"
    balance = class_balance(db)
    assert balance["images"].sum() == len(CATALOGUE)
    assert balance.set_index(["category", "split"]).loc[("Hats", "test"), "images"] == 2


def test_dashboard_figures_on_a_populated_catalogue(db: Database) -> None:
    populate(db, n_images=3000, seed=1)
    board = dashboard(db)
    figures = dashboard_figures(board)
    assert set(figures) == {"confusion", "history", "balance", "confidence", "reliability"}
    heat = figures["confusion"].data[0]
    assert np.asarray(heat.z).shape == (5, 5)
    assert board.confusion is not None and board.confusion.n_images == board.scores["n_images"] > 100
    assert board.version_label is not None and board.version_label.startswith("v")


def test_empty_database_gives_empty_results(db: Database) -> None:
    board = dashboard(db)
    assert board.version_id is None and board.confusion is None and board.calibration is None
    assert board.per_class.empty and board.history.empty and board.corrections.empty
    assert board.scores["accuracy"] is None
    assert dashboard_figures(board) == {}


def test_stored_matrix_is_used_when_no_test_predictions_are_stored(db: Database) -> None:
    build(db, [FakeImage(split="test", label="Shoes", probs=None), FakeImage(split="train", label="Bags")])
    from core.schema import ModelVersion

    with db.write() as session:
        version = session.query(ModelVersion).one()
        version.metrics = {"test": {"confusion_matrix": [[3, 1], [0, 4]], "class_names": ["Shoes", "Bags"]}}
    cm = confusion_matrix_data(db)
    assert cm is not None and cm.source == "stored metrics" and cm.counts.tolist() == [[3, 1], [0, 4]]


def _strings(value: object) -> set[str]:
    """Every string in a figure's data and layout (axis values, hover text, legend names, titles)."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple | np.ndarray):
        return set().union(set(), *(_strings(v) for v in value))
    return set()


def test_category_names_show_as_text_in_every_figure_not_as_html(db: Database) -> None:
    # A category named like HTML must read literally: plotly would render <b> bold and <a href> as a link.
    made = build(
        db,
        [FakeImage(split="test", label="<b>x</b>", probs=(0.1, 0.8, 0.1)), FakeImage(split="train", label="Bags")],
        categories=("<b>x</b>", "Bags", "Hats"),
    )
    figures = dashboard_figures(dashboard(db))
    assert {"confusion", "balance", "history", "confidence", "reliability"} <= set(figures)
    for name, figure in figures.items():
        shown = _strings(figure.to_dict())
        assert not any("<b>" in text or "</b>" in text for text in shown), name
        if name in ("confusion", "balance"):
            assert "&lt;b&gt;x&lt;/b&gt;" in shown, name
    heat, cells = figures["confusion"].data
    assert list(heat.x) == ["&lt;b&gt;x&lt;/b&gt;", "Bags", "Hats"] and list(heat.y) == list(heat.x)
    # A click on the cell (true <b>x</b>, predicted Bags) still reviews the category by its real name.
    cm = dashboard(db).confusion
    assert cm is not None
    by_index = cell_filters_for_point(cm, {"point_index": 1, "x": cells.x[1], "y": cells.y[1]})
    by_name = cell_filters_for_point(cm, {"x": cells.x[1], "y": cells.y[1]})
    for filters in (by_index, by_name):
        assert (filters.true_category, filters.predicted_category) == ("<b>x</b>", "Bags")
    page = review_queue(db, **by_index.as_kwargs())
    assert [i.image_id for i in page.items] == [int(made.image_ids[0])]


def test_a_clicked_cell_follows_the_active_version(db: Database, cat: Populated) -> None:
    cm = confusion_matrix_data(db)
    assert cm is not None
    filters = cell_filters_for_point(cm, {"point_index": 1})  # true Shoes, predicted Bags
    # Not pinned to the version shown when clicked: after a retrain or rollback the review shows the serving model.
    assert filters.version_id is None and filters.as_kwargs()["version_id"] is None
    assert [i.image_id for i in review_queue(db, **filters.as_kwargs()).items] == [int(cat.image_ids[1])]


def test_history_axis_names_versions_not_millisecond_times(db: Database, cat: Populated) -> None:
    figure = dashboard_figures(dashboard(db))["history"]
    assert figure.layout.xaxis.type == "category"
    assert [list(trace.x) for trace in figure.data] == [[f"v{cat.version_id}"]] * 2


def _add_version(
    db: Database,
    *,
    status: str,
    accuracy: float | None,
    promotion: dict | None = None,
    recall: dict[str, float] | None = None,
    test_hash: str = "same-images",
) -> int:
    from tests.core.training_helpers import add_version_row

    test = {"macro_f1": accuracy, "per_class": {k: {"recall": v, "f1": v} for k, v in (recall or {}).items()}}
    metrics = {"test": test, **({"promotion": promotion} if promotion else {})}
    return add_version_row(db, status=status, accuracy=accuracy, metrics=metrics, test_hash=test_hash)


def test_comparison_in_the_normal_flow_says_which_version_replaced_which(db: Database) -> None:
    old = _add_version(db, status="retired", accuracy=0.88, recall={"Shoes": 0.9, "Bags": 0.86})
    new = _add_version(
        db,
        status="active",
        accuracy=0.91,
        recall={"Shoes": 0.95, "Bags": 0.87},
        promotion={"promoted": True, "reason": "not worse than the active version", "active_version": old,
                   "active_accuracy_same_images": 0.88},
    )  # fmt: skip
    comparison = version_comparison(list_versions(db))
    assert comparison is not None and (comparison.newest_id, comparison.baseline_id) == (new, old)
    assert comparison.headline == f"v{new} replaced v{old}: accuracy 91% vs 88% on the same test images."
    assert comparison.per_class.columns.tolist() == ["category", f"v{old} recall", f"v{new} recall", f"v{old} F1",
                                                     f"v{new} F1"]  # fmt: skip
    assert comparison.per_class.set_index("category").loc["Shoes", f"v{new} recall"] == 0.95
    assert "overall" not in comparison.per_class["category"].tolist()  # overall scores are separate, not a row


def test_comparison_after_a_rollback_says_the_newest_was_promoted_then_retired(db: Database) -> None:
    first = _add_version(db, status="active", accuracy=0.0)
    second = _add_version(
        db,
        status="retired",  # promoted automatically, then rolled back to the first
        accuracy=0.3214,
        promotion={"promoted": True, "reason": "not worse than the active version", "active_version": first,
                   "active_accuracy_same_images": 0.0},
    )  # fmt: skip
    comparison = version_comparison(list_versions(db))
    assert comparison is not None
    assert comparison.headline == (
        f"v{second} replaced v{first}: accuracy 32% vs 0% on the same test images. "
        f"It was retired later: v{first} serves now."
    )
    assert "not promoted" not in comparison.headline.lower()


def test_comparison_of_a_candidate_that_was_not_promoted(db: Database) -> None:
    active = _add_version(db, status="active", accuracy=0.88)
    candidate = _add_version(
        db,
        status="candidate",
        accuracy=0.8,
        promotion={"promoted": False, "reason": "worse than the active version", "active_version": active,
                   "active_accuracy_same_images": 0.88},
    )  # fmt: skip
    comparison = version_comparison(list_versions(db))
    assert comparison is not None and comparison.baseline_id == active
    assert comparison.headline == (
        f"v{candidate} was not promoted automatically: worse than the active version "
        f"(accuracy 80% vs 88% for v{active} on the same test images). Activate it below to serve it anyway."
    )
    assert version_comparison([v for v in list_versions(db) if v.id == active]) is None  # one version: nothing
