"""Sign-in in a real Chromium against a real server: a wrong password is refused on the form, the session cookie is
HttpOnly, a labeller sees no Retrain button (and core would refuse one), and signing out ends the session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.e2e.test_browser import ACTOR, CHROMIUM_ARGS, ROOT, _wait_idle

LABELLER, LABELLER_PASSWORD = "lena", "lena's password"


def _add_labeller(data_dir: Path) -> None:
    env = {**os.environ, "PRODCAT_DATA_DIR": str(data_dir), "PRODCAT_AUTH": "builtin"}
    env.pop("PRODCAT_DATABASE_URL", None)
    subprocess.run(
        [sys.executable, "-m", "core.cli", "users", "add", LABELLER, "--role", "labeller", "--password-stdin",
         "--actor", ACTOR],
        cwd=ROOT, env=env, input=LABELLER_PASSWORD + "\n", text=True, check=True, capture_output=True,
    )  # fmt: skip


def test_a_labeller_signs_in_sees_no_retrain_and_signs_out(chromium: str, server: tuple[str, Path]) -> None:
    from playwright.sync_api import expect, sync_playwright

    base, data_dir = server
    _add_labeller(data_dir)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.set_default_timeout(30_000)
        page.goto(f"{base}/train")  # a stranger gets the server's sign-in form, not the app
        page.get_by_label("Name").fill(LABELLER)
        page.get_by_label("Password").fill("not the password")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("alert")).to_contain_text("wrong name or password")

        page.get_by_label("Password").fill(LABELLER_PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{base}/train")
        page.get_by_role("heading", name="Train & models").wait_for()
        page.get_by_text(f"Signed in as {LABELLER} (labeller)").wait_for()
        page.get_by_text("Retraining needs a trainer account").wait_for()  # the first visit imports torch: slow
        _wait_idle(page)
        expect(page.get_by_role("button", name="Retrain (quick)")).to_have_count(0)
        cookie = next(c for c in page.context.cookies() if c["name"] == "prodcat_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"

        page.get_by_role("link", name="Sign out").click()
        page.wait_for_url(f"{base}/auth/login")
        assert not [c for c in page.context.cookies() if c["name"] == "prodcat_session"]
        page.goto(f"{base}/train")
        page.get_by_label("Password").wait_for()
        assert page.url.startswith(f"{base}/auth/login?next=/train")
        browser.close()
