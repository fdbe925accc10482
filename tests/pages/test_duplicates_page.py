"""The Duplicates page lists near-duplicate groups and "Keep this one" deletes the rest (AppTest)."""

from __future__ import annotations

from sqlalchemy import select

from core.db import Database
from core.ingest import Upload, import_uploads
from core.schema import Image, ImageEvent
from tests.core.test_duplicates import product_photo
from tests.imagegen import COPY_KINDS, encode, make_image
from tests.pages.helpers import errors_of, run_page


def test_keep_this_one_deletes_the_other_copies_and_says_so(db: Database) -> None:
    original = product_photo("coffee")
    uploads = [Upload("bag.png", encode(original))]
    uploads += [Upload(f"bag {kind}.jpg", encode(make(original), "JPEG")) for kind, make in COPY_KINDS.items()][:2]
    uploads.append(Upload("hat.png", encode(make_image("Hats", 1, size=160))))
    assert not import_uploads(db, uploads, actor="alice").refused
    at = run_page("pages/duplicates.py", {"actor": "dana"})
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
