"""Home: what prodcat does, catalogue counts, the active model, the training job, and links to every page."""

from __future__ import annotations

import streamlit as st

from core.views.overview import home_overview
from pages import _sidebar, _ui

db = _ui.get_db()
overview = home_overview(db)

st.title("prodcat")
st.markdown(
    "Drop product photos in, see each one's predicted category with a calibrated confidence, and accept or correct "
    "it. Every change is audited; one button retrains the model on everything corrected so far."
)

images, labelled, categories = st.columns(3)
images.metric("Images", overview.images)
labelled.metric("Labelled", overview.labelled, help=f"{overview.unlabelled} still unlabelled")
categories.metric("Categories", overview.categories)

st.subheader("Model")
if overview.has_model:
    st.text(f"Active model: {overview.active_version_label}, {overview.accuracy_label}")
    if overview.pretrained_notice:
        st.warning(_ui.md_escape(overview.pretrained_notice))
else:
    st.info(
        "No model yet. Upload and label photos of at least two categories, then press Retrain on the "
        "Train & models page. Meanwhile the upload page works as a labelling tool."
    )
st.text(_sidebar.job_line(overview))

st.subheader("Pages")
for key, (path, title, _url) in _ui.PAGES.items():
    if key != "home":
        st.page_link(path, label=title)
