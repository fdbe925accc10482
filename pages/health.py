"""Data health: what in the catalogue needs attention, each finding one click from the images it is about."""

from __future__ import annotations

import streamlit as st

from core.views.health import data_health
from pages import _ui

db = _ui.get_db()
_ui.show_flash()
st.title("Data health")
health = data_health(db)

total, unlabelled, wrong, unusual, duplicates = st.columns(5)
total.metric("Photos", health.total)
unlabelled.metric("Unlabelled", health.unlabelled)
wrong.metric("Likely wrong labels", health.labels.open_issues if health.labels.available else "n/a")
unusual.metric("Unusual photos", health.unusual)
duplicates.metric("Duplicate groups", health.duplicates.groups)
st.caption(_ui.md_escape(health.labels.describe()))

findings = health.findings()
if not findings:
    st.success("Nothing needs attention.")
for n, finding in enumerate(findings):
    with st.container(border=True):
        text, action = st.columns([4, 1], vertical_alignment="center")
        text.markdown(f"**{_ui.md_escape(finding.title)}**  \n{_ui.md_escape(finding.detail)}")
        if finding.review and action.button("Review these", key=f"health_review_{n}", width="stretch"):
            _ui.open_review(**finding.review)
        if finding.page is not None:
            with action:
                st.page_link(_ui.PAGES[finding.page][0], label="Open", icon=":material/arrow_forward:")

if health.categories:
    st.subheader("Per category")
    st.dataframe(
        [
            {
                "category": c.category,
                "labelled": c.labelled,
                "train": c.train,
                "val": c.val,
                "test": c.test,
                "likely wrong": c.likely_wrong,
                "too small to train": c.too_small,
            }
            for c in health.categories
        ],
        hide_index=True,
    )
