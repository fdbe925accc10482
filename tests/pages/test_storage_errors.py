"""A page action on a read-only database shows one clear st.error, without SQL, parameters or server paths; the full
error goes to the server log."""

from __future__ import annotations

import logging

import pytest

from core.catalog.labels import audit_trail, list_categories
from core.db import Database
from core.settings import get_settings
from tests.core.factories import FakeImage, build
from tests.pages.helpers import errors_of, run_page


def test_adding_a_category_to_a_read_only_database_shows_a_clear_error(
    db: Database, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The same database file opened read-only by SQLite itself (chmod does not stop root, which the tests may be).
    path = db.settings.data_dir / "prodcat.sqlite3"
    monkeypatch.setenv("PRODCAT_DATABASE_URL", f"sqlite:///file:{path}?mode=ro&uri=true")
    get_settings.cache_clear()
    at = run_page("pages/categories.py")
    next(t for t in at.text_input if t.label == "New category name").set_value("Hats")
    with caplog.at_level(logging.ERROR, logger="pages._ui"):
        at = next(b for b in at.button if b.label == "Add category").click().run()
    assert not at.exception
    errors = [e.replace("\\", "") for e in errors_of(at)]  # as Markdown escapes it
    assert len(errors) == 1 and errors[0].startswith(
        "the database is read-only: check the permissions of the data directory 'data'"
    ), errors
    for leak in ("INSERT", "SQL", "parameters", "Hats", "sqlite", str(db.settings.data_dir.parent)):
        assert leak not in errors[0], leak
    assert "INSERT INTO categories" in caplog.text  # the operator's log has it all
    assert list_categories(db) == []


def test_a_card_click_on_a_read_only_database_shows_a_clear_error_in_the_card(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = build(db, [FakeImage(split="test", label="Shoes", probs=(0.2, 0.7, 0.1), name="boot.jpg")])
    boot = int(made.image_ids[0])
    path = db.settings.data_dir / "prodcat.sqlite3"
    monkeypatch.setenv("PRODCAT_DATABASE_URL", f"sqlite:///file:{path}?mode=ro&uri=true")
    get_settings.cache_clear()
    at = run_page("pages/review.py")
    at.pills(key=f"rv_pick_{boot}_Shoes").set_value("Bags").run()
    assert not at.exception
    errors = [e.replace("\\", "") for e in errors_of(at)]
    assert len(errors) == 1 and errors[0].startswith("the database is read-only"), errors
    assert "UPDATE" not in errors[0] and "INSERT" not in errors[0]
    assert audit_trail(db, boot)[0].new_category == "Shoes"  # nothing changed
