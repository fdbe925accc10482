"""Paths typed into the web pages stay inside the exchange folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.catalog.serverfiles import PathRefused, exchange_path
from core.db import Database, open_database
from core.settings import Settings

ACTOR = "staff"


def test_relative_and_absolute_paths_inside_the_exchange_folder_are_accepted(settings: Settings, db: Database) -> None:
    root = settings.exchange_dir
    assert root == (settings.data_dir / "exchange").resolve()
    assert exchange_path(db, "photos/shoes", actor=ACTOR) == root / "photos" / "shoes"
    assert exchange_path(db, str(root / "batch1"), actor=ACTOR) == root / "batch1"


@pytest.mark.parametrize("text", ["../prodcat.sqlite3", "/etc", "photos/../../images", "~"])
def test_paths_leaving_the_exchange_folder_are_refused_with_the_folder_named(
    settings: Settings, db: Database, text: str
) -> None:
    with pytest.raises(PathRefused) as refused:
        exchange_path(db, text, actor=ACTOR)
    assert text in str(refused.value) and str(settings.exchange_dir) in str(refused.value)


def test_another_accounts_home_folder_is_refused_not_a_crash(settings: Settings, db: Database) -> None:
    with pytest.raises(PathRefused) as refused:
        exchange_path(db, "~nosuchuser_prodcat/photos", actor=ACTOR)
    assert "'~nosuchuser_prodcat' is no home folder on the server" in str(refused.value)
    assert str(settings.exchange_dir) in str(refused.value)


def test_a_symlink_out_of_the_exchange_folder_is_refused(settings: Settings, db: Database, tmp_path: Path) -> None:
    settings.exchange_dir.mkdir(parents=True)
    os.symlink(tmp_path, settings.exchange_dir / "escape")
    with pytest.raises(PathRefused):
        exchange_path(db, "escape/anything", actor=ACTOR)


def test_empty_input_is_refused(settings: Settings, db: Database) -> None:
    with pytest.raises(PathRefused, match="no path given"):
        exchange_path(db, "   ", actor=ACTOR)


def test_the_exchange_folder_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRODCAT_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("PRODCAT_SERVER_FILES_DIR", str(tmp_path / "shared"))
    monkeypatch.setenv("PRODCAT_AUTH", "none")
    settings = Settings()
    db = open_database(settings)
    assert exchange_path(db, "x", actor=ACTOR) == (tmp_path / "shared" / "x").resolve()
    with pytest.raises(PathRefused):
        exchange_path(db, str(tmp_path / "d"), actor=ACTOR)
