"""Helpers for the AppTest page tests: the app, its page files, running one page."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from streamlit.testing.v1 import AppTest
from streamlit.testing.v1.element_tree import Selectbox

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "streamlit_app.py"
PAGE_FILES = [
    "pages/home.py",
    "pages/upload.py",
    "pages/review.py",
    "pages/dashboard.py",
    "pages/health.py",
    "pages/train.py",
    "pages/categories.py",
    "pages/duplicates.py",
    "pages/accounts.py",
]
TIMEOUT_S = 60  # the first run of a page imports torch and friends


def run_page(page: str, session: dict | None = None) -> AppTest:
    """Run the app once, then switch to `page` (path relative to the repo root) and run it."""
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT_S).run()
    for key, value in (session or {}).items():
        at.session_state[key] = value
    if page != "pages/home.py":
        at.switch_page(page).run()
    return at


def errors_of(at: AppTest) -> list[str]:
    """The texts of the st.error boxes on the page."""
    return [e.value for e in at.error]


def card_ids(at: AppTest) -> list[int]:
    """Image ids of the cards on the page (each card shows `#<id> <file name>`)."""
    return [int(t.value[1:].split(" ", 1)[0]) for t in at.text if t.value.startswith("#")]


def type_new_option(box: Selectbox, name: str) -> None:
    """Type a name that is not among a selectbox's options (accept_new_options), as a person does in the browser:
    AppTest's selectbox only knows the options the page gave it, so the typed one is added (again after each run
    while it stays chosen, as the browser keeps showing it)."""
    if name not in box.options:
        box.options.append(name)
    box.set_value(name)


def plain(elements: Iterable[Any]) -> list[str]:
    """The elements' texts without the Markdown escapes the pages add."""
    return [str(e.value).replace("\\", "") for e in elements]
