"""Near-duplicates: copies group at ingest by Hamming distance, distinct pictures do not, scan backfills, keep one."""

from __future__ import annotations

import json

import pytest
from PIL import Image as PILImage
from sqlalchemy import select, text, update
from typer.testing import CliRunner

import core.cli  # noqa: F401  (registers every command module on the app)
from core.cli_app import app
from core.db import Database
from core.duplicates import duplicate_groups, keep_one
from core.errors import DuplicateRefused, NotFound
from core.ingest import Upload, import_uploads
from core.schema import Image, ImageEvent, LabelEvent
from core.splits import split_for_hash
from tests.imagegen import COPY_KINDS, encode, make_image

skimage_data = pytest.importorskip("skimage.data")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def product_photo(name: str) -> PILImage.Image:
    """A product shot: the sample photo, 240 px wide, on a plain white 320 px canvas (a crop of a full-frame photo
    moves everything in it, and is not reliably caught: see docs/benchmarks.md)."""
    img = PILImage.fromarray(getattr(skimage_data, name)()).convert("RGB")
    img = img.resize((240, round(240 * img.height / img.width)), PILImage.Resampling.LANCZOS)
    canvas = PILImage.new("RGB", (320, 320), (255, 255, 255))
    canvas.paste(img, (40, (320 - img.height) // 2))
    return canvas


def _copies(name: str) -> list[Upload]:
    photo = product_photo(name)
    return [Upload(f"{name}-{kind}.jpg", encode(make(photo), "JPEG", 90)) for kind, make in COPY_KINDS.items()]


def _rows(db: Database) -> dict[str, Image]:
    with db.read() as session:
        rows = {r.original_name: r for r in session.scalars(select(Image))}
        session.expunge_all()  # plain objects: the read session's rollback must not expire them
    return rows


def test_resized_reencoded_cropped_and_watermarked_copies_join_their_originals_split(db: Database) -> None:
    originals = [Upload(f"{name}.png", encode(product_photo(name))) for name in PHOTOS]
    assert not import_uploads(db, originals, actor="alice").refused
    copies = [u for name in PHOTOS for u in _copies(name)]
    assert not import_uploads(db, copies, actor="bob").refused  # a later batch
    rows, fractions = _rows(db), db.settings.split_fractions
    moved = 0
    for name in PHOTOS:
        for kind in COPY_KINDS:
            copy = rows[f"{name}-{kind}.jpg"]
            assert copy.split == rows[f"{name}.png"].split, (name, kind)
            moved += copy.split != str(split_for_hash(copy.sha256, fractions))
    assert moved > 0  # some copies would have landed elsewhere by their own bytes
    groups = duplicate_groups(db).groups
    assert sorted(len(g.members) for g in groups) == [len(COPY_KINDS) + 1] * len(PHOTOS)
    assert not any(g.straddles_splits for g in groups)


def test_copies_within_one_batch_group_with_the_first_of_them(db: Database) -> None:
    uploads = [Upload("coffee.png", encode(product_photo("coffee"))), *_copies("coffee")]
    assert not import_uploads(db, uploads, actor="alice").refused
    rows = _rows(db)
    assert {r.split for r in rows.values()} == {rows["coffee.png"].split}
    assert len(duplicate_groups(db).groups) == 1


def test_distinct_pictures_keep_their_own_split_and_form_no_group(db: Database) -> None:
    uploads = [
        Upload(f"{c}_{i}.png", encode(make_image(c, i, size=96))) for c in ("Shoes", "Bags", "Hats") for i in range(8)
    ]
    uploads += [Upload(f"{name}.png", encode(product_photo(name))) for name in PHOTOS]
    assert not import_uploads(db, uploads, actor="alice").refused
    rows = _rows(db)
    assert all(r.box_phash is not None for r in rows.values())
    assert all(r.split == str(split_for_hash(r.sha256, db.settings.split_fractions)) for r in rows.values())
    assert duplicate_groups(db).groups == []


def test_scan_fills_missing_hashes_and_reports_straddling_groups_without_moving_images(db: Database) -> None:
    assert not import_uploads(
        db, [Upload("rocket.png", encode(product_photo("rocket"))), *_copies("rocket")], actor="a"
    ).refused
    with db.write() as session:  # as if imported before the hashes existed, the copy by its own bytes' split
        session.execute(update(Image).values(box_dhash_h=None, box_dhash_v=None, box_phash=None))
        session.execute(update(Image).where(Image.original_name == "rocket-half size.jpg").values(split="zzz"))
    before = {n: r.split for n, r in _rows(db).items()}
    result = CliRunner().invoke(app, ["duplicates", "scan"])
    assert result.exit_code == 0, result.output
    assert f"Hashed {len(before)} image(s)" in result.output
    assert "1 group(s) straddle splits" in result.output and "no image was moved" in result.output
    assert {n: r.split for n, r in _rows(db).items()} == before
    assert all(r.box_phash is not None for r in _rows(db).values())
    again = json.loads(CliRunner().invoke(app, ["duplicates", "scan", "--json"]).stdout)
    assert again["hashed"] == 0 and len(again["report"]["groups"]) == 1


def test_keep_one_deletes_the_others_with_audit_rows_and_their_files(db: Database) -> None:
    uploads = [Upload("chelsea.png", encode(product_photo("chelsea"))), *_copies("chelsea")[:2]]
    assert not import_uploads(db, uploads, category="Cats", actor="alice").refused
    group = duplicate_groups(db).groups[0]
    keep, others = group.members[1], [m for m in group.members if m.image_id != group.members[1].image_id]
    files = {m.image_id: (db.settings.data_dir / _rows(db)[m.name].stored_path, m.thumb_path) for m in group.members}
    deleted = keep_one(db, [m.image_id for m in group.members], keep.image_id, actor="carol")
    assert sorted(d.image_id for d in deleted) == sorted(m.image_id for m in others)
    assert set(_rows(db)) == {keep.name}
    with db.read() as session:
        events = session.scalars(select(ImageEvent).order_by(ImageEvent.image_id)).all()
        label_events = session.scalars(select(LabelEvent.image_id)).all()
        session.expunge_all()
    assert [(e.image_id, e.action, e.actor) for e in events] == [(m.image_id, "delete", "carol") for m in others]
    assert all(f"duplicate of image {keep.image_id} (kept); label was 'Cats'" in e.note for e in events)
    assert label_events == [keep.image_id]  # the deleted images' label history went with them; the note keeps it
    for m in group.members:
        assert all(p.exists() == (m.image_id == keep.image_id) for p in files[m.image_id])


def test_keep_one_refuses_a_keep_id_outside_the_group_and_unknown_ids(db: Database) -> None:
    assert not import_uploads(
        db, [Upload("coffee.png", encode(product_photo("coffee"))), *_copies("coffee")[:1]], actor="a"
    ).refused
    ids = [m.image_id for m in duplicate_groups(db).groups[0].members]
    with pytest.raises(DuplicateRefused, match="not in this group"):
        keep_one(db, ids, 999, actor="carol")
    with pytest.raises(DuplicateRefused, match="at least two"):
        keep_one(db, ids[:1], ids[0], actor="carol")
    with pytest.raises(NotFound, match="no longer exist"):
        keep_one(db, [*ids, 998], ids[0], actor="carol")
    assert len(_rows(db)) == 2
    with db.read() as session:
        assert session.execute(text("SELECT COUNT(*) FROM image_events")).scalar_one() == 0
