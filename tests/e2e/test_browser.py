"""End to end: a real `streamlit run server.py` (pages and API on one port) driven by Playwright in a real Chromium.

Upload photos of three categories (a category per upload), retrain (quick) with the worker the app starts itself,
see predictions, correct one label, and see the dashboard's confusion matrix. With PRODCAT_SCREENSHOTS=<folder>
a full-page screenshot of every page is saved there (`make screenshots` writes docs/screenshots/).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from core.catalog.labels import audit_trail
from core.catalog.splits import split_for_hash
from core.db import close_all, open_database
from core.jobs.queue import live_workers
from core.settings import Settings
from tests.imagegen import CATEGORY_COLOURS, image_bytes
from tests.servers import ROOT, streamlit_server

if TYPE_CHECKING:
    from playwright.sync_api import FilePayload, Page

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Per category: enough train images to fit a head, and at least one validation and one test image (the split is
# fixed by the content hash, so we pick generated images by the split they will land in).
WANTED = {"train": 4, "val": 1, "test": 1}
ACTOR = "e2e-tester"
PASSWORD = "e2e password 1"


def _chromium() -> str | None:
    return (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    )


def _no_browser(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI must run the browser test (install Debian's chromium package)")
    pytest.skip(reason)


def _photos(category: str) -> list[FilePayload]:
    """Generated PNGs of one category, chosen so each split gets what WANTED asks for."""
    need = dict(WANTED)
    files: list[FilePayload] = []
    for index in range(500):
        data = image_bytes(category, index, size=40)
        split = split_for_hash(hashlib.sha256(data).hexdigest()).value
        if need.get(split, 0) > 0:
            need[split] -= 1
            files.append({"name": f"{category.lower()}_{index}.png", "mimeType": "image/png", "buffer": data})
        if not any(need.values()):
            return files
    raise AssertionError(f"could not generate enough images of {category} for every split")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real streamlit server on a free port with its own data directory; stopped (with its worker) afterwards."""
    data_dir = tmp_path / "data"
    env = {
        **os.environ,
        "PRODCAT_DATA_DIR": str(data_dir),
        "PRODCAT_IMAGE_SIZE": "32",
        "PRODCAT_PRETRAINED": "none",  # never the network
        "PRODCAT_DEVICE": os.environ.get("PRODCAT_DEVICE", "auto"),
        "PRODCAT_AUTH": "builtin",  # people sign in, as with every default
    }
    env.pop("PRODCAT_DATABASE_URL", None)
    subprocess.run(  # the account the browser signs in as, made the way an admin makes one
        [sys.executable, "-m", "core.cli", "users", "add", ACTOR, "--role", "admin", "--password-stdin"],
        cwd=ROOT, env=env, input=PASSWORD + "\n", text=True, check=True, capture_output=True,
    )  # fmt: skip
    try:
        with streamlit_server(env, tmp_path / "streamlit.log") as running:
            yield running.base, data_dir
    finally:
        _stop_workers(data_dir)


def _stop_workers(data_dir: Path) -> None:
    """The app started a detached worker (it would idle for minutes): stop it by the pid it registered."""
    if not (data_dir / "prodcat.sqlite3").exists():
        return
    db = open_database(Settings(data_dir=data_dir))
    for worker in live_workers(db):
        if worker["host"] == socket.gethostname() and worker["pid"]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(worker["pid"]), signal.SIGTERM)
    close_all()


# True when no text inside the element is cut short: Streamlit ends a label too wide for its button with an ellipsis
# (CSS text-overflow), so only those boxes are checked (not an icon's ligature before its font has loaded).
_NOT_CUT_SHORT = (
    "el => [el, ...el.querySelectorAll('*')].every("
    "e => getComputedStyle(e).textOverflow !== 'ellipsis' || e.scrollWidth <= e.clientWidth + 1)"
)


def _shoot(page: Page, name: str) -> None:
    folder = os.environ.get("PRODCAT_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.wait_for_timeout(600)  # let charts and images finish drawing
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def sign_in(page: Page, base: str, path: str = "/") -> None:
    """Open `path` signed out: the server shows its sign-in form; sign in as ACTOR and land back on `path`."""
    page.goto(base + path)  # the server sends a stranger to its sign-in form first
    page.get_by_label("Name").fill(ACTOR)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(base + path)
    page.get_by_text(f"Signed in as {ACTOR} (admin)").wait_for()


def _go(page: Page, title: str) -> None:
    """Open a page from the sidebar navigation (same browser session)."""
    page.locator('[data-testid="stSidebarNav"]').get_by_text(title, exact=True).click()
    page.get_by_role("heading", name=title).wait_for()


def _wait_idle(page: Page) -> None:
    """Until the script run that the last interaction started has finished."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=30_000)


@pytest.fixture
def chromium() -> str:
    """The browser executable; skipped locally (failed in CI) when there is none or no playwright package."""
    executable = _chromium()
    if executable is None:
        _no_browser("no chromium found")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _no_browser("the playwright package is not installed")
    return str(executable)


def test_upload_train_correct_and_dashboard(chromium: str, server: tuple[str, Path]) -> None:
    from playwright.sync_api import expect, sync_playwright

    executable = chromium
    base, data_dir = server
    started = time.monotonic()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.set_default_timeout(30_000)
        sign_in(page, base)
        page.get_by_role("heading", name="prodcat").wait_for()
        _wait_idle(page)
        _shoot(page, "home")

        # --- upload three categories, each with its category -------------------------------------------------
        _go(page, "Upload & classify")
        for category in CATEGORY_COLOURS:
            photos = _photos(category)
            page.locator('[data-testid="stFileUploader"] input[type="file"]').first.set_input_files(photos)
            expect(page.get_by_text(str(photos[0]["name"]), exact=True)).to_be_visible()
            select = page.locator('[data-testid="stSelectbox"]').first
            select.click()
            page.keyboard.type(category)
            # A new name is offered as an extra option: pick it like a person would.
            page.get_by_role("option").filter(has_text=category).first.click()
            expect(select.get_by_role("combobox")).to_have_value(category)
            # A rerun can briefly show the stale form beside the new one: click once only one Import button is left.
            expect(page.get_by_role("button", name="Import")).to_have_count(1)
            page.get_by_role("button", name="Import").click()
            expect(page.get_by_text(f"{len(photos)} imported, 0 duplicates, 0 refused")).to_be_visible()
            # The cards show the label the upload gave them.
            expect(page.get_by_text(f"Label: {category}").first).to_be_visible()
        _shoot(page, "upload")

        # --- retrain (quick): the app starts a worker, the fragment follows the job -------------------------
        _go(page, "Train & models")
        page.get_by_text("quick", exact=True).click()
        _wait_idle(page)
        page.get_by_role("button", name="Retrain (quick)").click()
        expect(page.get_by_text("Last training job #1 (quick) succeeded")).to_be_visible(timeout=75_000)
        expect(page.get_by_text("All versions")).to_be_visible()
        _shoot(page, "train")

        # --- predictions on the review page; correct one label -----------------------------------------------
        _go(page, "Review & correct")
        predicted = page.get_by_text("Predicted: ").first
        expect(predicted).to_be_visible()
        assert "no model prediction" not in predicted.inner_text()
        heading = page.locator('[data-testid="stText"]').filter(has_text=re.compile(r"^#\d+ ")).first.inner_text()
        image_id = int(heading[1:].split(" ", 1)[0])
        card = page.locator(f".st-key-rv_card_{image_id}")
        for action in ("Similar", "History", "Delete"):  # four cards a row: each action still says what it does
            button = card.get_by_role("button", name=action)
            expect(button).to_be_visible()
            assert button.evaluate(_NOT_CUT_SHORT), f"the card's {action} button shows its label cut short"
        label = card.get_by_text("Label: ").inner_text().split("Label: ", 1)[1].split()[0]
        other = next(c for c in CATEGORY_COLOURS if c != label)
        card.get_by_role("radiogroup").get_by_text(other, exact=True).click()
        expect(page.get_by_text(f"labelled {other}").first).to_be_visible()
        _shoot(page, "review")

        # --- dashboard: the confusion matrix is drawn by plotly ----------------------------------------------
        _go(page, "Dashboard")
        # The dashboard's first render loads plotly and scores the test split: seconds on 2 busy cores.
        expect(page.get_by_text("Confusion matrix", exact=True)).to_be_visible(timeout=30_000)
        heatmap = page.locator('[data-testid="stPlotlyChart"]').first
        expect(heatmap.locator(".js-plotly-plot")).to_be_visible(timeout=20_000)
        _shoot(page, "dashboard")
        # Clicking a cell opens the review page filtered to it: the bottom-right cell is (true Hats, predicted Hats).
        box = heatmap.locator(".nsewdrag").first.bounding_box()
        assert box is not None
        page.mouse.click(box["x"] + box["width"] * 5 / 6, box["y"] + box["height"] * 5 / 6)
        page.get_by_role("heading", name="Review & correct").wait_for()
        expect(page.get_by_text("Confusion-matrix cell: labelled Hats, predicted Hats (test split)")).to_be_visible()

        _go(page, "Categories & data")
        _shoot(page, "categories")
        browser.close()

    db = open_database(Settings(data_dir=data_dir))
    change = audit_trail(db, image_id)[0]
    assert (change.actor, change.action, change.old_category, change.new_category) == (ACTOR, "set", label, other)
    assert change.model_version_id is not None  # the person saw a prediction when correcting
    close_all()
    assert time.monotonic() - started < 150
