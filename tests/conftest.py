"""Shared fixtures: every test gets its own data directory, settings and migrated database.

The database is SQLite in the data directory, except in test modules marked `both_databases`: their tests run twice,
once on SQLite and once on a fresh database of a throw-away PostgreSQL cluster (tests/postgres.py) that the session
starts itself. Without the PostgreSQL server binaries those runs are skipped, saying why; with CI=true they fail.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from core import db as core_db
from core.settings import Settings, get_settings
from tests.postgres import TEMPLATE, Cluster, PostgresUnavailable, start_cluster

BACKENDS = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `both_databases` that use the database fixtures run on each backend (ids [sqlite], [postgresql])."""
    if "database_backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_databases"):
        metafunc.parametrize("database_backend", BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster for this session, with a database migrated to the newest schema as every test's template."""
    try:
        cluster = start_cluster()
    except PostgresUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true needs PostgreSQL: {exc}")
        pytest.skip(str(exc))
    try:
        with cluster.connect() as conn:
            conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
        template = core_db.Database(Settings(database_url=cluster.url(TEMPLATE), data_dir=Path(cluster.root)))
        core_db.upgrade(template)
        template.dispose()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def database_backend(request: pytest.FixtureRequest) -> str:
    """ "sqlite" unless the test module is marked `both_databases` (then each of BACKENDS in turn)."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
def data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database_backend: str, request: pytest.FixtureRequest
) -> Iterator[Path]:
    """A fresh PRODCAT_DATA_DIR, also exported so subprocesses (worker, CLI, streamlit) see it; on PostgreSQL a fresh
    database in PRODCAT_DATABASE_URL."""
    path = tmp_path / "data"
    monkeypatch.setenv("PRODCAT_DATA_DIR", str(path))
    monkeypatch.delenv("PRODCAT_DATABASE_URL", raising=False)
    cluster: Cluster | None = None
    database = ""
    if database_backend == "postgresql":
        cluster = request.getfixturevalue("postgres_cluster")
        database = cluster.create_database()
        monkeypatch.setenv("PRODCAT_DATABASE_URL", cluster.url(database))
    # Tests never reach the network: no hub weights unless a test provides a local file.
    monkeypatch.setenv("PRODCAT_PRETRAINED", "none")
    # Sign-in is on by default; tests of roles and sign-in set PRODCAT_AUTH=builtin themselves.
    monkeypatch.setenv("PRODCAT_AUTH", "none")
    monkeypatch.setenv("PRODCAT_WORKER_IDLE_EXIT_S", "5")
    get_settings.cache_clear()
    yield path
    core_db.close_all()
    get_settings.cache_clear()
    if cluster is not None:
        cluster.drop_database(database)


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return get_settings()


@pytest.fixture
def db(settings: Settings) -> core_db.Database:
    return core_db.open_database(settings)


ACCOUNT_PASSWORD = "correct horse battery"


@pytest.fixture
def accounts(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> core_db.Database:
    """A catalogue with sign-in on and one account per role (password ACCOUNT_PASSWORD): ada (admin), tim (trainer),
    lea (labeller), vic (viewer)."""
    from core import auth

    monkeypatch.setenv("PRODCAT_AUTH", "builtin")
    get_settings.cache_clear()
    db = core_db.open_database(get_settings())
    auth.add_account(db, "ada", "admin", ACCOUNT_PASSWORD, actor="")
    for name, role in (("tim", "trainer"), ("lea", "labeller"), ("vic", "viewer")):
        auth.add_account(db, name, role, ACCOUNT_PASSWORD, actor="ada")
    return db


@pytest.fixture
def plain_main(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `__main__` without a file for tests that start processes with forkserver or spawn (the DDP ranks): a child
    re-runs the parent's main file, and after a page test (AppTest) in the same pytest process that is a page script.
    The worker process itself always runs as `python -m` (a module name, which children import, not re-run)."""
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
