"""Small helpers every page shares: the page list, the cached database, the actor and this session's changes, error
and message display, wording. The sidebar, image cards and keyboard review live in pages/_sidebar.py,
pages/_cards.py and pages/_keyboard.py."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import streamlit as st

from core.catalog.ingest import ImportResult, stored_before
from core.catalog.labels import LabelChange, get_or_add_category, list_categories, undo_last_change
from core.db import Database, open_database
from core.errors import NotFound, ProdcatError, as_storage_error
from core.jobs.queue import fail_stale_jobs
from core.settings import get_settings
from pages import _auth
from pages._text import md_escape  # used here and by pages as _ui.md_escape; defined once, in _text

log = logging.getLogger(__name__)

FLASH_KEY = "_flash"
SESSION_CHANGES_KEY = "session_label_events"  # audit event ids of the label changes made in this browser session
# key -> (file, title, url path); streamlit_app.py builds the navigation from this, pages link with it.
# Each url path is its file's name on purpose. With a `pages/` folder next to the entry point, Streamlit 1.67 runs the
# first script run of a fresh server in its legacy folder mode (PagesManager.uses_pages_directory, a process-wide flag
# that only st.navigation clears). In that mode a deep link to a path no file is named after shows "Page not found";
# one named after its file runs that file alone, and `leave_legacy_pages_mode` (called by get_db, the first thing
# every page does) then reruns it once under streamlit_app.py's st.navigation.
PAGES: dict[str, tuple[str, str, str]] = {
    "home": ("pages/home.py", "Home", ""),
    "upload": ("pages/upload.py", "Upload & classify", "upload"),
    "review": ("pages/review.py", "Review & correct", "review"),
    "dashboard": ("pages/dashboard.py", "Dashboard", "dashboard"),
    "health": ("pages/health.py", "Data health", "health"),
    "train": ("pages/train.py", "Train & models", "train"),
    "categories": ("pages/categories.py", "Categories & data", "categories"),
    "duplicates": ("pages/duplicates.py", "Duplicates", "duplicates"),
    "accounts": ("pages/accounts.py", "Accounts & tokens", "accounts"),
}

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


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 photo`, `2 photos`, `0 photos` (`many` for irregular plurals: plural(2, "is", "are") -> `2 are`)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def category_names(db: Database) -> list[str]:
    """Live category names, for pickers."""
    return [c.name for c in list_categories(db)]


def typed_category(db: Database, name: str) -> str:
    """core.catalog.labels.get_or_add_category as this session's person."""
    return get_or_add_category(db, name, actor=actor())


# --- database and actor ------------------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False)
def _database(url: str, data_dir: str) -> Database:
    # Keyed by URL and data dir so two configurations (e.g. two tests in one process) never share a handle.
    db = open_database(get_settings())
    # Once per process: a job whose worker died while the app was down must not look "running" forever.
    try:
        fail_stale_jobs(db)
    except Exception as exc:  # a read-only database can still be browsed; its writes are refused one by one
        if refusal_of(exc) is None:  # (which logs the failure)
            raise
    return db


def leave_legacy_pages_mode() -> None:
    """Leave Streamlit's legacy `pages/` folder mode when it ran this page directly (the first run of a fresh server
    opened on a page's url): one rerun under streamlit_app.py's st.navigation, on the same url and query string (e.g.
    the Review page's filters), so no "Page not found" is shown and the page gets the app's navigation and sidebar.

    AppTest starts every run in that mode (it resets the flag per run), so there the page draws the navigation and
    sidebar itself instead, as streamlit_app.py would."""
    from streamlit import config
    from streamlit.runtime.pages_manager import PagesManager

    if not PagesManager.uses_pages_directory:
        return
    if config.get_option("global.appTest"):  # looked up per call: AppTest patches config.get_option
        from pages._sidebar import app_shell  # the sidebar module imports this one

        app_shell()
        return
    PagesManager.uses_pages_directory = False  # as st.navigation does; process-wide, so this happens once
    st.rerun()


def get_db() -> Database:
    """The app's database for the current settings, migrated, with stale training jobs failed once.

    Every page calls this first, so it also takes a page out of Streamlit's legacy folder mode (see PAGES)."""
    leave_legacy_pages_mode()
    return database()


def database() -> Database:
    """The app's database (what get_db returns), for the shell that draws the navigation itself.

    When it cannot be opened (a refused data directory, an unreachable server...), the page shows why and stops."""
    settings = get_settings()
    with shown_errors():
        return _database(settings.resolved_database_url, str(settings.data_dir))
    st.stop()  # shown_errors showed why


def actor() -> str:
    """Who makes changes, as the audit trail records it: the signed-in account (or API token)."""
    return _auth.current().actor


def remember_changes(changes: Iterable[LabelChange | None]) -> None:
    """Note the audit events of label changes made in this session: undo on the page takes back only these,
    so people who all keep the default name never undo each other's work."""
    remember_events(c.event_id for c in changes if c is not None and c.event_id is not None)


def remember_events(event_ids: Iterable[int]) -> None:
    """Note audit event ids of this session's batch (say, accepted predictions) for its undo."""
    st.session_state.setdefault(SESSION_CHANGES_KEY, []).extend(int(i) for i in event_ids)


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
    except Exception as exc:
        refusal = refusal_of(exc)
        if refusal is None:
            raise
        st.error(md_escape(refusal))
    return None


# --- errors and messages -----------------------------------------------------------------------------------------


class _Outcome:
    failed: bool = False


def refusal_of(exc: Exception) -> ProdcatError | None:
    """What a person should read for `exc`: a ProdcatError as it is; a database or disk failure (locked, read-only,
    full...) as core.errors.StorageError, its full text (SQL, parameters, paths) logged for the operator; None for
    anything else (a bug: let it propagate)."""
    if isinstance(exc, ProdcatError):
        return exc
    refusal = as_storage_error(exc)
    if refusal is not None:
        log.error("shown as %r: %s", str(refusal), exc, exc_info=exc)
    return refusal


@contextmanager
def shown_errors(where: Any = None, *, before_error: Callable[[Exception], None] | None = None) -> Iterator[_Outcome]:
    """Run a core call; a ProdcatError or a database/disk failure becomes `st.error` (in `where` if given) and the
    page goes on (a failure's message never shows SQL, parameters or server paths). `before_error(exc)`, if given,
    draws what belongs above that error (an import's report of what it stored first).

    Anything else propagates, so bugs are not hidden (and AppTest sees them).
    """
    outcome = _Outcome()
    try:
        yield outcome
    except Exception as exc:
        refusal = refusal_of(exc)
        if refusal is None:
            raise
        outcome.failed = True
        if before_error is not None:
            before_error(exc)
        (where or st).error(md_escape(refusal))


def attempt(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """(True, result) or (False, None) after showing the ProdcatError."""
    with shown_errors() as outcome:
        return True, fn(*args, **kwargs)
    return not outcome.failed, None


def show_import(result: ImportResult) -> None:
    """An import's report: the counts, its notes, and each refused file with the reason."""
    st.success(result.summary())
    for note in result.notes:
        st.warning(md_escape(note))
    if result.refused:
        st.dataframe([{"file": r.name, "reason": r.reason} for r in result.refused], hide_index=True)


def show_stored_before(exc: Exception) -> None:
    """For an import that an error stopped part-way: what its committed batches stored (`stored_before`)."""
    if (partial := stored_before(exc)) is not None:
        st.warning("The import stopped on an error. Stored before it:")
        show_import(partial)


def attempt_import(fn: Callable[..., ImportResult], *args: Any, **kwargs: Any) -> tuple[bool, ImportResult | None]:
    """`attempt` for an import: when an error ends it part-way, what it stored before is shown above the error."""
    with shown_errors(before_error=show_stored_before) as outcome:
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
    """For widget callbacks: run a core call, queue its ProdcatError (or database/disk failure, see shown_errors) as
    an error message; None on failure."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        refusal = refusal_of(exc)
        if refusal is None:
            raise
        flash("error", str(refusal))
        return None


# --- tables -------------------------------------------------------------------------------------------------------

PERCENT_COLUMN = st.column_config.NumberColumn(format="%.1f%%")


def percent_columns(frame: Any, columns: Iterable[str]) -> tuple[Any, dict[str, Any]]:
    """`frame` (a pandas DataFrame) with the rate `columns` (fractions) as percentages with one decimal, and the
    column_config for st.dataframe; its own "percent" format shows 0% next to 66.67% in one column."""
    names = [c for c in columns if c in frame.columns]
    return frame.assign(**{c: frame[c].astype(float) * 100 for c in names}), dict.fromkeys(names, PERCENT_COLUMN)
