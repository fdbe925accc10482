"""The content-addressed store: originals byte for byte, named by hash and detected format, thumbnails beside."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from core.catalog.deletion import delete_images
from core.catalog.imaging import inspect_and_decode
from core.catalog.ingest import Upload, import_uploads
from core.catalog.store import original_path, store_image, thumbnail_path
from core.db import Database
from core.schema import Image as ImageRow
from core.settings import Settings
from tests.core import badfiles


def test_original_is_stored_byte_for_byte_under_its_hash_with_the_detected_extension(settings: Settings) -> None:
    data = badfiles.encode(badfiles.quadrants(600, 300), "PNG")
    sha = hashlib.sha256(data).hexdigest()
    decoded = inspect_and_decode("../../holiday photo.JPG", data, settings)  # the user's name is never used
    stored = store_image(settings, data, decoded)
    assert stored.original_rel == f"images/{sha[:2]}/{sha}.png"
    assert stored.thumb_rel == f"thumbs/{sha[:2]}/{sha}.jpg"
    assert stored.original == settings.data_dir / stored.original_rel
    assert stored.original.read_bytes() == data
    with Image.open(stored.thumb) as thumb:
        assert thumb.format == "JPEG"
        assert thumb.size == (settings.thumbnail_size, settings.thumbnail_size // 2)
        pixel = thumb.convert("RGB").getpixel((5, 5))
        assert isinstance(pixel, tuple), pixel
        r, g, _ = pixel
        assert r > 200 and g < 70  # the red corner, not a blank or black thumbnail
    # Nothing else was written: no temp files, nothing named after the user's file.
    files = sorted(p.relative_to(settings.data_dir).as_posix() for p in settings.data_dir.rglob("*") if p.is_file())
    assert files == [stored.original_rel, stored.thumb_rel]


def test_storing_the_same_bytes_again_is_idempotent(settings: Settings) -> None:
    data = badfiles.jpeg(seed=1)
    decoded = inspect_and_decode("a.jpg", data, settings)
    first = store_image(settings, data, decoded)
    inode = first.original.stat().st_ino
    second = store_image(settings, data, decoded)
    assert first.wrote_original and not second.wrote_original
    assert second.original.stat().st_ino == inode  # the same file, not a copy renamed over it
    assert second.original.read_bytes() == data


def test_a_damaged_original_is_rewritten(settings: Settings) -> None:
    data = badfiles.jpeg(seed=2)
    decoded = inspect_and_decode("a.jpg", data, settings)
    stored = store_image(settings, data, decoded)
    stored.original.write_bytes(data[:10])  # e.g. a crash mid-copy by some other tool
    assert store_image(settings, data, decoded).wrote_original
    assert stored.original.read_bytes() == data


def test_small_images_are_not_enlarged_for_thumbnails(settings: Settings) -> None:
    data = badfiles.png(size=(30, 20))
    stored = store_image(settings, data, inspect_and_decode("tiny.png", data, settings))
    with Image.open(stored.thumb) as thumb:
        assert thumb.size == (30, 20)


def test_paths_from_rows_resolve_inside_the_data_dir_only(settings: Settings) -> None:
    data = badfiles.png()
    stored = store_image(settings, data, inspect_and_decode("a.png", data, settings))
    row = SimpleNamespace(stored_path=stored.original_rel, thumb_path=stored.thumb_rel)
    assert original_path(settings, row) == stored.original.resolve()
    assert thumbnail_path(settings, row) == stored.thumb.resolve()
    tampered = SimpleNamespace(stored_path="../../etc/passwd", thumb_path="/etc/passwd")
    with pytest.raises(ValueError, match="outside the data directory"):
        original_path(settings, tampered)
    with pytest.raises(ValueError, match="outside the data directory"):
        thumbnail_path(settings, tampered)


def test_two_data_dirs_share_nothing(settings: Settings, tmp_path: Path) -> None:
    other = settings.model_copy(update={"data_dir": tmp_path / "other"})
    data = badfiles.png(seed=5)
    decoded = inspect_and_decode("a.png", data, settings)
    mine = store_image(settings, data, decoded)
    theirs = store_image(other, data, decoded)
    assert mine.original.is_relative_to(settings.data_dir)
    assert theirs.original.is_relative_to(tmp_path / "other")


def test_stored_files_get_the_umask_mode_so_other_accounts_can_read_them(settings: Settings) -> None:
    # A worker or web server running as another user on shared storage reads these files; mkstemp alone gives 0600.
    umask = os.umask(0o022)
    os.umask(umask)
    data = badfiles.jpeg(seed=9)
    stored = store_image(settings, data, inspect_and_decode("a.jpg", data, settings))
    for path in (stored.original, stored.thumb):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    if not umask & 0o044:  # the usual 022 or 002: group and others may read
        assert stat.S_IMODE(stored.original.stat().st_mode) & 0o044 == 0o044


def test_images_stored_under_the_earlier_two_level_layout_are_still_found_and_deleted(db: Database) -> None:
    # Catalogues made before the one-level layout keep their files at images/ab/cd/: the rows name them, so the
    # review grid, a re-import of the same bytes and a deletion all reach those files, and nothing is copied again.
    data = badfiles.png(seed=11)
    first = import_uploads(db, [Upload("shoe.png", data)], actor="test")
    image_id = first.imported[0].image_id
    with db.write() as session:
        row = session.get(ImageRow, image_id)
        assert row is not None
        moved: list[Path] = []
        for attribute in ("stored_path", "thumb_path"):
            tree, shard, name = getattr(row, attribute).split("/")
            old = f"{tree}/{shard}/{name[2:4]}/{name}"
            (db.settings.data_dir / old).parent.mkdir(parents=True)
            (db.settings.data_dir / getattr(row, attribute)).rename(db.settings.data_dir / old)
            setattr(row, attribute, old)
            moved.append(db.settings.data_dir / old)
    assert thumbnail_path(db.settings, row) == moved[1].resolve()
    again = import_uploads(db, [Upload("shoe copy.png", data)], actor="test")
    assert [d.name for d in again.duplicates] == ["shoe copy.png"] and not again.imported
    assert sorted(p for p in db.settings.data_dir.joinpath("images").rglob("*") if p.is_file()) == [moved[0]]
    deleted = delete_images(db, [image_id], actor="test", reason="test")
    assert deleted[0].files_removed == 2 and not any(p.exists() for p in moved)
