"""The Categories & data page imports from, and exports to, the server exchange folder only."""

from __future__ import annotations

from core.db import Database
from core.ingest import LabelSource
from core.labels import list_categories
from core.stats import catalogue_stats
from tests.core.badfiles import make_zip
from tests.imagegen import CATEGORY_COLOURS, image_bytes, write_image_folder
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


def _import_zip(archive: bytes, *, source: LabelSource | None = None, labels: tuple[str, bytes] | None = None):
    at = run_page("pages/categories.py")
    next(u for u in at.file_uploader if u.label == "Zip archive of photos").set_value(
        ("photos.zip", archive, "application/zip")
    )
    if source is not None:
        at.radio(key="zip_source").set_value(source)
    if labels is not None:
        name, data = labels
        next(u for u in at.file_uploader if u.label.startswith("Labels CSV")).set_value((name, data, "text/csv"))
    return next(b for b in at.button if b.label == "Import zip").click().run()


def _imagefolder_zip() -> bytes:
    entries = [(f"photos/{c}/{c.lower()}_{i}.png", image_bytes(c, i)) for c in CATEGORY_COLOURS for i in range(2)]
    return make_zip(entries)


def test_an_imagefolder_zip_uploaded_without_a_csv_is_labelled_by_its_folders(db: Database) -> None:
    at = _import_zip(_imagefolder_zip())
    assert not at.exception and errors_of(at) == []
    stats = catalogue_stats(db)
    assert stats.total_images == 6 and stats.labelled == 6
    assert {c.name: c.labelled for c in list_categories(db)} == {c: 2 for c in CATEGORY_COLOURS}


def test_a_bad_labels_csv_uploaded_with_a_zip_is_named_in_the_error(db: Database) -> None:
    bad = b"filename,category\nshoes_0.png,Shoes\nhats_0.png\n"
    at = _import_zip(_imagefolder_zip(), source=LabelSource.CSV, labels=("shop-labels.csv", bad))
    errors = errors_of(at)
    assert len(errors) == 1 and "labels CSV shop\\-labels\\.csv line 3" in errors[0]  # markdown-escaped
    assert "labels CSV labels CSV" not in errors[0]
    assert catalogue_stats(db).total_images == 0
