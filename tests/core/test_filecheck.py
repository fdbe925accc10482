"""What a killed import leaves in the data directory (core.catalog.filecheck, `images check-files`): stored files
without rows and temporary files are found and removed once older than the grace period; files rows name never are;
rows whose files are gone are listed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from sqlalchemy import delete, select
from typer.testing import CliRunner

import core.cli  # noqa: F401  (registers every command module on the app)
from core.auth import PermissionDenied
from core.catalog.filecheck import check_files, remove_strays
from core.catalog.ingest import import_paths
from core.cli.app import app
from core.db import Database
from core.schema import Image
from tests.imagegen import image_bytes, write_image_folder

HOURS_AGO = time.time() - 3 * 3600


def _aged(path: Path, data: bytes) -> None:
    """Write `data` at `path`, dated three hours back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (HOURS_AGO, HOURS_AGO))


@pytest.fixture
def leftovers(db: Database, tmp_path: Path) -> dict[str, str]:
    """A catalogue of 6 imported photos plus what killed imports leave: an old stray original and thumbnail, an old
    temporary file, a stray written a moment ago, and a row whose thumbnail went missing."""
    import_paths(db, [write_image_folder(tmp_path / "photos", per_category=2, size=24)], actor="ana")
    root = db.settings.data_dir
    sha = "ab" + "0" * 62
    _aged(root / "images" / "ab" / f"{sha}.png", image_bytes("Shoes", 50, size=24))
    _aged(root / "thumbs" / "ab" / f"{sha}.jpg", b"\xff\xd8 half a thumbnail")
    _aged(root / "thumbs" / "cd" / f".tmp-4242-1-{'cd' + '1' * 62}.jpg", b"\xff\xd8 cut short")
    (root / "images" / "ef").mkdir(parents=True, exist_ok=True)
    (root / "images" / "ef" / f"{'ef' + '2' * 62}.png").write_bytes(image_bytes("Hats", 51, size=24))  # now
    with db.read() as session:
        victim = session.scalars(select(Image).order_by(Image.id).limit(1)).one()
        victim_id, victim_thumb = victim.id, victim.thumb_path
    (root / victim_thumb).unlink()
    return {"sha": sha, "victim_thumb": victim_thumb, "victim_id": str(victim_id)}


def test_the_check_finds_strays_leftovers_and_missing_files_and_the_fix_removes_only_old_strays(
    db: Database, leftovers: dict[str, str]
) -> None:
    sha = leftovers["sha"]
    found = check_files(db)
    assert found.strays == (f"images/ab/{sha}.png", f"thumbs/ab/{sha}.jpg")
    assert found.leftovers == (f"thumbs/cd/.tmp-4242-1-{'cd' + '1' * 62}.jpg",)
    assert found.recent == 1  # the stray written a moment ago: an import may be about to commit its row
    assert [(m.image_id, m.kind, m.path) for m in found.missing] == [
        (int(leftovers["victim_id"]), "thumbnail", leftovers["victim_thumb"])
    ]
    assert found.rows == 6 and not found.clean

    assert remove_strays(db, found, actor="ana") == 3
    again = check_files(db)
    assert (again.strays, again.leftovers, again.recent) == ((), (), 1)
    assert len(again.missing) == 1  # a missing file is reported, never "fixed" by deleting the image
    with db.read() as session:  # every row's original is still there
        originals = session.scalars(select(Image.stored_path)).all()
    assert len(originals) == 6 and all((db.settings.data_dir / p).is_file() for p in originals)


def test_a_stray_that_an_import_names_meanwhile_is_kept(db: Database, leftovers: dict[str, str]) -> None:
    """Between the check and the fix, an import stores the same bytes again: the file now has a row and stays."""
    found = check_files(db)
    stray = found.strays[0]
    with db.write() as session:
        row = session.scalars(select(Image).limit(1)).one()
        row.stored_path = stray  # as if an import had just committed a row naming it
    assert remove_strays(db, found, actor="ana") == 2
    assert (db.settings.data_dir / stray).is_file()


def test_an_import_reusing_a_stray_makes_it_recent(db: Database, tmp_path: Path) -> None:
    """A killed import's stored file, imported again: reused as it is, and dated now, so a file check running at the
    same time leaves it alone until the row commits."""
    photo = tmp_path / "one" / "shoe.png"
    photo.parent.mkdir()
    photo.write_bytes(image_bytes("Shoes", 60, size=24))
    import_paths(db, [photo], category="Shoes", actor="ana")
    with db.write() as session:  # the row goes, the files stay: what a kill between storing and committing leaves
        stored, thumb = session.execute(select(Image.stored_path, Image.thumb_path)).one()
        session.execute(delete(Image))
    for rel in (stored, thumb):
        os.utime(db.settings.data_dir / rel, (HOURS_AGO, HOURS_AGO))
    assert check_files(db).strays == tuple(sorted((stored, thumb)))
    import_paths(db, [photo], category="Shoes", actor="ana")
    for rel in (stored, thumb):
        assert (db.settings.data_dir / rel).stat().st_mtime > time.time() - 600
    assert check_files(db).clean


def test_removing_strays_is_an_admins_action(accounts: Database, tmp_path: Path) -> None:
    with pytest.raises(PermissionDenied):
        remove_strays(accounts, check_files(accounts), actor="lea")
    assert remove_strays(accounts, check_files(accounts), actor="ada") == 0


def test_the_cli_reports_exits_1_until_fixed_and_fix_removes(db: Database, leftovers: dict[str, str]) -> None:
    runner = CliRunner()
    report = runner.invoke(app, ["images", "check-files"])
    assert report.exit_code == 1, report.output
    assert "Stored files no image names: 2; temporary files left: 1." in report.output
    assert "Left alone, younger than 60 minutes: 1." in report.output
    assert f"Image {leftovers['victim_id']}: its thumbnail {leftovers['victim_thumb']} is missing." in report.output
    assert "Run again with --fix to remove them." in report.output
    fixed = runner.invoke(app, ["images", "check-files", "--fix", "--actor", "ana"])
    assert "Removed 3 files." in fixed.output
    assert fixed.exit_code == 1  # the missing thumbnail is still there to look at
    (db.settings.data_dir / leftovers["victim_thumb"]).write_bytes(b"\xff\xd8 restored")
    clean = runner.invoke(app, ["images", "check-files", "--grace-minutes", "0", "--fix"])
    assert clean.exit_code == 0, clean.output
    assert "Removed 1 file." in clean.output  # the recent stray, once no grace is asked for
