"""The Categories & data page imports from, and exports to, the server exchange folder only."""

from __future__ import annotations

from core.db import Database
from core.stats import catalogue_stats
from tests.imagegen import write_image_folder
from tests.pages.helpers import errors_of, run_page


def _import_folder(text: str):
    at = run_page("pages/categories.py")
    next(t for t in at.text_input if t.label == "Folder path on the server").set_value(text)
    return next(b for b in at.button if b.label == "Import folder").click().run()


def test_a_folder_outside_the_exchange_folder_is_refused_and_nothing_is_read(db: Database) -> None:
    outside = write_image_folder(db.settings.data_dir.parent / "elsewhere", per_category=2)
    at = _import_folder(str(outside))
    errors = errors_of(at)
    assert errors and "outside the server exchange folder" in errors[0]
    assert catalogue_stats(db).total_images == 0


def test_a_folder_inside_the_exchange_folder_is_imported_with_folder_labels(db: Database) -> None:
    write_image_folder(db.settings.exchange_dir / "photos", per_category=2)
    at = _import_folder("photos")
    assert not at.exception and errors_of(at) == []
    stats = catalogue_stats(db)
    assert stats.total_images == 6 and stats.labelled == 6
