"""Review & correct: filter and order the catalogue by the model's doubt, fix labels in one click or in bulk, undo."""

from __future__ import annotations

import math

import streamlit as st

from core.auth import Action
from core.catalog.deletion import delete_images
from core.catalog.labels import bulk_relabel
from core.ml.label_checks import label_health
from core.schema import Split
from core.views.accept import accept_predictions
from core.views.review import LabelState, ReviewItem, ReviewOrder, ReviewPage, review_queue
from pages import _auth, _cards, _keyboard, _ui

CELL_KEY = _ui.REVIEW_CELL_KEY
ALL = _ui.REVIEW_ALL
KEYS = _ui.REVIEW_FILTERS
DEFAULTS = {"category": ALL, "label_state": LabelState.ALL.value, "split": ALL, "order": "lowest-confidence"}
PAGE_SIZE = 24
KEYBOARD_DONE_KEY = "review_keyboard_done"  # photos labelled or kept in keyboard review, this session
PAGE_KEY = "review_page"
SHOWN_QUERY_KEY = "review_shown_query"  # the filters the grid was last shown with: a change goes back to page 1
URL_KEY = "review_url_filters"  # the filters last read from (or written to) the url's query string
COUNT_FRAGMENT = "review_count"
BULK_TARGET_KEY = "review_bulk_target"
BULK_DELETE_REASON_KEY = "review_bulk_delete_reason"
SEARCH_KEY = "review_search"
# Filters, page and keyboard mode outlive a visit to another page (Streamlit drops undrawn widgets' state otherwise).
KEEP = "session"

db = _ui.get_db()
_auth.require(Action.LABEL)
_ui.show_flash()
st.title("Review & correct")
categories = _ui.category_names(db)
OPTIONS = {
    "category": [ALL, *categories],
    "label_state": [s.value for s in LabelState],
    "split": [ALL, *(s.value for s in Split)],
    "order": [o.value for o in ReviewOrder],
}


def _filters_from_url() -> None:
    """A link such as /review?label_state=unlabelled&category=Shoes opens the page with those filters (once per
    distinct link: afterwards the widgets rule, and the url follows them)."""
    given = {name: st.query_params[name] for name in KEYS if name in st.query_params}
    stamp = sorted(given.items())
    if not given or st.session_state.get(URL_KEY) == stamp:
        return
    st.session_state[URL_KEY] = stamp
    st.session_state.pop(CELL_KEY, None)
    for name, key in KEYS.items():
        value = given.get(name, DEFAULTS[name])
        if value not in OPTIONS[name]:
            what = name.replace("_", " ")
            st.warning(_ui.md_escape(f"The link's {what} {value!r} does not exist here: showing all."))
            value = DEFAULTS[name]
        st.session_state[key] = value


def _filters_to_url(query: dict[str, str | None]) -> None:
    shown = {
        name: value
        for name, value in query.items()
        if name in DEFAULTS and value is not None and value != DEFAULTS[name]
    }
    stamp = sorted(shown.items())
    if st.session_state.get(URL_KEY) != stamp:
        st.session_state[URL_KEY] = stamp
        st.query_params.from_dict(shown)


def _count_line(query: dict[str, str | None], first: list[ReviewPage]) -> None:
    """`N images match; page p of P`. A keyed fragment: a card's label change redraws it (the count of a filtered
    queue changes) without redrawing the page."""
    if first:
        page = first.pop()
        total, number, pages = page.total, page.page, page.pages
    else:
        total = review_queue(db, page=1, page_size=1, **query).total
        pages = max(1, math.ceil(total / PAGE_SIZE))
        number = min(int(st.session_state.get(PAGE_KEY, 1)), pages)
    st.text(f"{total} images match; page {number} of {pages}")


def _apply_bulk(items: list[ReviewItem]) -> None:
    # A callback: the ticks are read now (a tick redraws only its card); the picked category is reset afterwards, so
    # the next click cannot relabel with it by accident.
    selected = _cards.ticked(items, prefix="rv")
    target = st.session_state.get(BULK_TARGET_KEY)
    if not selected:
        _ui.flash("warning", "Select some images first (the box under each image).")
        return
    if target is None:
        _ui.flash("warning", "Choose the category for the selected images first.")
        return
    if target not in categories:  # typed: an existing category in other case or spacing, or a new one
        target = _ui.flash_errors(_ui.typed_category, db, target)
        if target is None:
            return
    changes = _ui.flash_errors(
        bulk_relabel,
        db,
        selected,
        target,
        actor=_ui.actor(),
        seen_predictions=_cards.seen_predictions(items),
        expected_labels=_cards.shown_labels(items),  # a label changed in another tab since is not overwritten
    )
    if changes is not None:
        _ui.remember_changes(changes)
        _cards.clear_selection("rv")
        st.session_state[BULK_TARGET_KEY] = None
        _ui.flash("success", f"{_ui.plural(len(changes), 'image')} relabelled {target}")


def _delete_selected(items: list[ReviewItem]) -> None:
    # A callback, like _apply_bulk: the ticks are read at the click.
    selected = _cards.ticked(items, prefix="rv")
    if not selected:
        _ui.flash("warning", "Select the images to delete first (the box under each image).")
        return
    reason = str(st.session_state.get(BULK_DELETE_REASON_KEY) or "").strip() or "deleted on the Review page"
    deleted = _ui.flash_errors(delete_images, db, selected, actor=_ui.actor(), reason=reason)
    if deleted is not None:
        _cards.clear_selection("rv")
        st.session_state[BULK_DELETE_REASON_KEY] = ""
        _ui.flash("success", f"Deleted {_ui.plural(len(deleted), 'image')} ({reason})")


cell = st.session_state.get(CELL_KEY)
_filters_from_url()
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
        category = c1.selectbox("Category", OPTIONS["category"], key=KEYS["category"], persist_state=KEEP)
        state = c2.selectbox("Labels", OPTIONS["label_state"], key=KEYS["label_state"], persist_state=KEEP)
        split = c3.selectbox("Split", OPTIONS["split"], key=KEYS["split"], persist_state=KEEP)
        order = c4.selectbox("Order", OPTIONS["order"], key=KEYS["order"], persist_state=KEEP)
        search = st.text_input(
            "Search",
            key=SEARCH_KEY,
            persist_state=KEEP,
            placeholder="file name, #id or SKU (exact or its beginning; sku:AB-1 searches SKUs only)",
            label_visibility="collapsed",
        )
        st.form_submit_button("Apply filters")
    query = {
        "category": None if category == ALL else category,
        "label_state": state,
        "split": None if split == ALL else split,
        "order": order,
        "search": search.strip() or None,
    }
    _filters_to_url(query)

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


def _accept_confident(query: dict[str, str | None]) -> None:
    """Accept every prediction at or above a confidence for the unlabelled photos of these filters: a preview count
    first, then one click, one undo step."""
    threshold = st.slider("Accept predictions at or above", 0.5, 0.99, 0.9, 0.01, format="%.2f", key="review_accept_at")
    filters = {name: query.get(name) for name in ("category", "split", "search")}
    ok, preview = _ui.attempt(
        accept_predictions, db, min_confidence=threshold, actor=_ui.actor(), dry_run=True, **filters
    )
    if not ok:
        return
    st.text(preview.describe())
    if st.button(f"Accept {_ui.plural(preview.count, 'prediction')}", disabled=not preview.count, type="primary"):
        ok, done = _ui.attempt(accept_predictions, db, min_confidence=threshold, actor=_ui.actor(), **filters)
        if ok:
            _ui.remember_events(done.event_ids)
            _ui.flash("success", f"{done.describe()} Undo takes them all back.")
            st.rerun()


# A toggle, not an expander: an expander's body runs (and its preview query with it) even while closed.
if page.version_id is not None and not cell and st.toggle("Accept confident predictions in bulk", key="review_accept"):
    with st.container(border=True):
        _accept_confident(query)

may_delete = _auth.may(Action.DELETE_IMAGES)
may_add = _auth.may(Action.ADD_CATEGORY)
left, middle, right, *delete_column = st.columns([2, 1, 1, 1] if may_delete else [2, 1, 1], vertical_alignment="bottom")
left.selectbox(
    "Category for the selected images" + (" (type a new name to create one)" if may_add else ""),
    categories,
    index=None,  # nothing until chosen: a click must not relabel with whichever category happens to be first
    placeholder="choose a category",
    accept_new_options=may_add,
    key=BULK_TARGET_KEY,
)
middle.button("Relabel selected", width="stretch", on_click=_apply_bulk, args=(page.items,))
if delete_column:
    with delete_column[0].popover("Delete selected", icon=":material/delete:", width="stretch"):
        st.text(
            "The ticked images are deleted for good: their files, labels and predictions. An audit row keeps each "
            "one's name, hash and label."
        )
        st.text_input("Reason (optional)", key=BULK_DELETE_REASON_KEY, placeholder="e.g. not product photos")
        st.button(
            "Delete the selected images",
            key="review_delete_selected",
            type="primary",
            on_click=_delete_selected,
            args=(page.items,),
        )
if right.button("Undo my last change", width="stretch", shortcut="U", help="Takes back changes made in this session"):
    changes = _ui.undo_session_change(db)
    if changes is not None:
        done = st.session_state.get(KEYBOARD_DONE_KEY, [])
        for change in changes:  # an undone keyboard label brings its photo back
            if change.image_id in done:
                done.remove(change.image_id)
        _ui.flash("success", f"Undone: {_ui.plural(len(changes), 'label change')}")
        st.rerun()

# A label change can move a photo out of a queue filtered by label or category: then the count follows each click.
follows_labels = bool(cell) or query.get("category") is not None or query.get("label_state") != LabelState.ALL
st.fragment(_count_line, key=COUNT_FRAGMENT)(query, [page])
if not page.items:
    st.info("Nothing to review with these filters.")
keyboard = st.toggle(
    "Keyboard review: one photo at a time, a fixed key per category (legend below the photo), Enter keeps the "
    "label, Right skips",
    key="review_keyboard",
    persist_state=KEEP,
    disabled=not page.items,
)
also = [COUNT_FRAGMENT] if follows_labels else []
if keyboard and page.items:
    done: list[int] = st.session_state.setdefault(KEYBOARD_DONE_KEY, [])
    _keyboard.keyboard_review(db, [i.image_id for i in page.items], categories, done, also_rerun=also)
else:
    delete = _cards.CardDelete("deleted on the Review page") if may_delete else None
    _cards.card_grid(db, page.items, categories, prefix="rv", also_rerun=also, delete=delete)
if page.pages > 1:
    st.pagination(page.pages, key=PAGE_KEY, persist_state=KEEP)
