"""Shared UI helpers for every page: the cached database, the sidebar, the actor, error display, image cards."""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import streamlit as st

from core.db import Database, open_database
from core.errors import ProdcatError
from core.jobs import fail_stale_jobs
from core.labels import SeenPrediction, audit_trail, list_categories, set_label
from core.overview import Overview, home_overview
from core.review import ReviewItem
from core.settings import get_settings

ACTOR_KEY = "actor"
FLASH_KEY = "_flash"
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
    "train": ("pages/train.py", "Train & models", "train-and-models"),
    "categories": ("pages/categories.py", "Categories & data", "categories-and-data"),
}

_MARKDOWN_SPECIALS = set(string.punctuation)


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


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def job_line(overview: Overview) -> str:
    """One line on the training job: live state with epoch, or how the last one ended."""
    job = overview.job
    if job is None:
        return "No training job yet."
    progress = job.progress or {}
    if job.status == "running":
        epoch, epochs = progress.get("epoch"), progress.get("epochs")
        phase = progress.get("phase") or "training"
        at = f", epoch {epoch}/{epochs}" if epoch is not None and epochs else ""
        return f"Training job #{job.id} running ({job.mode}, {phase}{at})."
    if job.status == "queued":
        return f"Training job #{job.id} queued ({job.mode}), waiting for a worker."
    if job.status == "succeeded":
        made = f": model v{job.model_version_id}" if job.model_version_id else ""
        return f"Last training job #{job.id} succeeded{made}."
    return f"Last training job #{job.id} {job.status}: {job.error}".strip()


def render_sidebar(db: Database) -> Overview:
    """Who you are, the active model and the training job, on every page."""
    overview = home_overview(db)
    with st.sidebar:
        if ACTOR_KEY not in st.session_state:
            st.session_state[ACTOR_KEY] = get_settings().default_actor
        st.text_input("Your name", key=ACTOR_KEY, help="Recorded as the author of every label change.")
        st.subheader("Model")
        if overview.has_model:
            st.text(f"Active: {overview.active_version_label}")
            st.text(f"Test accuracy: {_percent(overview.test_accuracy)}")
        else:
            st.text("No model yet: label images, then retrain.")
        st.subheader("Training")
        st.text(job_line(overview))
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


def _on_pick(db: Database, item: ReviewItem, key: str) -> None:
    choice = st.session_state.get(key)
    if choice is None:  # clicking the selected pill again deselects it: keep showing the stored label
        st.session_state[key] = item.label
        return
    change = flash_errors(set_label, db, item.image_id, choice, actor=actor(), seen_prediction=_seen(item))
    if change is not None and change.changed:
        flash("success", f"#{item.image_id} {item.original_name}: labelled {choice}")


def _on_accept(db: Database, item: ReviewItem) -> None:
    if item.predicted is None:
        return
    change = flash_errors(set_label, db, item.image_id, item.predicted, actor=actor(), seen_prediction=_seen(item))
    if change is not None and change.changed:
        flash("success", f"#{item.image_id} {item.original_name}: accepted {item.predicted}")


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


def prediction_text(item: ReviewItem) -> str:
    """`Predicted: Shoes (93%)` or that there is none."""
    if item.predicted is None:
        return "Predicted: (no model prediction)"
    return f"Predicted: {item.predicted} ({_percent(item.confidence)})"


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
                type="primary",
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
        left, right = st.columns(2)
        selected = left.checkbox("Select", key=f"{prefix}_sel_{item.image_id}")
        if right.button("History", key=f"{prefix}_hist_{item.image_id}"):
            show_audit(db, item.image_id, item.original_name)
    return bool(selected)


KEYBOARD_CHOICES = 9  # number keys 1-9


def keyboard_choices(item: ReviewItem, categories: Sequence[str]) -> list[str]:
    """The categories offered on number keys: the model's top 3 first (most likely on 1), then the rest by name."""
    first = [name for name, _ in item.top3 if name in categories]
    return (first + sorted(c for c in categories if c not in first))[:KEYBOARD_CHOICES]


def _on_keyboard(db: Database, item: ReviewItem, choice: str | None, done: list[int]) -> None:
    if choice is not None:
        change = flash_errors(set_label, db, item.image_id, choice, actor=actor(), seen_prediction=_seen(item))
        if change is None:
            return  # refused (e.g. archived meanwhile): stay on this photo, the error says why
        flash("success", f"#{item.image_id} {item.original_name}: labelled {choice}")
    done.append(item.image_id)


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
        controls.button(
            "Skip", key=f"kb_skip_{item.image_id}", shortcut="Right", on_click=_on_keyboard, args=(db, item, None, done)
        )


def card_grid(db: Database, items: Sequence[ReviewItem], categories: list[str], *, prefix: str, per_row: int = 4
              ) -> list[int]:
    """Cards in rows of `per_row`; returns the ids of the selected images."""
    selected: list[int] = []
    for start in range(0, len(items), per_row):
        columns = st.columns(per_row)
        for column, item in zip(columns, items[start : start + per_row], strict=False):
            with column:
                if image_card(db, item, categories, prefix=prefix):
                    selected.append(item.image_id)
    return selected
