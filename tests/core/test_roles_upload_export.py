"""Roles enforced in the ingest, export and server-folder functions the pages and the CLI call (core.auth)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

import core.cli  # noqa: F401  (registers every command module on the app)
from core import auth
from core.catalog.export import export_imagefolder, export_labels_csv, labels_csv_bytes
from core.catalog.ingest import (
    LabelSource,
    Upload,
    import_labelled_folder,
    import_labelled_upload,
    import_paths,
    import_uploads,
)
from core.catalog.serverfiles import exchange_path
from core.cli.app import app
from core.db import Database, open_database
from core.schema import AuditEvent, Image
from core.settings import get_settings
from tests.core import badfiles
from tests.imagegen import image_bytes, write_image_folder


@pytest.fixture
def signed(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Database]:
    """Sign-in on, accounts ada (admin), lea (labeller) and vic (viewer); no passwords: roles are all that count."""
    monkeypatch.setenv("PRODCAT_AUTH", "builtin")
    get_settings.cache_clear()
    db = open_database(get_settings())
    auth.add_account(db, "ada", "admin", None, actor="")
    auth.add_account(db, "lea", "labeller", None, actor="ada")
    auth.add_account(db, "vic", "viewer", None, actor="ada")
    yield db


def _images(db: Database) -> int:
    with db.read() as session:
        return session.scalar(select(func.count()).select_from(Image)) or 0


def _stored_files(db: Database) -> list[Path]:
    folders = [db.settings.images_dir, db.settings.thumbs_dir]
    return [path for folder in folders if folder.exists() for path in folder.rglob("*") if path.is_file()]


def test_a_viewer_is_refused_every_upload_and_nothing_is_stored(signed: Database, tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "photos", per_category=1, size=24)
    archive = Upload("batch.zip", badfiles.make_zip([("Shoes/a.png", image_bytes("Shoes", 1))]))
    calls = [
        lambda: import_uploads(signed, [Upload("a.png", image_bytes("Shoes", 2))], actor="vic"),
        lambda: import_paths(signed, [folder], labels_from_folders=True, actor="vic"),
        lambda: import_labelled_folder(signed, folder, label_source=LabelSource.FOLDERS, actor="vic"),
        lambda: import_labelled_upload(signed, archive, label_source=LabelSource.FOLDERS, actor="vic"),
    ]
    for call in calls:
        with pytest.raises(auth.PermissionDenied, match="vic is a viewer and may not upload or import photos"):
            call()
    assert _images(signed) == 0 and _stored_files(signed) == []
    # A labeller may.
    assert len(import_uploads(signed, [Upload("a.png", image_bytes("Shoes", 2))], actor="lea").imported) == 1


def test_a_labeller_is_refused_exports_and_server_folders(signed: Database, tmp_path: Path) -> None:
    import_uploads(signed, [Upload("a.png", image_bytes("Shoes", 3))], category="Shoes", actor="lea")
    refused = "lea is a labeller and may not export labels, images or models"
    with pytest.raises(auth.PermissionDenied, match=refused):
        export_labels_csv(signed, tmp_path / "labels.csv", actor="lea")
    with pytest.raises(auth.PermissionDenied, match=refused):
        labels_csv_bytes(signed, actor="lea")
    with pytest.raises(auth.PermissionDenied, match=refused):
        export_imagefolder(signed, tmp_path / "tree", actor="lea")
    with pytest.raises(auth.PermissionDenied, match="lea is a labeller and may not read or write the server exchange"):
        exchange_path(signed, "photos", actor="lea")
    assert not (tmp_path / "labels.csv").exists() and not (tmp_path / "tree").exists()
    # The command line acts as a named account too.
    outcome = CliRunner().invoke(app, ["export", "labels", str(tmp_path / "cli.csv"), "--actor", "lea"])
    assert outcome.exit_code != 0 and refused in outcome.output and not (tmp_path / "cli.csv").exists()


def test_an_admin_exports_and_each_export_leaves_an_audit_row(signed: Database, tmp_path: Path) -> None:
    import_uploads(signed, [Upload("a.png", image_bytes("Shoes", 4))], category="Shoes", actor="lea")
    assert export_labels_csv(signed, tmp_path / "labels.csv", actor="ada") == 1
    assert labels_csv_bytes(signed, actor="ada").count(b"\n") == 2
    target = exchange_path(signed, "tree", actor="ada")
    assert export_imagefolder(signed, target, actor="ada").written == 1
    with signed.read() as session:
        rows = session.execute(select(AuditEvent.actor, AuditEvent.action, AuditEvent.subject)).all()
    exports = [(a, s) for a, action, s in rows if action == auth.Action.EXPORT.key]
    assert [a for a, _ in exports] == ["ada", "ada", "ada"]
    assert [s.split(" ")[0] for _, s in exports] == ["labels", "labels", "image"]
