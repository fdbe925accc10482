"""Shared UI helpers for every page: the cached database, the sidebar, the actor, error display, image cards."""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import streamlit as st

from core.db import Database, open_database
from core.errors import NotFound, ProdcatError
from core.jobs import fail_stale_jobs
from core.labels import (
    LabelChange,
    SeenPrediction,
    audit_trail,
    bulk_relabel,
    list_categories,
    set_label,
    undo_last_change,
)
from core.overview import Overview, error_headline, home_overview, job_progress
from core.review import ReviewItem
from core.schema import JobStatus
from core.settings import get_settings
from core.similar import similar_images

ACTOR_KEY = "actor"
FLASH_KEY = "_flash"
SESSION_CHANGES_KEY = "session_label_events"  # audit event ids of the label changes made in this browser session
# key -> (file, title, url path); streamlit_app.py builds the navigation from this, pages link with it.
# The url paths deliberately differ from the file names: with a `pages/` folder next to the entry point, Streamlit
# 1.67 starts a fresh server (and every AppTest run) in its old folder-based mode until st.navigation runs, and in
# that mode a URL equal to a file name (/dashboard) would run pages/dashboard.py on its own, without the sidebar.
# An unknown path falls back to streamlit_app.py, whose st.navigation then picks the right page.
PAGES: dict[str, tuple[str, str, str]] = {
    "home": ("pages/home.py", "Home", ""),
    "upload": ("pages/upload.py", "Upload & classify", "upload-and-classify"),
    "review": ("pages/review.py", "Review & correct", "review-and-correct"),
    "dashboard": ("pages/dashboard.py", "Dashboard", "model-dashboard"),
    "health": ("pages/health.py", "Data health", "data-health"),
    "train": ("pages/train.py", "Train & models", "train-and-models"),
    "categories": ("pages/categories.py", "Categories & data", "categories-and-data"),
    "duplicates": ("pages/duplicates.py", "Duplicates", "near-duplicates"),
}

_MARKDOWN_SPECIALS = set(string.punctuation)

# The Review page's filter widgets (keys) and its "everything" choice: other pages open it with chosen filters.
REVIEW_FILTERS = {
    "category": "review_category",
    "label_state": "review_state",
    "split": "review_split",
    "order": "review_order",
}
REVIEW_ALL = "(all)"
REVIEW_CELL_KEY = "review_cell"  # a confusion-matrix cell's review_queue keyword arguments, set by the dashboard


def open_review(**filters: str) -> None:
    """Switch to the Review page showing these filters (review_queue keyword names); the others show everything."""
    st.session_state.pop(REVIEW_CELL_KEY, None)
    for name, key in REVIEW_FILTERS.items():
        st.session_state[key] = str(filters.get(name, REVIEW_ALL if name in ("category", "split") else ""))
    if not filters.get("label_state"):
        st.session_state[REVIEW_FILTERS["label_state"]] = "all"
    if not filters.get("order"):
        st.session_state[REVIEW_FILTERS["order"]] = "lowest-confidence"
    st.switch_page(PAGES["review"][0])


def md_escape(text: object) -> str:
    """User text (file and category names, error messages) made safe for Markdown-rendering elements.

    CommonMark lets any ASCII punctuation be backslash-escaped, so names like `*sale*`, `[x](y)` or `:red[x]` show
    literally instead of as formatting, links or Streamlit colour directives.
    """
    return "".join("\\" + ch if ch in _MARKDOWN_SPECIALS else ch for ch in str(text)).replace("\n", " ")


# --- database and actor ------------------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False)
def _database(url: str, data_dir: str) -> Database:
    # Keyed by URL and data dir so two configurations (e.g. two tests in one process) never share a handle.
    db = open_database(get_settings())
    # Once per process: a job whose worker died while the app was down must not look "running" forever.
    fail_stale_jobs(db)
    return db


def get_db() -> Database:
    """The app's database for the current settings, migrated, with stale training jobs failed once."""
    settings = get_settings()
    return _database(settings.resolved_database_url, str(settings.data_dir))


def actor() -> str:
    """Who makes changes: the sidebar's "Your name", or the configured default."""
    name = str(st.session_state.get(ACTOR_KEY) or "").strip()
    return name or get_settings().default_actor


def remember_changes(changes: Iterable[LabelChange | None]) -> None:
    """Note the audit events of label changes made in this session: undo on the page takes back only these,
    so people who all keep the default name never undo each other's work."""
    ids: list[int] = st.session_state.setdefault(SESSION_CHANGES_KEY, [])
    ids.extend(c.event_id for c in changes if c is not None and c.event_id is not None)


def undo_session_change(db: Database) -> list[LabelChange] | None:
    """Undo this session's most recent label change (a whole bulk change at once); None, with the reason shown,
    when there is none left or it is refused."""
    try:
        return undo_last_change(db, actor=actor(), only_event_ids=st.session_state.get(SESSION_CHANGES_KEY, []))
    except NotFound:
        st.warning(
            "Nothing of yours to undo in this session: changes made in other browser tabs or sessions, "
            "even under the same name, are left alone."
        )
    except ProdcatError as exc:
        st.error(md_escape(exc))
    return None


# --- errors and messages -----------------------------------------------------------------------------------------


class _Outcome:
    failed: bool = False


@contextmanager
def shown_errors(where: Any = None) -> Iterator[_Outcome]:
    """Run a core call; a ProdcatError becomes `st.error` (in `where` if given) and the page goes on.

    Anything else propagates, so bugs are not hidden (and AppTest sees them).
    """
    outcome = _Outcome()
    try:
        yield outcome
    except ProdcatError as exc:
        outcome.failed = True
        (where or st).error(md_escape(exc))


def attempt(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """(True, result) or (False, None) after showing the ProdcatError."""
    with shown_errors() as outcome:
        return True, fn(*args, **kwargs)
    return not outcome.failed, None


def flash(kind: str, text: str) -> None:
    """Queue a message for the next run of the page (callbacks run before the page draws)."""
    st.session_state.setdefault(FLASH_KEY, []).append((kind, text))


def show_flash() -> None:
    """Show and forget the queued messages."""
    for kind, text in st.session_state.pop(FLASH_KEY, []):
        getattr(st, kind)(md_escape(text))


def flash_errors(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """For widget callbacks: run a core call, queue its ProdcatError as an error message; None on failure."""
    try:
        return fn(*args, **kwargs)
    except ProdcatError as exc:
        flash("error", str(exc))
        return None


# --- sidebar ----------------------------------------------------------------------------------------------------


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def job_line(overview: Overview) -> str:
    """One line on the training job: live state with its progress, or how the last one ended (first line of an
    error only: a traceback belongs on the Train page)."""
    job = overview.job
    if job is None:
        return "No training job yet."
    if job.status == JobStatus.RUNNING:
        at = job_progress(job.progress or {}).text or "training"
        return f"Training job #{job.id} running ({job.mode}, {at})."
    if job.status == JobStatus.QUEUED:
        return f"Training job #{job.id} queued ({job.mode}), waiting for a worker."
    if job.status == JobStatus.SUCCEEDED:
        made = f": model v{job.model_version_id}" if job.model_version_id else ""
        return f"Last training job #{job.id} succeeded{made}."
    return f"Last training job #{job.id} {job.status}: {error_headline(job.error)}".strip().rstrip(":")


def render_sidebar(db: Database) -> Overview:
    """Who you are, the active model and the training job, on every page.

    The model and job lines are a fragment that re-reads them every few seconds while a job is queued or running
    (so every page follows a training), and does not poll at all otherwise.
    """
    overview = home_overview(db)
    with st.sidebar:
        if ACTOR_KEY not in st.session_state:
            st.session_state[ACTOR_KEY] = get_settings().default_actor
        st.text_input("Your name", key=ACTOR_KEY, help="Recorded as the author of every label change.")
        st.fragment(_sidebar_status, run_every=overview.refresh_every_s)(db, [overview])
    return overview


# --- image cards ------------------------------------------------------------------------------------------------


def category_names(db: Database) -> list[str]:
    """Live category names, for pickers."""
    return [c.name for c in list_categories(db)]


def _seen(item: ReviewItem) -> SeenPrediction | None:
    if item.predicted_category_id is None or item.model_version_id is None or item.confidence is None:
        return None
    return SeenPrediction(item.model_version_id, item.predicted_category_id, float(item.confidence))


def seen_predictions(items: list[ReviewItem]) -> dict[int, SeenPrediction | None]:
    """What the grid showed for each image: the audit row of a bulk change records it, like a one-click one."""
    return {item.image_id: _seen(item) for item in items}


def _label_one(db: Database, item: ReviewItem, category: str, *, verb: str = "labelled") -> bool:
    """Label one photo as the person chose, with what the model showed them; remembered for this session's undo.

    False when refused (the error is queued for the next run)."""
    change = flash_errors(set_label, db, item.image_id, category, actor=actor(), seen_prediction=_seen(item))
    if change is None:
        return False
    remember_changes([change])
    if change.changed:
        flash("success", f"#{item.image_id} {item.original_name}: {verb} {category}")
    return True


def _on_pick(db: Database, item: ReviewItem, key: str) -> None:
    choice = st.session_state.get(key)
    if choice is None:  # clicking the selected pill again deselects it: keep showing the stored label
        st.session_state[key] = item.label
        return
    _label_one(db, item, choice)


def _on_accept(db: Database, item: ReviewItem) -> None:
    if item.predicted is not None:
        _label_one(db, item, item.predicted, verb="accepted")


def _on_accept_suggestion(db: Database, item: ReviewItem) -> None:
    if item.suggestion is not None:
        _label_one(db, item, item.suggestion.category, verb="relabelled (label check)")


def suggestion_text(item: ReviewItem) -> str | None:
    """`Label check: probably Shirt (81%); this label's quality 4%`, where the check doubts the label."""
    if not item.suggests_change or item.suggestion is None:
        return None
    s = item.suggestion
    flag = "likely wrong label" if s.issue else "doubtful label"
    return f"Label check: {flag}, probably {s.category} ({percent(s.probability)}); quality {percent(s.quality)}"


@st.dialog("Label history", width="large")
def show_audit(db: Database, image_id: int, name: str) -> None:
    """The audit trail of one image, newest first."""
    st.text(f"#{image_id} {name}")
    ok, rows = attempt(audit_trail, db, image_id)
    if not ok:
        return
    if not rows:
        st.text("No label changes yet.")
        return
    st.dataframe(
        [
            {
                "time (UTC)": r.time.strftime("%Y-%m-%d %H:%M:%S"),
                "who": r.actor,
                "action": r.action,
                "from": r.old_category or "",
                "to": r.new_category or "",
                "model saw": (
                    f"{r.predicted_category} ({r.predicted_confidence:.0%})"
                    if r.predicted_category and r.predicted_confidence is not None
                    else ""
                ),
                "note": r.note,
            }
            for r in rows
        ],
        hide_index=True,
    )


@st.dialog("Similar images", width="large")
def show_similar(db: Database, item: ReviewItem, categories: list[str]) -> None:
    """The photos most like this one to the active model, to relabel a whole cluster of one mistake at once."""
    ok, found = attempt(similar_images, db, item.image_id)
    if not ok:
        return
    if not found:
        st.text("Nothing to compare with yet: similar images need a trained model (retrain once).")
        return
    st.text(f"The {len(found)} photos most like #{item.image_id} {item.original_name}, to the active model")
    chosen = [item.image_id] if st.checkbox(f"Include #{item.image_id} itself", value=True, key="sim_self") else []
    columns = st.columns(4)
    for n, near in enumerate(found):
        with columns[n % 4]:
            st.image(str(near.item.thumb_path), width="stretch")
            st.text(f"#{near.item.image_id} {near.item.original_name}")
            st.text(f"Label: {near.item.label or '(unlabelled)'}  ({near.similarity:.0%} alike)")
            if st.checkbox("Select", value=True, key=f"sim_{item.image_id}_{near.item.image_id}"):
                chosen.append(near.item.image_id)
    target = st.selectbox("Relabel the selected photos as", categories, index=None, format_func=md_escape)
    if st.button(f"Relabel {len(chosen)} selected", disabled=not chosen or target is None, type="primary"):
        shown = seen_predictions([item, *(near.item for near in found)])
        ok, changes = attempt(bulk_relabel, db, chosen, target, actor=actor(), seen_predictions=shown)
        if ok:
            remember_changes(changes)
            flash("success", f"{len(changes)} similar photos relabelled {target}")
            st.rerun()


def prediction_text(item: ReviewItem) -> str:
    """`Predicted: Shoes (93%)` or that there is none."""
    if item.predicted is None:
        return "Predicted: (no model prediction)"
    return f"Predicted: {item.predicted} ({percent(item.confidence)})"


def image_card(db: Database, item: ReviewItem, categories: list[str], *, prefix: str) -> bool:
    """One image: thumbnail, name, label, prediction (top 3 on demand), one-click labelling, a selection box.

    Returns whether the image is selected.
    """
    # The key names the card in the page (CSS class st-key-<key>), which the browser test relies on.
    with st.container(border=True, key=f"{prefix}_card_{item.image_id}"):
        st.image(str(item.thumb_path), width="stretch")
        st.text(f"#{item.image_id} {item.original_name}")
        st.text(f"Label: {item.label or '(unlabelled)'}   [{item.split}]")
        st.text(prediction_text(item))
        if item.unusual:
            st.info("Unlike anything labelled so far: maybe a new category?", icon=":material/new_releases:")
        check = suggestion_text(item)
        if check is not None:
            st.warning(md_escape(check), icon=":material/report:")
            if item.suggestion is not None and item.suggestion.category in categories:
                st.button(
                    md_escape(f"Relabel as {item.suggestion.category}"),
                    key=f"{prefix}_suggest_{item.image_id}",
                    on_click=_on_accept_suggestion,
                    args=(db, item),
                    help="The category the label check (K-fold, out of sample) finds likeliest",
                    width="stretch",
                )
        if item.top3:
            with st.popover("Top 3", width="stretch"):
                for name, probability in item.top3:
                    st.text(f"{name}: {probability:.1%}")
        if item.predicted is not None and item.predicted != item.label and item.predicted in categories:
            st.button(
                "Accept prediction",
                key=f"{prefix}_accept_{item.image_id}",
                on_click=_on_accept,
                args=(db, item),
                # Prominent only where nothing is lost: on a labelled image one misclick would overwrite a person.
                type="primary" if item.label is None else "secondary",
                width="stretch",
            )
        options = list(categories)
        if item.label is not None and item.label not in options:  # e.g. an archived category
            options.append(item.label)
        # The key carries the stored label, so a change made elsewhere (bulk, undo) shows up fresh here.
        key = f"{prefix}_pick_{item.image_id}_{item.label}"
        if key not in st.session_state:
            st.session_state[key] = item.label
        st.pills(
            "Category",
            options,
            key=key,
            format_func=md_escape,
            on_change=_on_pick,
            args=(db, item, key),
            label_visibility="collapsed",
        )
        left, middle, right = st.columns(3)
        selected = left.checkbox("Select", key=_selection_key(prefix, item.image_id))
        if middle.button("Similar", key=f"{prefix}_similar_{item.image_id}", disabled=item.model_version_id is None):
            show_similar(db, item, categories)
        if right.button("History", key=f"{prefix}_hist_{item.image_id}"):
            show_audit(db, item.image_id, item.original_name)
    return bool(selected)


KEYBOARD_CHOICES = 9  # number keys 1-9


def _keyboard_order(item: ReviewItem, categories: Sequence[str]) -> list[str]:
    first = [name for name, _ in item.top3 if name in categories]
    return first + sorted(c for c in categories if c not in first)


def keyboard_choices(item: ReviewItem, categories: Sequence[str]) -> list[str]:
    """The categories offered on number keys: the model's top 3 first (most likely on 1), then the rest by name."""
    return _keyboard_order(item, categories)[:KEYBOARD_CHOICES]


def keyboard_others(item: ReviewItem, categories: Sequence[str]) -> list[str]:
    """The categories beyond the number keys (by name), offered in a picker without a shortcut."""
    return _keyboard_order(item, categories)[KEYBOARD_CHOICES:]


def _on_keyboard(db: Database, item: ReviewItem, choice: str | None, done: list[int]) -> None:
    if choice is not None and not _label_one(db, item, choice):
        return  # refused (e.g. archived meanwhile): stay on this photo, the error says why
    done.append(item.image_id)


def _on_keyboard_other(db: Database, item: ReviewItem, key: str, done: list[int]) -> None:
    choice = st.session_state.get(key)
    if choice is not None:
        _on_keyboard(db, item, choice, done)


def keyboard_card(db: Database, item: ReviewItem, categories: Sequence[str], done: list[int]) -> None:
    """One photo, large, with its category on number keys (1 = the model's first choice) and Right to skip.

    `done` (kept in session state by the page) collects the photos handled, so the next one comes up.
    """
    with st.container(border=True, key=f"kb_card_{item.image_id}"):
        picture, controls = st.columns([1, 2])
        picture.image(str(item.thumb_path), width="stretch")
        controls.text(f"#{item.image_id} {item.original_name}   [{item.split}]")
        controls.text(f"Label: {item.label or '(unlabelled)'}")
        controls.text(prediction_text(item))
        probabilities = dict(item.top3)
        buttons = controls.columns(3)
        for n, name in enumerate(keyboard_choices(item, categories), start=1):
            shown = f"{name} ({probabilities[name]:.0%})" if name in probabilities else name
            buttons[(n - 1) % 3].button(
                md_escape(shown),
                key=f"kb_pick_{item.image_id}_{n}",
                shortcut=str(n),
                on_click=_on_keyboard,
                args=(db, item, name, done),
                type="primary" if name == item.label else "secondary",
                width="stretch",
            )
        others = keyboard_others(item, categories)
        if others:  # more categories than number keys: the rest are one pick away, without a shortcut
            other_key = f"kb_other_{item.image_id}"
            controls.selectbox(
                "Other category",
                others,
                index=None,
                placeholder=f"{len(others)} more categories (no shortcut)",
                key=other_key,
                format_func=md_escape,
                on_change=_on_keyboard_other,
                args=(db, item, other_key, done),
            )
        controls.button(
            "Skip", key=f"kb_skip_{item.image_id}", shortcut="Right", on_click=_on_keyboard, args=(db, item, None, done)
        )


def _selection_key(prefix: str, image_id: int) -> str:
    return f"{prefix}_sel_{image_id}"


def clear_selection(prefix: str) -> None:
    """Untick every box of the grid `prefix` on the next run (after a bulk change: the ticks were for that change).

    A widget drawn in this run cannot be changed any more, so the boxes are reset before the grid is drawn again.
    """
    st.session_state[f"_clear_{prefix}_sel"] = True


def ticked(items: Sequence[ReviewItem], *, prefix: str) -> list[int]:
    """Ids of the images ticked in the grid `prefix`, readable before the grid is drawn (e.g. to label a button)."""
    if st.session_state.pop(f"_clear_{prefix}_sel", False):
        for key in [k for k in st.session_state if str(k).startswith(f"{prefix}_sel_")]:
            st.session_state[key] = False  # a write (not a delete) so the browser unticks the box too
    return [item.image_id for item in items if st.session_state.get(_selection_key(prefix, item.image_id))]


def card_grid(
    db: Database, items: Sequence[ReviewItem], categories: list[str], *, prefix: str, per_row: int = 4
) -> list[int]:
    """Cards in rows of `per_row`; returns the ids of the selected images."""
    ticked(items, prefix=prefix)  # a pending clear_selection unticks the boxes before they are drawn
    selected: list[int] = []
    for start in range(0, len(items), per_row):
        columns = st.columns(per_row)
        for column, item in zip(columns, items[start : start + per_row], strict=False):
            with column:
                if image_card(db, item, categories, prefix=prefix):
                    selected.append(item.image_id)
    return selected


# --- sidebar status (a fragment) -----------------------------------------------------------------------------------


def _sidebar_status(db: Database, first: list[Overview]) -> None:
    """The sidebar's model and training lines. `first` holds the overview this page run already read: it is used
    once, and each timed rerun of the fragment reads a fresh one. The fragment only reruns while a job is live, so
    when a rerun finds it ended, the whole app reruns: the page shows the new model and the polling stops."""
    timed_rerun = not first
    overview = first.pop() if first else home_overview(db)
    st.subheader("Model")
    if overview.has_model:
        st.text(f"Active: {overview.active_version_label}")
        st.text(f"Test accuracy: {percent(overview.test_accuracy)}")
    else:
        st.text("No model yet: label images, then retrain.")
    st.subheader("Training")
    st.text(job_line(overview))
    if timed_rerun and overview.refresh_every_s is None:
        st.rerun(scope="app")


# --- tables -------------------------------------------------------------------------------------------------------

PERCENT_COLUMN = st.column_config.NumberColumn(format="%.1f%%")


def percent_columns(frame: Any, columns: Iterable[str]) -> tuple[Any, dict[str, Any]]:
    """`frame` (a pandas DataFrame) with the rate `columns` (fractions) as percentages with one decimal, and the
    column_config for st.dataframe; its own "percent" format shows 0% next to 66.67% in one column."""
    names = [c for c in columns if c in frame.columns]
    return frame.assign(**{c: frame[c].astype(float) * 100 for c in names}), dict.fromkeys(names, PERCENT_COLUMN)
