"""Review & correct: filter and order the catalogue by the model's doubt, fix labels in one click or in bulk, undo."""

from __future__ import annotations

import streamlit as st

from core.label_checks import label_health
from core.labels import bulk_relabel
from core.review import LabelState, ReviewOrder, review_queue
from core.schema import Split
from pages import _ui

CELL_KEY = _ui.REVIEW_CELL_KEY
ALL = _ui.REVIEW_ALL
KEYS = _ui.REVIEW_FILTERS
PAGE_SIZE = 24
KEYBOARD_DONE_KEY = "review_keyboard_done"  # photos labelled or skipped in keyboard review, this session
PAGE_KEY = "review_page"
SHOWN_QUERY_KEY = "review_shown_query"  # the filters the grid was last shown with: a change goes back to page 1
# Filters, page and keyboard mode outlive a visit to another page (Streamlit drops undrawn widgets' state otherwise).
KEEP = "session"

db = _ui.get_db()
_ui.show_flash()
st.title("Review & correct")
categories = _ui.category_names(db)

cell = st.session_state.get(CELL_KEY)
if cell:
    st.info(
        _ui.md_escape(
            f"Confusion-matrix cell: labelled {cell['true_category']}, predicted {cell['predicted_category']} "
            f"({cell['split']} split)"
        )
    )
    if st.button("Show all images again"):
        del st.session_state[CELL_KEY]
        st.rerun()
    query = dict(cell)
else:
    # A form, so several filters change in one go and Enter applies them.
    with st.form("review_filters", border=False):
        c1, c2, c3, c4 = st.columns(4)
        category = c1.selectbox("Category", [ALL, *categories], key=KEYS["category"], persist_state=KEEP)
        state = c2.selectbox("Labels", [s.value for s in LabelState], key=KEYS["label_state"], persist_state=KEEP)
        split = c3.selectbox("Split", [ALL, *(s.value for s in Split)], key=KEYS["split"], persist_state=KEEP)
        order = c4.selectbox("Order", [o.value for o in ReviewOrder], key=KEYS["order"], persist_state=KEEP)
        st.form_submit_button("Apply filters")
    query = {
        "category": None if category == ALL else category,
        "label_state": state,
        "split": None if split == ALL else split,
        "order": order,
    }

if st.session_state.get(SHOWN_QUERY_KEY) != query:  # other filters: their first page, not the old page number
    st.session_state[SHOWN_QUERY_KEY] = query
    st.session_state[PAGE_KEY] = 1
page_number = st.session_state.get(PAGE_KEY, 1)
ok, page = _ui.attempt(review_queue, db, page=page_number, page_size=PAGE_SIZE, **query)
if not ok:
    st.stop()
if page.page != page_number:  # past the end (fewer images now): the pagination shows the page the grid shows
    st.session_state[PAGE_KEY] = page.page
if page.version_id is None:
    st.caption("No model yet: no predictions to order by, so the newest uploads are shown first.")
elif query.get("order") == ReviewOrder.SUSPECTED_MISLABEL or query.get("label_state") == LabelState.LABEL_ISSUES:
    st.caption(_ui.md_escape(label_health(db, version_id=page.version_id).describe()))

left, middle, right = st.columns([2, 1, 1], vertical_alignment="bottom")
target = left.selectbox("Category for the selected images", categories, key="review_bulk_target")
apply = middle.button("Relabel selected", width="stretch")
if right.button("Undo my last change", width="stretch", shortcut="U", help="Takes back changes made in this session"):
    changes = _ui.undo_session_change(db)
    if changes is not None:
        done = st.session_state.get(KEYBOARD_DONE_KEY, [])
        for change in changes:  # an undone keyboard label brings its photo back
            if change.image_id in done:
                done.remove(change.image_id)
        _ui.flash("success", f"Undone: {len(changes)} label change(s)")
        st.rerun()

st.text(f"{page.total} images match; page {page.page} of {page.pages}")
if not page.items:
    st.info("Nothing to review with these filters.")
keyboard = st.toggle(
    "Keyboard review: one photo at a time, keys 1-9 pick its category, Right skips",
    key="review_keyboard",
    persist_state=KEEP,
    disabled=not page.items,
)
if keyboard and page.items:
    done: list[int] = st.session_state.setdefault(KEYBOARD_DONE_KEY, [])
    item = next((i for i in page.items if i.image_id not in done), None)
    if item is None:
        st.info("Every photo on this page is done: go to the next page (below), or change the filters.")
    else:
        _ui.keyboard_card(db, item, categories, done)
selected = _ui.card_grid(db, page.items, categories, prefix="rv")
if page.pages > 1:
    st.pagination(page.pages, key=PAGE_KEY, persist_state=KEEP)

if apply:
    if not selected:
        st.warning("Select some images first (the box under each image).")
    elif target:
        ok, changes = _ui.attempt(
            bulk_relabel, db, selected, target, actor=_ui.actor(), seen_predictions=_ui.seen_predictions(page.items)
        )
        if ok:
            _ui.remember_changes(changes)
            _ui.clear_selection("rv")
            _ui.flash("success", f"{len(changes)} images relabelled {target}")
            st.rerun()
