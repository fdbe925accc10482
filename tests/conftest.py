"""Shared fixtures: every test gets its own data directory, settings and migrated SQLite database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core import db as core_db
from core.settings import Settings, get_settings


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh PRODCAT_DATA_DIR, also exported so subprocesses (worker, CLI, streamlit) see it."""
    path = tmp_path / "data"
    monkeypatch.setenv("PRODCAT_DATA_DIR", str(path))
    monkeypatch.delenv("PRODCAT_DATABASE_URL", raising=False)
    # Tests never reach the network: no hub weights unless a test provides a local file.
    monkeypatch.setenv("PRODCAT_PRETRAINED", "none")
    # Sign-in is on by default; tests of roles and sign-in set PRODCAT_AUTH=builtin themselves.
    monkeypatch.setenv("PRODCAT_AUTH", "none")
    monkeypatch.setenv("PRODCAT_WORKER_IDLE_EXIT_S", "5")
    get_settings.cache_clear()
    yield path
    core_db.close_all()
    get_settings.cache_clear()


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return get_settings()


@pytest.fixture
def db(settings: Settings) -> core_db.Database:
    return core_db.open_database(settings)
