"""Which catalogue a database and a data directory belong to: one id recorded in both (the `meta` table, and
`catalogue.json` in the data directory), so a database that went missing or was swapped is refused with an
explanation instead of silently starting an empty catalogue over another one's originals and checkpoints.

- a new data directory and a new database: the catalogue gets an id, recorded in both;
- a catalogue from before ids existed (a database with rows, no id): it adopts one, in both;
- a data directory that holds originals or checkpoints, or names a catalogue, with a database that is new (no rows,
  or for SQLite no file at all: it is not even created) or names another catalogue: refused (CatalogueRefused).

Messages name the data directory by its folder name only.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from pathlib import Path

from sqlalchemy import func, make_url, select

from core.db import Database
from core.errors import CatalogueRefused, as_storage_error
from core.schema import Category, Image, MetaValue, ModelVersion, utcnow
from core.settings import Settings

log = logging.getLogger(__name__)

IDENTITY_FILE = "catalogue.json"
KEY = "catalogue_id"


def identity_file(settings: Settings) -> Path:
    """The data directory's record of the catalogue it belongs to."""
    return settings.data_dir / IDENTITY_FILE


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or not parsed.database or parsed.database == ":memory:":
        return None
    name = parsed.database
    if name.startswith("file:"):  # a URI filename (?uri=true), e.g. file:/path/prodcat.sqlite3?mode=ro
        name = name.removeprefix("file:").split("?", 1)[0]
    return Path(name)


def _recorded_id(settings: Settings) -> str | None:
    path = identity_file(settings)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CatalogueRefused(
            f"the data directory '{settings.data_dir.name}' has a {IDENTITY_FILE} that cannot be read "
            f"({type(exc).__name__}): restore it from a backup, or remove it if this data directory and its database "
            "belong together"
        ) from None
    value = document.get(KEY) if isinstance(document, dict) else None
    return str(value) if value else None


def _files_held(settings: Settings) -> tuple[int, int]:
    """(originals, checkpoints) in the data directory."""
    originals = sum(1 for p in settings.images_dir.rglob("*") if p.is_file()) if settings.images_dir.is_dir() else 0
    checkpoints = len(list(settings.checkpoints_dir.glob("*.safetensors"))) if settings.checkpoints_dir.is_dir() else 0
    return originals, checkpoints


def _holds_files(settings: Settings) -> bool:
    for folder, pattern in ((settings.images_dir, "*"), (settings.checkpoints_dir, "*.safetensors")):
        if folder.is_dir() and any(p.is_file() for p in folder.rglob(pattern)):
            return True
    return False


def _what_it_holds(settings: Settings, recorded: str | None) -> str:
    originals, checkpoints = _files_held(settings)
    held = f"{originals} original image{'s' * (originals != 1)} and {checkpoints} checkpoint{'s' * (checkpoints != 1)}"
    named = f" and belongs to catalogue {recorded}" if recorded else ""
    return f"the data directory '{settings.data_dir.name}' holds {held}{named}"


def _advice(settings: Settings) -> str:
    return (
        "Restore that catalogue's database (the prodcat.sqlite3 file, or PRODCAT_DATABASE_URL's database) from a "
        f"backup, or set PRODCAT_DATA_DIR to another folder to start a new catalogue there; '{settings.data_dir.name}' "
        "is left untouched"
    )


def refuse_missing_database(settings: Settings) -> None:
    """Before SQLite creates a database file: refuse when the file is missing from a data directory that holds a
    catalogue's files (originals, checkpoints, or its catalogue.json), so an empty catalogue is never started there."""
    path = _sqlite_file(settings.resolved_database_url)
    if path is None or path.exists():
        return
    recorded = _recorded_id(settings)
    if recorded or _holds_files(settings):
        raise CatalogueRefused(
            f"the database file {path.name} is missing, but {_what_it_holds(settings, recorded)}: an empty catalogue "
            f"will not be started over them. {_advice(settings)}"
        )


def ensure_identity(db: Database) -> str:
    """Check that `db` and its data directory belong to one catalogue, giving both an id where it is new or from
    before ids existed; returns the catalogue id. Raises CatalogueRefused when they do not belong together."""
    settings = db.settings
    recorded = _recorded_id(settings)
    with db.read() as session:
        stored = session.scalar(select(MetaValue.value).where(MetaValue.key == KEY))
        empty = not any(
            session.scalar(select(func.count()).select_from(select(table.id).limit(1).subquery()))
            for table in (Image, Category, ModelVersion)
        )
    if stored and recorded and stored != recorded:
        raise CatalogueRefused(
            f"the database belongs to catalogue {stored}, but {_what_it_holds(settings, recorded)}: it was swapped "
            f"for another catalogue's database (or PRODCAT_DATABASE_URL names another one). {_advice(settings)}"
        )
    if not stored:
        if empty and (recorded or _holds_files(settings)):
            raise CatalogueRefused(
                f"the database is new and empty, but {_what_it_holds(settings, recorded)}: its database went missing "
                f"(deleted or moved?), and an empty catalogue will not be started over them. {_advice(settings)}"
            )
        # New (with a new data directory), or from before ids: adopt the data directory's id, else a new one.
        stored = _store_id(db, recorded or str(uuid.uuid4()))
        if stored is None:
            return recorded or ""
    if recorded != stored:
        _write_file(settings, stored)
    return stored


def _store_id(db: Database, candidate: str) -> str | None:
    """Record `candidate` unless another process recorded an id first; the id now stored (None: a read-only database,
    which can still be read)."""
    try:
        db.insert_ignoring_duplicates(MetaValue, [{"key": KEY, "value": candidate, "updated_at": utcnow()}])
    except Exception as exc:
        if as_storage_error(exc) is None:
            raise
        log.warning("the catalogue id could not be recorded in the database (%s): checked again next time", exc)
        return None
    with db.read() as session:
        return session.scalar(select(MetaValue.value).where(MetaValue.key == KEY))


def _write_file(settings: Settings, catalogue_id: str) -> None:
    document = {
        KEY: catalogue_id,
        "written_at": utcnow().isoformat(timespec="seconds"),
        "about": "prodcat: the catalogue this data directory belongs to; its database records the same id",
    }
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=settings.data_dir, prefix=f".{IDENTITY_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(document, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, identity_file(settings))
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    except OSError as exc:  # a read-only data directory: the database keeps the id, the file is written next time
        log.warning("%s could not be written in the data directory (%s): written next time", IDENTITY_FILE, exc)
