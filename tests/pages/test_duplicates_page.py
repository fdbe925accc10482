"""The Duplicates page lists the stored near-duplicate groups a page at a time, says when a scan is due, and "Keep this
one" deletes the rest (AppTest)."""

from __future__ import annotations

from sqlalchemy import select, update
from typer.testing import CliRunner

import core.cli  # noqa: F401  (registers every command module on the app)
from core.catalog.ingest import Upload, import_uploads
from core.cli.app import app
from core.db import Database
from core.schema import Image, ImageEvent
from tests.core.test_duplicates import product_photo, shapes_photo
from tests.imagegen import COPY_KINDS, crop_5pct, encode, make_image
from tests.pages.helpers import errors_of, run_page


def test_keep_this_one_deletes_the_other_copies_and_says_so(db: Database) -> None:
    original = product_photo("coffee")
    uploads = [Upload("bag.png", encode(original))]
    uploads += [Upload(f"bag {kind}.jpg", encode(make(original), "JPEG")) for kind, make in COPY_KINDS.items()][:2]
    uploads.append(Upload("hat.png", encode(make_image("Hats", 1, size=160))))
    assert not import_uploads(db, uploads, actor="alice").refused
    at = run_page("pages/duplicates.py", {"signed_in_account": "dana"})
    assert not at.exception and errors_of(at) == []
    keep = [b for b in at.button if b.label == "Keep this one"]
    assert len(keep) == 3  # one group: the bag and its two copies, not the hat
    keep[1].click().run()
    assert not at.exception
    assert any("deleted 2 duplicate" in s.value.replace("\\", "") for s in at.success)
    with db.read() as session:
        names = set(session.scalars(select(Image.original_name)))
        actors = set(session.scalars(select(ImageEvent.actor)))
    assert len(names) == 2 and "hat.png" in names and actors == {"dana"}
    assert any("No near-duplicates" in s.value for s in at.success)


def test_groups_come_a_page_at_a_time_and_older_images_ask_for_a_scan(db: Database) -> None:
    photos = [shapes_photo(i) for i in range(12)]
    uploads = [Upload(f"item{i}.png", encode(im)) for i, im in enumerate(photos)]
    uploads += [Upload(f"item{i} cropped.jpg", encode(crop_5pct(im), "JPEG")) for i, im in enumerate(photos)]
    assert not import_uploads(db, uploads, actor="alice").refused
    at = run_page("pages/duplicates.py", {"signed_in_account": "dana"})
    assert not at.exception and errors_of(at) == [] and not at.info
    assert any("12 group(s) holding 24 images" in m.value for m in at.markdown)
    assert len([b for b in at.button if b.label == "Keep this one"]) == 20  # ten groups of two on page 1
    at.number_input(key="dup_page").set_value(2).run()
    assert not at.exception
    assert len([b for b in at.button if b.label == "Keep this one"]) == 4

    with db.write() as session:  # as if these had been imported before the groups were stored
        session.execute(update(Image).values(duplicate_group_id=None, duplicates_checked=False))
    at = run_page("pages/duplicates.py", {"signed_in_account": "dana"})
    assert any("24 image(s) have not been checked" in i.value and "duplicates scan" in i.value for i in at.info)
    assert any("No near-duplicates" in s.value for s in at.success)
    assert CliRunner().invoke(app, ["duplicates", "scan"]).exit_code == 0
    at = run_page("pages/duplicates.py", {"signed_in_account": "dana"})
    assert not at.info and any("12 group(s)" in m.value for m in at.markdown)
