"""Every page runs without an exception, on an empty catalogue and on a populated one (AppTest)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.db import Database
from tests.core.factories import populate
from tests.pages.helpers import APP, PAGE_FILES, errors_of, run_page


@pytest.mark.parametrize("page", PAGE_FILES)
def test_every_page_runs_on_an_empty_catalogue(data_dir: Path, page: str) -> None:
    at = run_page(page)
    assert not at.exception, at.exception
    assert errors_of(at) == []
    # The sidebar of every page says that sign-in is off (tests run with PRODCAT_AUTH=none) and there is no model yet.
    assert any("Sign-in is off" in w.value for w in at.sidebar.warning)
    assert any("No model yet" in t.value for t in at.sidebar.text)


@pytest.mark.both_databases
@pytest.mark.parametrize("page", PAGE_FILES)
def test_every_page_runs_on_a_populated_catalogue(db: Database, page: str) -> None:
    populate(db, n_images=60, seed=1)
    at = run_page(page)
    assert not at.exception, at.exception
    assert any("Active: v" in t.value for t in at.sidebar.text)


@pytest.mark.both_databases
def test_home_counts_what_is_in_the_catalogue(db: Database) -> None:
    populate(db, n_images=40, labelled_fraction=0.5, seed=2)
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Images"] == "40"
    assert 0 < int(metrics["Labelled"]) < 40
    assert metrics["Categories"] == "5"
