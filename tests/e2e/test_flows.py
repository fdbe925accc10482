"""Browser checks of what only a real server and Chromium show: deep links on a fresh server, the favicon, a bad
upload category refused before import, a new category typed into the batch picker, two quick downloads, an
import interrupted by leaving the page, and keyboard review's first key press (the real `streamlit run` and
Playwright helpers of test_browser.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from core.catalog.labels import add_category, archive_category
from core.catalog.stats import catalogue_stats
from core.db import close_all, open_database
from core.ml.versions import activate_version
from core.settings import Settings
from pages._ui import PAGES
from tests.core.training_helpers import save_random_version
from tests.e2e.test_browser import CHROMIUM_ARGS, _wait_idle, sign_in
from tests.imagegen import image_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _setup(
    data_dir: Path, *, archived: str | None = None, categories: tuple[str, ...] = (), model: bool = False
) -> None:
    """Write what a test needs straight into the server's (still unopened) database."""
    db = open_database(Settings(data_dir=data_dir, auth="none"))  # setting up, not a person
    for name in categories:
        add_category(db, name, actor="setup")
    if archived:
        add_category(db, archived, actor="setup")
        archive_category(db, archived, actor="setup")
    if model:
        activate_version(db, save_random_version(db, ["Shoes", "Bags"], seed=1), actor="setup")
    close_all()


def _png(name: str, k: int) -> dict[str, object]:
    return {"name": name, "mimeType": "image/png", "buffer": image_bytes("Shoes", k, size=24)}


def _browser(pw: Any, executable: str) -> tuple[Any, Any]:
    browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1400, "height": 1600}, accept_downloads=True)
    page.set_default_timeout(30_000)
    return browser, page


def test_deep_link_with_filters_on_a_fresh_server_and_a_local_favicon(chromium: str, server: tuple[str, Path]) -> None:
    from playwright.sync_api import expect, sync_playwright

    base, data_dir = server
    _setup(data_dir, categories=("Bags", "Shoes"))
    with sync_playwright() as pw:
        browser, page = _browser(pw, chromium)
        # The very first request to this server is a page's url with filters in its query string.
        sign_in(page, base, f"/{PAGES['review'][2]}?label_state=unlabelled&category=Bags")
        page.get_by_role("heading", name="Review & correct").wait_for()
        _wait_idle(page)
        expect(page.get_by_text("Page not found")).to_have_count(0)
        filters = page.locator('[data-testid="stSelectbox"]')
        expect(filters.nth(0).get_by_role("combobox")).to_have_value("Bags")
        expect(filters.nth(1).get_by_role("combobox")).to_have_value("unlabelled")
        nav = page.locator('[data-testid="stSidebarNav"]')  # the app's navigation, not the folder's file list
        expect(nav.get_by_text("Upload & classify", exact=True)).to_be_visible()
        expect(nav.get_by_text("ui", exact=True)).to_have_count(0)
        # Another page by its url, in a new tab of the same server.
        page.goto(f"{base}/{PAGES['train'][2]}")
        page.get_by_role("heading", name="Train & models").wait_for()
        expect(page.get_by_text("Page not found")).to_have_count(0)
        icon = page.evaluate("() => [...document.querySelectorAll('link[rel~=icon]')].map(l => l.href)")
        assert icon and all(not href.startswith("http") or href.startswith(base) for href in icon), icon
        browser.close()


def test_b2_bad_category_refused_before_import_and_b1_new_name_in_the_batch_picker(
    chromium: str, server: tuple[str, Path]
) -> None:
    from playwright.sync_api import expect, sync_playwright

    base, data_dir = server
    _setup(data_dir, archived="Old")
    files = [_png(f"p{k}.png", k) for k in range(9)]
    with sync_playwright() as pw:
        browser, page = _browser(pw, chromium)
        sign_in(page, base, f"/{PAGES['upload'][2]}")
        page.get_by_role("heading", name="Upload & classify").wait_for()
        _wait_idle(page)
        page.locator('[data-testid="stFileUploader"] input[type="file"]').first.set_input_files(files)
        expect(page.get_by_text("p8.png", exact=True)).to_be_visible()
        select = page.locator('[data-testid="stSelectbox"]').first
        select.click()
        page.keyboard.type("Old")
        page.get_by_role("option").filter(has_text="Old").first.click()
        _wait_idle(page)
        expect(page.get_by_text("the category 'Old' is archived; un-archive it (Categories & data)")).to_be_visible()
        expect(page.get_by_role("button", name="Import")).to_be_disabled()
        expect(page.get_by_text("p8.png", exact=True)).to_be_visible()  # the files are still chosen
        assert catalogue_stats(open_database(Settings(data_dir=data_dir))).total_images == 0

        # Another category: the same files go in (none lost), and a new name typed in the batch picker labels them.
        select.click()
        page.keyboard.type("Boots")
        page.get_by_role("option").filter(has_text="Boots").first.click()
        _wait_idle(page)
        # A rerun can briefly show the stale form beside the new one: click once only one Import button is left.
        expect(page.get_by_role("button", name="Import")).to_have_count(1)
        expect(page.get_by_role("button", name="Import")).to_be_enabled()
        page.get_by_role("button", name="Import").click()
        expect(page.get_by_text("9 imported, 0 duplicates, 0 refused")).to_be_visible()
        target = page.locator('[data-testid="stSelectbox"]').filter(has_text="Category for the selected photos")
        target.click()
        page.keyboard.type("Sneakers")
        page.get_by_role("option").filter(has_text="Sneakers").first.click()
        page.get_by_role("button", name="Apply to all 9 photos").click()
        expect(page.get_by_text("9 photos labelled Sneakers")).to_be_visible()
        browser.close()
    close_all()


def test_b5_two_downloads_in_quick_succession_both_arrive(chromium: str, server: tuple[str, Path]) -> None:
    from playwright.sync_api import sync_playwright

    base, data_dir = server
    _setup(data_dir, model=True)
    with sync_playwright() as pw:
        browser, page = _browser(pw, chromium)
        got: list[str] = []
        page.on("download", lambda download: got.append(download.suggested_filename))
        sign_in(page, base)
        page.get_by_role("heading", name="prodcat").wait_for()
        page.locator('[data-testid="stSidebarNav"]').get_by_text("Categories & data", exact=True).click()
        page.get_by_role("heading", name="Categories & data").wait_for()
        _wait_idle(page)
        # The second click right after the first, as a person clicking two buttons in a row: before, the first one's
        # rerun replaced the second's deferred file and that download was lost.
        page.get_by_role("button", name="Download labels.csv").click()
        page.get_by_role("button", name="Download model (.zip)").click()
        for _ in range(100):
            if len(got) == 2:
                break
            page.wait_for_timeout(100)
        assert sorted(got) == ["labels.csv", "model-v1.zip"]
        browser.close()


def test_b7_leaving_mid_import_says_what_was_stored_and_resumes_the_rest(
    chromium: str, server: tuple[str, Path]
) -> None:
    from playwright.sync_api import expect, sync_playwright

    base, data_dir = server
    n = 400
    files = [_png(f"p{k:03d}.png", k) for k in range(n)]
    with sync_playwright() as pw:
        browser, page = _browser(pw, chromium)
        sign_in(page, base, f"/{PAGES['upload'][2]}")
        page.get_by_role("heading", name="Upload & classify").wait_for()
        page.locator('[data-testid="stFileUploader"] input[type="file"]').first.set_input_files(files)
        expect(page.get_by_text("p399.png", exact=True)).to_be_visible()
        expect(page.get_by_role("button", name="Import")).to_have_count(1)
        page.get_by_role("button", name="Import").click()
        page.get_by_text(re.compile(rf"^\d+/{n}: ")).first.wait_for()  # under way
        page.locator('[data-testid="stSidebarNav"]').get_by_text("Dashboard", exact=True).click()
        page.get_by_role("heading", name="Dashboard").wait_for()
        page.locator('[data-testid="stSidebarNav"]').get_by_text("Upload & classify", exact=True).click()
        page.get_by_role("heading", name="Upload & classify").wait_for()

        notice = page.get_by_text(re.compile(rf"Import interrupted: \d+ of {n} files stored; \d+ not imported"))
        expect(notice).to_be_visible()
        stored, missing = (int(x) for x in re.findall(r"(\d+) of \d+ files stored; (\d+) not", notice.inner_text())[0])
        assert 0 < stored < n and stored + missing == n
        page.get_by_role("button", name=re.compile(r"Import the remaining \d+ files")).click()
        expect(notice).to_have_count(0, timeout=60_000)  # all done
        summary = page.get_by_text(re.compile(r"^\d+ imported, \d+ duplicates?, 0 refused$"))
        expect(summary).to_be_visible(timeout=60_000)
        imported, duplicates = (int(x) for x in re.findall(r"\d+", summary.inner_text())[:2])
        assert imported + duplicates == n  # every file accounted for
        browser.close()
    assert catalogue_stats(open_database(Settings(data_dir=data_dir))).total_images == n
    close_all()


def _labels_of(data_dir: Path) -> dict[str, str]:
    """File name -> label of the labelled images, read from the server's database."""
    from core.views.review import review_queue

    db = open_database(Settings(data_dir=data_dir, auth="none"))
    page = review_queue(db, page=1, page_size=50, order="newest")
    close_all()
    return {item.original_name: item.label for item in page.items if item.label is not None}


def test_keyboard_review_keys_act_at_once_when_the_mode_is_switched_on_and_when_the_page_opens_in_it(
    chromium: str, server: tuple[str, Path]
) -> None:
    """The first key press labels: no click into the page first (the toggle just clicked kept the focus, and
    Streamlit ignores shortcuts typed into a form control)."""
    from playwright.sync_api import expect, sync_playwright

    from core.catalog.ingest import Upload, import_uploads

    base, data_dir = server
    _setup(data_dir, categories=("Bags", "Hats", "Shoes"))
    db = open_database(Settings(data_dir=data_dir, auth="none"))
    import_uploads(db, [Upload(f"p{k}.png", image_bytes("Bags", 300 + k, size=24)) for k in range(3)], actor="setup")
    close_all()
    with sync_playwright() as pw:
        browser, page = _browser(pw, chromium)
        sign_in(page, base, f"/{PAGES['review'][2]}?label_state=unlabelled")
        page.get_by_role("heading", name="Review & correct").wait_for()
        _wait_idle(page)
        page.get_by_text("Keyboard review: one photo at a time").click()
        card = page.locator('[class*="st-key-kb_card_"]')
        expect(card).to_have_count(1)
        _wait_idle(page)
        first = card.get_by_text(re.compile(r"^#\d+ p\d\.png")).inner_text().split()[1]
        page.keyboard.press("1")  # Bags, straight away
        expect(page.get_by_text(re.compile(rf"Last: #\d+ {re.escape(first)}: labelled Bags"))).to_be_visible()
        assert _labels_of(data_dir) == {first: "Bags"}

        # Another page and back: the review page opens in keyboard mode, and again the first key acts (this half
        # passed before the focus fix too: the sidebar link that keeps the focus is no form control).
        page.locator('[data-testid="stSidebarNav"]').get_by_text("Home", exact=True).click()
        page.get_by_role("heading", name="prodcat").wait_for()
        page.locator('[data-testid="stSidebarNav"]').get_by_text("Review & correct", exact=True).click()
        page.get_by_role("heading", name="Review & correct").wait_for()
        expect(card).to_have_count(1)
        _wait_idle(page)
        second = card.get_by_text(re.compile(r"^#\d+ p\d\.png")).inner_text().split()[1]
        assert second != first
        # The photo's buttons drawn (a press before they are there has nothing to act on; seen once in CI, under
        # load); the first press still has to act.
        expect(card.get_by_role("button", name=re.compile(r"^Shoes"))).to_be_enabled()
        page.keyboard.press("3")  # Shoes
        expect(page.get_by_text(re.compile(rf"Last: #\d+ {re.escape(second)}: labelled Shoes"))).to_be_visible()
        assert _labels_of(data_dir) == {first: "Bags", second: "Shoes"}
        browser.close()
