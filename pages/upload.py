"""Upload & classify: drop photos, zips or a folder; see each photo's prediction; accept or correct it in one click."""

from __future__ import annotations

import functools

import streamlit as st

from core.auth import Action
from core.catalog.ingest import Upload, import_uploads, stored_before
from core.catalog.labels import add_category, bulk_relabel
from core.ml.predict import predict_images
from core.ml.versions import active_version
from core.views.review import BatchTargets, batch_targets, review_items
from pages import _auth, _cards, _ui
from pages._upload_batch import Batch, category_problem

BATCH_KEY = "upload_batch"
CATEGORY_KEY = "upload_category"
CHOSEN_KEY = "upload_chosen_category"  # the category of the upload being imported
TARGET_KEY = "upload_target"
PAGE_KEY = "upload_page"
BULK_FRAGMENT = "upload_bulk"
NO_CATEGORY = "(none: label them below)"
PAGE_SIZE = 24  # cards per page, like the Review page
CHUNK = 16  # files per import call: what an interrupted import had stored is known to the last chunk

db = _ui.get_db()
_auth.require(Action.UPLOAD)
_ui.show_flash()
st.title("Upload & classify")
categories = _ui.category_names(db)

if not categories:
    # First run: nothing to label with yet. Create one here, or go where categories and labelled data are managed.
    st.info("No categories yet: add the first one here (or type a new name as the upload's category below).")
    with st.form("first_category", clear_on_submit=True, border=False):
        name_col, add_col = st.columns([3, 1], vertical_alignment="bottom")
        new_name = name_col.text_input("New category", placeholder="e.g. Shoes")
        if add_col.form_submit_button("Add category", width="stretch") and new_name.strip():
            ok, _ = _ui.attempt(add_category, db, new_name, actor=_ui.actor())
            if ok:
                _ui.flash("success", f"Added {new_name.strip()}")
                st.rerun()
    st.page_link(
        _ui.PAGES["categories"][0],
        label="Categories & data: add, rename and archive categories, import already-labelled photos",
        icon=":material/category:",
    )

# The category sits outside the form, so a bad one (archived, too long) is refused as soon as it is chosen, with the
# files still in the picker, instead of after Import refused every file.
category = st.selectbox(
    "Category for the whole upload (optional; type a new name to create one)",
    [NO_CATEGORY, *categories],
    accept_new_options=True,
    key=CATEGORY_KEY,
)
wanted = None if category in (None, NO_CATEGORY) else category
problem = category_problem(db, wanted) if wanted else None
if problem is not None:
    st.error(_ui.md_escape(problem))  # in full, naming the category and why


def _take_category() -> None:
    # Import's callback: this upload keeps the category; the picker starts empty for the next upload.
    st.session_state[CHOSEN_KEY] = st.session_state.get(CATEGORY_KEY)
    st.session_state[CATEGORY_KEY] = NO_CATEGORY


with st.form("upload_form", clear_on_submit=True):
    files = st.file_uploader(
        "Product photos or zip archives", accept_multiple_files=True, help="JPEG, PNG, WebP, GIF, BMP, TIFF or .zip"
    )
    folder = st.file_uploader("...or a whole folder", accept_multiple_files="directory")
    submitted = st.form_submit_button(
        "Import",
        type="primary",
        disabled=problem is not None,
        help="Choose another category first" if problem is not None else None,
        on_click=_take_category,
    )


def _run_import(batch: Batch, uploads: list[Upload]) -> bool:
    """Import `uploads` a chunk at a time into `batch` (kept in session state), so leaving the page mid-import
    loses no record: the batch says what was stored, and keeps the rest to resume. True when all went in."""
    bar = st.progress(0.0, text="Importing...")
    while batch.pending:
        chunk = batch.pending[:CHUNK]
        offset = batch.processed

        def _progress(done: int, total: int | None, name: str, offset: int = offset) -> None:
            shown = _ui.md_escape(f"{offset + done}/{batch.total}: {name}")  # a zip entry's name is no Markdown
            bar.progress(min((offset + done) / batch.total, 1.0), text=shown)

        with _ui.shown_errors(before_error=functools.partial(_stopped_part_way, batch, chunk)) as outcome:
            result = import_uploads(
                db, chunk, category=batch.category, actor=_ui.actor(), source="upload", progress=_progress
            )
            batch.add(result, done=len(chunk))
        if outcome.failed:
            bar.empty()
            return False
    bar.empty()
    return True


def _stopped_part_way(batch: Batch, chunk: list[Upload], exc: Exception) -> None:
    """An error ended an import call: record what it stored first, and show that above the error."""
    if (partial := stored_before(exc)) is not None:
        batch.add_stopped(partial, chunk)
    _ui.show_stored_before(exc)


if submitted:
    uploads = [Upload(f.name, f.getvalue()) for f in [*(files or []), *(folder or [])]]
    chosen = st.session_state.pop(CHOSEN_KEY, None)
    if not uploads:
        st.warning("Choose some files first.")
    else:
        batch = Batch.start(uploads, category=None if chosen in (None, NO_CATEGORY) else chosen)
        st.session_state[BATCH_KEY] = batch
        st.session_state[PAGE_KEY] = 1
        if _run_import(batch, uploads):
            categories = _ui.category_names(db)  # the upload may have created one

batch = st.session_state.get(BATCH_KEY)
if not isinstance(batch, Batch):
    st.info("Imported photos appear here with their predicted category. Without a model yet, label them by hand.")
    st.stop()

st.subheader("This upload")
if batch.pending:
    # The import stopped before the end (the person left the page, or an error): say what is stored and what is not.
    st.warning(_ui.md_escape(batch.interrupted_text()))
    with st.expander(f"Not imported ({len(batch.pending)})"):
        st.dataframe([{"file": u.name} for u in batch.pending], hide_index=True)
    if st.button(f"Import the remaining {_ui.plural(len(batch.pending), 'file')}", type="primary"):
        if _run_import(batch, list(batch.pending)):
            st.rerun()  # the notice above is drawn already: redraw without it
st.text(batch.summary())
if batch.refused:
    with st.expander(f"Refused files ({len(batch.refused)})", expanded=True):
        st.dataframe(
            [{"file": n, "reason": r} for n, r in batch.refused],
            hide_index=True,
            column_config={"reason": st.column_config.TextColumn(width="large")},
        )
for note in batch.notes:
    st.warning(_ui.md_escape(note))
repeated, existing = batch.repeated(), batch.existing()
if repeated:
    with st.expander(f"Repeated in this upload ({len(repeated)})"):
        st.dataframe(
            [{"file": n, "same as": f"#{i} {e}"} for n, i, e in repeated],
            hide_index=True,
        )
if existing:
    with st.expander(f"Already in the catalogue ({len(existing)})"):
        st.dataframe([{"file": n, "same as image": f"#{i}", "its name": e} for n, i, e in existing], hide_index=True)

ids = batch.ids
if ids and active_version(db) is not None:
    # Stored once per image and version: after a retrain this computes the new version's predictions.
    with st.spinner("Classifying..."):
        _ui.attempt(predict_images, db, ids)
pages = max(1, -(-len(ids) // PAGE_SIZE))
page_number = min(int(st.session_state.get(PAGE_KEY, 1)), pages)
shown_ids = ids[(page_number - 1) * PAGE_SIZE : page_number * PAGE_SIZE]
# Duplicates of photos already in the catalogue (not ones repeated within this upload) keep an existing label.
duplicate_ids = {i for _, i, _ in existing}


def _targets() -> BatchTargets:
    """The ticked photos of this upload, else all of them but the labelled duplicates of catalogue photos."""
    return batch_targets(review_items(db, ids), selected=_cards.ticked(ids, prefix="up"), duplicate_ids=duplicate_ids)


def _apply() -> None:
    """A callback: label the chosen photos (as ticked now), creating the category if it is new; then untick and
    forget the category, so the next click cannot label the whole upload with it by accident."""
    target = st.session_state.get(TARGET_KEY)
    targets = _targets()
    target_ids, kept = targets.image_ids, targets.kept_duplicates
    if not target or not target_ids:
        return
    if target not in categories:  # typed: an existing category in other case or spacing, or a new one
        target = _ui.flash_errors(_ui.typed_category, db, target)
        if target is None:
            return
    items = review_items(db, target_ids)
    changes = _ui.flash_errors(
        bulk_relabel,
        db,
        target_ids,
        target,
        actor=_ui.actor(),
        seen_predictions=_cards.seen_predictions(items),
        expected_labels=_cards.shown_labels(items),
    )
    if changes is None:
        return
    _ui.remember_changes(changes)
    _cards.clear_selection("up")
    st.session_state[TARGET_KEY] = None
    were = "was" if kept == 1 else "were"
    left_alone = f"; {_ui.plural(kept, 'duplicate')} already labelled {were} left alone" if kept else ""
    _ui.flash("success", f"{_ui.plural(len(changes), 'photo')} labelled {target}{left_alone}")
    st.rerun()  # every card of the batch may have changed: the whole page


def _bulk_bar() -> None:
    """Category picker and Apply for the selection or the whole batch. A keyed fragment: ticking a card's box
    redraws it (its button counts the selection) without redrawing the page."""
    selected = _cards.ticked(ids, prefix="up")
    targets = _targets()
    n, k = len(targets.image_ids), targets.kept_duplicates
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    may_add = _auth.may(Action.ADD_CATEGORY)
    target = left.selectbox(
        "Category for the selected photos (all photos of this upload if none is selected"
        + ("; type a new name to create one)" if may_add else ")"),
        categories,
        index=None,  # no category until one is chosen: a click must not label a whole batch with the first one
        placeholder="choose a category",
        accept_new_options=may_add,
        key=TARGET_KEY,
    )
    if selected:
        label = f"Apply to {n} selected"
    else:
        label = "Apply to the 1 photo" if n == 1 else f"Apply to all {n} photos"
    right.button(
        label,
        key="upload_apply",
        width="stretch",
        disabled=target is None or n == 0,
        help="Choose a category first" if target is None else None,
        on_click=_apply,
    )
    if k:
        are = "is" if k == 1 else "are"
        st.caption(f"{_ui.plural(k, 'duplicate')} already labelled {are} left out: tick one to relabel it.")


st.fragment(_bulk_bar, key=BULK_FRAGMENT)()
delete = _cards.CardDelete("deleted on the Upload page", batch.forget) if _auth.may(Action.DELETE_IMAGES) else None
_cards.card_grid(db, review_items(db, shown_ids), categories, prefix="up", on_select=[BULK_FRAGMENT], delete=delete)
if pages > 1:
    st.pagination(pages, key=PAGE_KEY)
