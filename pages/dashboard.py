"""Dashboard: where the model goes wrong (confusion matrix -> review), per-category scores, history, calibration."""

from __future__ import annotations

import streamlit as st

from core.ml.label_checks import label_health
from core.views.dashboard import cell_filters_for_point, dashboard
from core.views.figures import confusion_figure, dashboard_figures
from core.views.review import LabelState, ReviewOrder
from pages import _ui

db = _ui.get_db()
st.title("Dashboard")
board = dashboard(db)
figures = dashboard_figures(board)

if board.version_id is None:
    st.info("No model yet: train one on the Train & models page to see its errors here.")
else:
    st.text(f"Model {board.version_label}, measured on the labelled images of the test split")
    accuracy, macro_f1, n_images = st.columns(3)
    scores = board.scores
    accuracy.metric("Accuracy", "n/a" if scores["accuracy"] is None else f"{scores['accuracy']:.1%}")
    macro_f1.metric("Macro F1", "n/a" if scores["macro_f1"] is None else f"{scores['macro_f1']:.1%}")
    n_images.metric("Test images", scores["n_images"])

if board.confusion is not None:
    st.subheader("Confusion matrix")
    normalised = st.toggle("Row-normalised (share of each true category)", value=True)
    st.caption("Click a cell to review those images (as the active model sees them).")
    event = st.plotly_chart(
        confusion_figure(board.confusion, normalised=normalised),
        on_select="rerun",
        selection_mode="points",
        key="confusion",
    )
    points = event.selection.points if event else []
    if points:
        st.session_state[_ui.REVIEW_CELL_KEY] = cell_filters_for_point(board.confusion, points[0]).as_kwargs()
        st.switch_page(_ui.PAGES["review"][0])

if not board.per_class.empty:
    st.subheader("Per category")
    table, formats = _ui.percent_columns(board.per_class, ["precision", "recall", "f1"])
    # height "content": every category and the "macro avg" row, without scrolling.
    st.dataframe(table, hide_index=True, height="content", column_config=formats)

health = label_health(db)
if health.version_id is not None:
    st.subheader("Label check")
    st.caption(
        "After every retrain, K-fold heads that never saw an image's label predict it (out of sample); cleanlab "
        "counts the labels they contradict."
    )
    st.text(health.describe())
    if health.available:
        st.dataframe(
            [{"category": c.category, "likely wrong labels": c.open_issues} for c in health.categories],
            hide_index=True,
        )
        if health.open_issues and st.button("Review the likely label errors", icon=":material/rule:"):
            _ui.open_review(label_state=LabelState.LABEL_ISSUES, order=ReviewOrder.SUSPECTED_MISLABEL)

charts = [
    ("history", "Accuracy and macro F1 per version"),
    ("balance", "Class balance per split"),
    ("confidence", "Confidence histogram"),
    ("reliability", "Reliability diagram"),
    ("corrections", "Corrections per day"),
]
shown = [(key, title) for key, title in charts if key in figures]
for start in range(0, len(shown), 2):
    for column, (key, title) in zip(st.columns(2), shown[start : start + 2], strict=False):
        with column:
            st.subheader(title)
            st.plotly_chart(figures[key], key=f"chart_{key}")
if not shown and board.version_id is None:
    st.caption("Charts appear once images are imported and labelled.")
