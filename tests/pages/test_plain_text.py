"""Names people and suppliers choose (zip entries, files, categories) show as plain text, never as Markdown: no image
fetched from an address in a name, no link made of a URL in a category (AppTest, and the one escape helper)."""

from __future__ import annotations

import re
import string
from collections.abc import Iterator
from typing import Any

import pytest
from streamlit.delta_generator import DeltaGenerator
from streamlit.elements.progress import ProgressMixin

from core.catalog.labels import add_category, audit_trail
from core.db import Database
from pages._text import WORD_JOINER, md_escape
from tests.core.badfiles import make_zip
from tests.imagegen import image_bytes, write_image_folder
from tests.pages.helpers import card_ids, run_page

IMAGE_NAME = "![p](http://127.0.0.1:18999/x.png).png"  # as Markdown: an image the browser fetches
URL_CATEGORY = "Shoes http://evil.example"  # as GFM: a link
# What Streamlit's Markdown turns into links in text once escapes are resolved (remark-gfm's autolink literals: the
# regular expressions of mdast-util-gfm-autolink-literal, as in streamlit/static's StreamlitMarkdown bundle).
_AUTOLINK = re.compile(r"(https?://|www(?=\.))|([-.\w+]+)@([-\w]+(?:\.[-\w]+)+)", re.IGNORECASE)
_ESCAPE = re.compile(rf"\\([{re.escape(string.punctuation)}])")


def assert_plain(body: str, name: str) -> None:
    """`body` (an element's Markdown source) shows `name` exactly, with no markup and no autolink."""
    unescaped_punctuation = [ch for ch in _ESCAPE.sub("", body) if ch in string.punctuation]
    assert not unescaped_punctuation, f"Markdown syntax left in {body!r}: {unescaped_punctuation}"
    shown = _ESCAPE.sub(r"\1", body)  # the text CommonMark renders
    assert name in shown.replace(WORD_JOINER, ""), shown
    assert not _AUTOLINK.search(shown), f"{shown!r} would be linked"


def test_md_escape_breaks_markup_and_every_autolink() -> None:
    for text in [IMAGE_NAME, URL_CATEGORY, "www.shop.example", "orders@shop.example", "*sale* :red[x] $1$ <b>"]:
        assert_plain(md_escape(text), text)
    assert md_escape("a\nb") == "a b"


@pytest.fixture
def progress_texts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every text a progress bar was given (the bar is emptied when the import ends, so AppTest never sees it)."""
    seen: list[str] = []
    original = ProgressMixin.progress

    def progress(self: ProgressMixin, value: float, text: str | None = None, **kwargs: Any) -> DeltaGenerator:
        if text is not None:
            seen.append(text)
        return original(self, value, text=text, **kwargs)

    monkeypatch.setattr(ProgressMixin, "progress", progress)
    yield seen


def test_zip_entry_names_in_the_upload_progress_are_plain_text(db: Database, progress_texts: list[str]) -> None:
    archive = make_zip([(IMAGE_NAME, image_bytes("Shoes", 1)), ("www.shop.example.png", image_bytes("Bags", 2))])
    at = run_page("pages/upload.py", session={"signed_in_account": "erin"})
    at.file_uploader[0].set_value([("supplier.zip", archive, "application/zip")])
    next(b for b in at.button if b.label == "Import").click().run()
    assert not at.exception and len(card_ids(at)) == 2
    named = [t for t in progress_texts if "x.png" in t.replace("\\", "")]
    assert named, progress_texts
    for text in named:
        assert_plain(text.split(": ", 1)[-1], f"supplier.zip/{IMAGE_NAME}")
    assert_plain(next(t for t in progress_texts if "shop" in t), "supplier.zip/www.shop.example.png")


def test_a_url_in_a_category_name_is_no_link_in_the_labelled_message(db: Database) -> None:
    add_category(db, URL_CATEGORY, actor="setup")
    at = run_page("pages/upload.py", session={"signed_in_account": "erin"})
    at.file_uploader[0].set_value([(IMAGE_NAME.replace("/", "_"), image_bytes("Shoes", 3), "image/png")])
    next(b for b in at.button if b.label == "Import").click().run()
    image_id = card_ids(at)[0]
    at.pills(key=f"up_pick_{image_id}_None").set_value(URL_CATEGORY).run()
    assert audit_trail(db, image_id)[0].new_category == URL_CATEGORY
    message = next(c.value for c in at.caption if "labelled" in c.value)
    assert_plain(message, f"labelled {URL_CATEGORY}")


def test_file_names_in_the_server_folder_import_progress_are_plain_text(
    db: Database, progress_texts: list[str]
) -> None:
    folder = write_image_folder(db.settings.exchange_dir / "photos", per_category=1, size=24)
    first = next(p for p in sorted(folder.rglob("*.png")))
    odd = first.with_name("![p](evil.png) www.evil.example.png")
    first.rename(odd)
    at = run_page("pages/categories.py")
    next(t for t in at.text_input if t.label == "Folder path on the server").set_value("photos")
    next(b for b in at.button if b.label == "Import folder").click().run()
    assert not at.exception
    shown = [t for t in progress_texts if "evil" in t]
    assert shown, progress_texts
    for text in shown:
        assert_plain(text, odd.name)
