"""Upload & classify: drop photos, zips or a folder; see each photo's prediction; accept or correct it in one click."""

from __future__ import annotations

import streamlit as st

from core.ingest import Upload, import_uploads
from core.labels import bulk_relabel
from core.predict import predict_images
from core.review import batch_targets, review_items
from core.versions import active_version
from pages import _ui

BATCH_KEY = "upload_batch"
NO_CATEGORY = "(none: label them below)"

db = _ui.get_db()
_ui.show_flash()
st.title("Upload & classify")
categories = _ui.category_names(db)

with st.form("upload_form", clear_on_submit=True):
    files = st.file_uploader(
        "Product photos or zip archives", accept_multiple_files=True, help="JPEG, PNG, WebP, GIF, BMP, TIFF or .zip"
    )
    folder = st.file_uploader("...or a whole folder", accept_multiple_files="directory")
    category = st.selectbox(
        "Category for the whole upload (optional; type a new name to create one)",
        [NO_CATEGORY, *categories],
        accept_new_options=True,
        key="upload_category",  # a key keeps the widget's identity when a new category joins the options
    )
    submitted = st.form_submit_button("Import", type="primary")

if submitted:
    uploads = [Upload(f.name, f.getvalue()) for f in [*(files or []), *(folder or [])]]
    if not uploads:
        st.warning("Choose some files first.")
    else:
        bar = st.progress(0.0, text="Importing...")

        def _progress(done: int, total: int | None, name: str) -> None:
            bar.progress(min(done / total, 1.0) if total else 0.0, text=f"{done}/{total or '?'}: {name}")

        ok, result = _ui.attempt(
            import_uploads,
            db,
            uploads,
            category=None if category in (None, NO_CATEGORY) else category,
            actor=_ui.actor(),
            source="upload",
            progress=_progress,
        )
        bar.empty()
        if ok:
            st.session_state[BATCH_KEY] = {
                "ids": [i.image_id for i in result.imported] + [d.image_id for d in result.duplicates],
                "imported_ids": [i.image_id for i in result.imported],
                "summary": result.summary(),
                "duplicates": [(d.name, d.image_id, d.existing_name) for d in result.duplicates],
                "refused": [(r.name, r.reason) for r in result.refused],
            }
            categories = _ui.category_names(db)  # the upload may have created one

batch = st.session_state.get(BATCH_KEY)
if not batch:
    st.info("Imported photos appear here with their predicted category. Without a model yet, label them by hand.")
    st.stop()

st.subheader("This upload")
st.text(batch["summary"])
if batch["refused"]:
    with st.expander(f"Refused files ({len(batch['refused'])})", expanded=True):
        st.dataframe([{"file": n, "reason": r} for n, r in batch["refused"]], hide_index=True)
if batch["duplicates"]:
    with st.expander(f"Already in the catalogue ({len(batch['duplicates'])})"):
        st.dataframe(
            [{"file": n, "same as image": f"#{i}", "its name": e} for n, i, e in batch["duplicates"]], hide_index=True
        )

ids = batch["ids"]
if ids and active_version(db) is not None:
    # Stored once per image and version: after a retrain this computes the new version's predictions.
    with st.spinner("Classifying..."):
        _ui.attempt(predict_images, db, ids)
items = review_items(db, ids)

# Duplicates of photos already in the catalogue (not ones repeated within this upload) keep an existing label.
duplicate_ids = {i for _, i, _ in batch["duplicates"]} - set(batch.get("imported_ids", []))
selected = _ui.ticked(items, prefix="up")
targets = batch_targets(items, selected=selected, duplicate_ids=duplicate_ids)
n = len(targets.image_ids)
left, right = st.columns([3, 1], vertical_alignment="bottom")
target = left.selectbox(
    "Category for the selected photos (all photos of this upload if none is selected)",
    categories,
    index=None,  # no category until one is chosen: a click must not label a whole batch with the first one
    placeholder="choose a category",
    key="upload_target",
)
label = f"Apply to {n} selected" if selected else ("Apply to the 1 photo" if n == 1 else f"Apply to all {n} photos")
apply = right.button(
    label,
    key="upload_apply",
    width="stretch",
    disabled=target is None or n == 0,
    help="Choose a category first" if target is None else None,
)
k = targets.kept_duplicates  # only when nothing is ticked
duplicates = f"{k} duplicate{'s' if k != 1 else ''} already labelled"
if k:
    st.caption(f"{duplicates} {'are' if k != 1 else 'is'} left out: tick one to relabel it.")
_ui.card_grid(db, items, categories, prefix="up")
if apply and target:
    ok, changes = _ui.attempt(
        bulk_relabel, db, targets.image_ids, target, actor=_ui.actor(), seen_predictions=_ui.seen_predictions(items)
    )
    if ok:
        _ui.remember_changes(changes)
        _ui.clear_selection("up")
        left_alone = f"; {duplicates} {'were' if k != 1 else 'was'} left alone" if k else ""
        _ui.flash("success", f"{len(changes)} photos labelled {target}{left_alone}")
        st.rerun()
