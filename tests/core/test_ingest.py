"""Ingest end to end on a real SQLite file and file system: bad files refused by name, good ones imported."""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from core import db as core_db
from core.catalog.ingest import ImportResult, Upload, import_paths, import_uploads, read_labels_csv
from core.catalog.ingest.decoding import Prepared, ProcessResult
from core.catalog.splits import split_for_hash
from core.db import Database
from core.errors import ProdcatError
from core.schema import AuditEvent, Category, Image, Label, LabelEvent
from core.settings import Settings, get_settings
from tests.core import badfiles
from tests.imagegen import CATEGORY_COLOURS, image_bytes, write_image_folder

pytestmark = pytest.mark.both_databases

BAD_FILES: dict[str, tuple[bytes, str]] = {
    "notes.jpg": (badfiles.TEXT, "not an image: looks like text"),
    "saved-page.jpg": (badfiles.HTML, "not an image: looks like HTML"),
    "logo.svg": (badfiles.SVG, "unsupported format SVG"),
    "spec.pdf": (badfiles.PDF, "looks like a PDF"),
    "empty.jpg": (b"", "empty file (0 bytes)"),
    "half.jpg": (badfiles.truncated_jpeg(), "truncated or corrupt JPEG"),
    "crc.png": (badfiles.png_bad_crc(), "PNG checksum error"),
    "bomb.png": (badfiles.png_huge_header(), "60000x60000 pixels exceeds the limit of"),
}


def _refusals(result: ImportResult) -> dict[str, str]:
    return {item.name: item.reason for item in result.refused}


def _image_count(db: Database) -> int:
    with db.read() as session:
        return session.scalar(select(func.count()).select_from(Image)) or 0


def _labels(db: Database) -> dict[str, str]:
    """original_name -> current label name."""
    with db.read() as session:
        rows = session.execute(
            select(Image.original_name, Category.name).join(Label, Label.image_id == Image.id).join(Category)
        )
        return {name: category for name, category in rows}


def _files_outside(root: Path, data_dir: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and not p.is_relative_to(data_dir)}


def test_a_mixed_folder_imports_the_good_and_names_every_bad_file(db: Database, tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "photos", per_category=2)
    for name, (data, _) in BAD_FILES.items():
        (root / "Shoes" / name).write_bytes(data)
    seen: list[tuple[int, int | None, str]] = []
    result = import_paths(
        db, [root], labels_from_folders=True, actor="alice", progress=lambda d, t, n: seen.append((d, t, n))
    )

    refused = _refusals(result)
    assert set(refused) == {f"photos/Shoes/{name}" for name in BAD_FILES}
    for name, (_, reason) in BAD_FILES.items():
        assert reason in refused[f"photos/Shoes/{name}"]
    assert len(result.imported) == 6 and not result.duplicates
    assert _image_count(db) == 6
    assert db.integrity_ok()
    # Progress: one call per file, ending at the total.
    total = 6 + len(BAD_FILES)
    assert [d for d, _, _ in seen] == list(range(1, total + 1))
    assert {t for _, t, _ in seen} == {total}
    # Rows: stored paths relative to data_dir and present, source, uploader, split from the hash.
    with db.read() as session:
        rows = session.scalars(select(Image)).all()
        session.expunge_all()  # keep the loaded rows readable after the read session ends
    for row in rows:
        assert not Path(row.stored_path).is_absolute()
        assert (db.settings.data_dir / row.stored_path).is_file()
        assert (db.settings.data_dir / row.thumb_path).is_file()
        assert row.source == "folder:photos" and row.uploaded_by == "alice"
        assert row.split == split_for_hash(row.sha256, db.settings.split_fractions)
        assert row.format == "PNG" and (row.width, row.height) == (48, 48)


def test_uploads_mixed_batch(db: Database) -> None:
    uploads = [Upload(name, data) for name, (data, _) in BAD_FILES.items()]
    uploads.insert(3, Upload("good-1.png", image_bytes("Bags", 1)))
    uploads.append(Upload("good-2.jpg", image_bytes("Hats", 2, fmt="JPEG")))
    result = import_uploads(db, uploads, category="Bags", actor="bob")
    refused = _refusals(result)
    for name, (_, reason) in BAD_FILES.items():
        assert reason in refused[name], (name, refused.get(name))
    assert [item.name for item in result.imported] == ["good-1.png", "good-2.jpg"]
    assert all(item.category == "Bags" for item in result.imported)
    assert _labels(db) == {"good-1.png": "Bags", "good-2.jpg": "Bags"}
    with db.read() as session:
        assert set(session.scalars(select(Image.source))) == {"upload"}
        events = [(e.action, e.actor) for e in session.scalars(select(LabelEvent))]
    assert events == [("import", "bob"), ("import", "bob")]
    assert db.integrity_ok()


def test_streamlit_like_uploads_with_read_are_accepted(db: Database) -> None:
    class FakeUploadedFile(io.BytesIO):
        def __init__(self, name: str, data: bytes) -> None:
            super().__init__(data)
            self.name = name

    result = import_uploads(db, [FakeUploadedFile("a.png", image_bytes("Shoes", 1))], actor="x")  # type: ignore[list-item]
    assert len(result.imported) == 1


def test_formats_by_content_cmyk_16bit_palette_gif_exif(db: Database) -> None:
    upright = badfiles.quadrants(96, 64)
    uploads = [
        Upload("print.jpg", badfiles.cmyk_jpeg()),
        Upload("depth.png", badfiles.png16([65535, 32768, 0])),
        Upload("cutout.png", badfiles.palette_png_with_transparency()),
        Upload("spin.gif", badfiles.animated_gif()),
        Upload("phone.jpg", badfiles.jpeg_with_orientation(upright.transpose(badfiles.ORIENTATION_FIX[6]), 8)),
        Upload("really-a-png.jpg", badfiles.png()),
    ]
    result = import_uploads(db, uploads, actor="x")
    assert not result.refused, result.refused
    with db.read() as session:
        rows = {r.original_name: r for r in session.scalars(select(Image))}
        session.expunge_all()
    assert rows["really-a-png.jpg"].format == "PNG" and rows["really-a-png.jpg"].stored_path.endswith(".png")
    assert rows["spin.gif"].format == "GIF"
    # Stored 64x96 on its side with orientation 8: people see (and the row records) 96x64.
    assert (rows["phone.jpg"].width, rows["phone.jpg"].height) == (96, 64)
    assert db.integrity_ok()


def test_duplicates_in_one_batch_and_across_batches(db: Database) -> None:
    same = image_bytes("Shoes", 3)
    batch = [Upload("a.png", same), Upload("b.png", image_bytes("Hats", 1)), Upload("a-copy.png", same)]
    first = import_uploads(db, batch, actor="x")
    assert [i.name for i in first.imported] == ["a.png", "b.png"]
    original_id = first.imported[0].image_id
    assert [(d.name, d.image_id, d.existing_name) for d in first.duplicates] == [("a-copy.png", original_id, "a.png")]
    again = import_uploads(db, [Upload("renamed.png", same)], actor="y")
    assert not again.imported
    assert [(d.name, d.image_id, d.existing_name) for d in again.duplicates] == [("renamed.png", original_id, "a.png")]
    assert _image_count(db) == 2
    stored = list((db.settings.images_dir).rglob("*.png"))
    assert len(stored) == 2  # the same bytes are stored once
    assert db.integrity_ok()


def test_duplicate_labels_an_unlabelled_image_but_never_overwrites(db: Database) -> None:
    data_a, data_b = image_bytes("Shoes", 4), image_bytes("Bags", 4)
    import_uploads(db, [Upload("a.png", data_a)], actor="x")  # unlabelled
    import_uploads(db, [Upload("b.png", data_b)], category="Bags", actor="x")
    result = import_uploads(db, [Upload("a2.png", data_a), Upload("b2.png", data_b)], category="Shoes", actor="y")
    assert len(result.duplicates) == 2 and not result.imported and not result.refused
    assert _labels(db) == {"a.png": "Shoes", "b.png": "Bags"}  # b keeps the label a person gave it


def test_category_names_are_kept_as_text_and_bad_ones_refuse_only_their_file(db: Database, tmp_path: Path) -> None:
    html_name = "<b>Shoes</b> & <script>alert(1)</script>"
    result = import_uploads(db, [Upload("a.png", image_bytes("Shoes", 5))], category=html_name, actor="x")
    assert result.imported[0].category == html_name
    assert _labels(db) == {"a.png": html_name}

    csv_path = tmp_path / "labels.csv"
    csv_path.write_text('filename,category\ngood.png,Hats\nbad.png,"Bad\tName"\nlong.png,' + "x" * 300 + "\n")
    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(["good.png", "bad.png", "long.png"]):
        (folder / name).write_bytes(image_bytes("Hats", 10 + i))
    result = import_paths(db, [folder], labels_csv=csv_path, actor="x")
    refused = _refusals(result)
    assert "control characters" in refused["in/bad.png"] and "invalid category" in refused["in/bad.png"]
    assert "limit is 200" in refused["in/long.png"]
    assert [i.name for i in result.imported] == ["in/good.png"]
    assert _image_count(db) == 2
    assert db.integrity_ok()


def test_labels_from_folders_round_trip(db: Database, tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "dataset", per_category=3)
    (root / "Shoes" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._x.png").write_bytes(b"junk")
    result = import_paths(db, [root], labels_from_folders=True, actor="x")
    assert not result.refused  # OS litter is skipped silently
    labels = _labels(db)
    assert len(labels) == 9
    for name, category in labels.items():
        assert name.split("/")[1] == category and category in CATEGORY_COLOURS
    with db.read() as session:
        assert {e.action for e in session.scalars(select(LabelEvent))} == {"import"}


def test_labels_csv_by_relative_path_or_bare_name_and_precedence(db: Database, tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "photos", per_category=2)
    csv_path = root / "labels.csv"  # kept inside the tree: not reported as a bad image
    csv_path.write_text("Shoes/shoes_0.png,Sneakers\nhats_1.png,Caps\n")
    result = import_paths(db, [root], labels_from_folders=True, labels_csv=csv_path, category="Misc", actor="x")
    assert not result.refused
    labels = _labels(db)
    assert labels["photos/Shoes/shoes_0.png"] == "Sneakers"  # CSV by relative path beats the folder
    assert labels["photos/Hats/hats_1.png"] == "Caps"  # CSV by bare name
    assert labels["photos/Bags/bags_0.png"] == "Bags"  # folder beats the batch category
    other = tmp_path / "loose.png"
    other.write_bytes(image_bytes("Bags", 99))
    import_paths(db, [other], category="Misc", actor="x")
    assert _labels(db)["loose.png"] == "Misc"


def test_read_labels_csv_header_optional_and_malformed_rows_named(tmp_path: Path) -> None:
    with_header = tmp_path / "a.csv"
    with_header.write_text("filename,category\na.jpg,Shoes\n\n.\\sub\\b.jpg , Bags \n")
    assert read_labels_csv(with_header) == {"a.jpg": "Shoes", "sub/b.jpg": "Bags"}
    assert read_labels_csv(io.BytesIO(b"\xef\xbb\xbfa.jpg,Shoes\n")) == {"a.jpg": "Shoes"}
    bad = tmp_path / "bad.csv"
    bad.write_text("a.jpg,Shoes\nb.jpg\n")
    with pytest.raises(ProdcatError, match=r"bad\.csv line 2: expected two columns"):
        read_labels_csv(bad)
    clash = tmp_path / "clash.csv"  # ambiguous, not an error: the name is left out (see the import tests below)
    clash.write_text("a.jpg,Shoes\na.jpg,Bags\nb.jpg,Hats\nb.jpg,Hats\n")
    labels = read_labels_csv(clash)
    assert labels == {"b.jpg": "Hats"} and labels.ambiguous == {"a.jpg": ["Shoes", "Bags"]}


def test_read_labels_csv_with_a_header_ignores_extra_columns_but_not_broken_rows(tmp_path: Path) -> None:
    # The shape of `export labels --with-ids`, columns reordered as a spreadsheet might leave them.
    wide = tmp_path / "wide.csv"
    wide.write_text("image_id,Category,sha256,filename,split\n1,Shoes,ab12,a.jpg,train\n2,Bags,cd34,sub/b.jpg,test,,\n")
    assert read_labels_csv(wide) == {"a.jpg": "Shoes", "sub/b.jpg": "Bags"}
    too_wide = tmp_path / "too_wide.csv"
    too_wide.write_text("filename,category,split\na.jpg,Shoes,train\nb.jpg,Bags,test,oops\n")
    with pytest.raises(ProdcatError, match=r"too_wide\.csv line 3: 4 columns but the header has 3"):
        read_labels_csv(too_wide)
    short = tmp_path / "short.csv"
    short.write_text("split,filename,category\ntrain,a.jpg,Shoes\n\ntest,b.jpg\n")
    with pytest.raises(ProdcatError, match=r"short\.csv line 4: empty file name or category"):
        read_labels_csv(short)
    headless = tmp_path / "headless.csv"
    headless.write_text("a.jpg,Shoes,train\n")  # no header: extra columns stay an error
    with pytest.raises(ProdcatError, match=r"headless\.csv line 1: expected two columns"):
        read_labels_csv(headless)


def test_zip_traversal_names_never_write_outside_the_store(db: Database, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    entries = [
        ("../escape.png", image_bytes("Shoes", 20)),
        (f"/tmp/{marker}.png", image_bytes("Bags", 20)),
        ("../../../../../../tmp/deep.png", image_bytes("Hats", 20)),
        ("ok/fine.png", image_bytes("Hats", 21)),
        ("..\\windows.png", badfiles.TEXT),
    ]
    archive = tmp_path / "work" / "evil.zip"
    archive.parent.mkdir()
    archive.write_bytes(badfiles.make_zip(entries))
    before = _files_outside(tmp_path, db.settings.data_dir)
    result = import_paths(db, [archive], labels_from_folders=True, actor="x")
    assert len(result.imported) == 4
    assert _refusals(result) == {"evil.zip/..\\windows.png": "not an image: looks like text"}
    assert _files_outside(tmp_path, db.settings.data_dir) == before
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "work" / "escape.png").exists()
    assert not Path(f"/tmp/{marker}.png").exists()
    with db.read() as session:
        rows = session.scalars(select(Image)).all()
        session.expunge_all()
    assert {r.source for r in rows} == {"zip:evil.zip"}
    for row in rows:  # stored by content under the store, whatever the entry was called
        assert (db.settings.data_dir / row.stored_path).resolve().is_relative_to(db.settings.images_dir)
    # A '..' component is not a category; the real folder is.
    assert _labels(db) == {"evil.zip/ok/fine.png": "ok"}
    assert db.integrity_ok()


@pytest.fixture
def capped_db(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Database]:
    """A database whose settings carry small zip caps (set through the environment, as an operator would)."""

    def make(**env: int) -> Database:
        for key, value in env.items():
            monkeypatch.setenv(f"PRODCAT_{key.upper()}", str(value))
        get_settings.cache_clear()
        return core_db.open_database(get_settings())

    return make


def test_zip_expanding_past_the_byte_cap_keeps_the_good_entries_before_it(
    capped_db: Callable[..., Database], tmp_path: Path
) -> None:
    # A ratio limit this high lets the fillers past the compression rule, to reach the cap on the archive's bytes.
    db = capped_db(zip_max_total_bytes=1_000_000, zip_max_ratio=100_000)
    zeros = b"\x00" * 5_000_000  # 5 MB of zeros compresses to a few kilobytes
    archive = badfiles.make_zip(
        [
            ("a.png", image_bytes("Shoes", 30)),
            ("b.png", image_bytes("Bags", 30)),
            ("filler1.bin", zeros),
            ("filler2.bin", zeros),
            ("c.png", image_bytes("Hats", 30)),
        ]
    )
    assert len(archive) < 50_000
    result = import_uploads(db, [Upload("bomb.zip", archive)], actor="x")
    assert [i.name for i in result.imported] == ["bomb.zip/a.png", "bomb.zip/b.png"]
    refused = _refusals(result)
    # Refused from the sizes the archive lists, before the fillers are inflated.
    assert "more than the limit of 1,000,000 bytes: 3 remaining entries were not read" in refused["bomb.zip"]
    assert _image_count(db) == 2
    assert db.integrity_ok()


def test_zip_with_too_many_entries_imports_up_to_the_cap(capped_db: Callable[..., Database]) -> None:
    db = capped_db(zip_max_entries=3)
    archive = badfiles.make_zip([(f"{i}.png", image_bytes("Hats", 40 + i)) for i in range(5)])
    result = import_uploads(db, [Upload("many.zip", archive), Upload("loose.png", image_bytes("Bags", 40))], actor="x")
    assert [i.name for i in result.imported] == ["many.zip/0.png", "many.zip/1.png", "many.zip/2.png", "loose.png"]
    assert "5 files, more than the limit of 3: the last 2 were not read" in _refusals(result)["many.zip"]
    assert db.integrity_ok()


def test_encrypted_and_nested_zip_entries_are_refused_per_entry(db: Database) -> None:
    inner = badfiles.make_zip([("x.png", image_bytes("Shoes", 50))])
    archive = badfiles.zip_with_encrypted_entry(
        [("one.png", image_bytes("Shoes", 51)), ("inner.zip", inner), ("two.png", image_bytes("Bags", 51))],
        "secret.png",
        image_bytes("Hats", 51),
    )
    result = import_uploads(db, [Upload("mixed.dat", archive)], actor="x")  # a zip by content, whatever its name
    refused = _refusals(result)
    assert "encrypted zip entry" in refused["mixed.dat/secret.png"]
    assert "nested archive" in refused["mixed.dat/inner.zip"]
    assert sorted(i.name for i in result.imported) == ["mixed.dat/one.png", "mixed.dat/two.png"]
    assert _image_count(db) == 2
    assert db.integrity_ok()


def test_a_broken_zip_is_refused_and_the_rest_of_the_batch_goes_through(db: Database) -> None:
    broken = badfiles.make_zip([("a.png", image_bytes("Shoes", 60))])[:40]
    result = import_uploads(db, [Upload("broken.zip", broken), Upload("ok.png", image_bytes("Shoes", 61))], actor="x")
    assert "broken.zip" in _refusals(result)
    assert [i.name for i in result.imported] == ["ok.png"]


def test_missing_path_is_refused_by_name(db: Database, tmp_path: Path) -> None:
    good = tmp_path / "g.png"
    good.write_bytes(image_bytes("Bags", 70))
    result = import_paths(db, [tmp_path / "nope", good], actor="x")
    assert _refusals(result) == {str(tmp_path / "nope"): "no such file or folder"}
    assert len(result.imported) == 1


def _stored_files(db: Database) -> set[str]:
    """Originals and thumbnails on disk, relative to the data directory."""
    root = db.settings.data_dir
    files = [p for folder in ("images", "thumbs") for p in (root / folder).rglob("*") if p.is_file()]
    return {p.relative_to(root).as_posix() for p in files}


def _files_of_rows(db: Database) -> set[str]:
    with db.read() as session:
        return {path for row in session.execute(select(Image.stored_path, Image.thumb_path)) for path in row}


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Set the number of images the importer writes per transaction (and no time limit on a batch)."""
    import core.catalog.ingest.importer as importer

    def set_rows(rows: int) -> None:
        monkeypatch.setattr(importer, "BATCH_ROWS", rows)
        monkeypatch.setattr(importer, "BATCH_SECONDS", 3600.0)

    return set_rows


@pytest.fixture
def failing_label_events(db: Database) -> Iterator[Callable[[int], None]]:
    """Make the n-th INSERT INTO label_events of the database's writers fail, as a full disk would."""
    from sqlalchemy import event

    left: list[int] = []

    def fail(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO LABEL_EVENTS") and left:
            left[0] -= 1
            if left[0] == 0:
                raise RuntimeError("disk I/O error (simulated)")

    event.listen(db.write_engine, "before_cursor_execute", fail)
    yield lambda n: left.append(n)
    event.remove(db.write_engine, "before_cursor_execute", fail)


def test_a_failing_write_leaves_no_rows_and_no_files_of_its_batch(
    db: Database, small_batches: Callable[[int], None], failing_label_events: Callable[[int], None]
) -> None:
    import_uploads(db, [Upload("before.png", image_bytes("Shoes", 80))], category="Shoes", actor="x")
    before = _stored_files(db)
    assert len(before) == 2
    small_batches(2)
    failing_label_events(2)  # the second batch's transaction fails
    uploads = [Upload(f"during-{i}.png", image_bytes("Shoes", 81 + i)) for i in range(5)]
    with pytest.raises(Exception, match="simulated"):
        import_uploads(db, uploads, category="Shoes", actor="x")
    # Each batch is one transaction: the first is whole, the second left nothing, and the files of the second batch and
    # of the file still in flight were removed again: no file without a row, no row without its files.
    assert set(_labels(db)) == {"before.png", "during-0.png", "during-1.png"}
    assert _image_count(db) == 3
    assert _stored_files(db) == _files_of_rows(db) and before < _stored_files(db)
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(LabelEvent)) == 3
    assert db.integrity_ok()
    # Importing again completes.
    again = import_uploads(db, uploads, category="Shoes", actor="x")
    assert [i.name for i in again.imported] == [f"during-{i}.png" for i in range(2, 5)]
    assert [d.name for d in again.duplicates] == ["during-0.png", "during-1.png"]
    assert _stored_files(db) == _files_of_rows(db) and _image_count(db) == 6


def _outcome(db: Database, result: ImportResult) -> dict[str, object]:
    """What a person sees of an import: each file's verdict, and each stored image's split, label and group."""
    with db.read() as session:
        rows = session.execute(
            select(Image.original_name, Image.split, Image.duplicate_group_id.is_not(None), Category.name)
            .outerjoin(Label, Label.image_id == Image.id)
            .outerjoin(Category, Category.id == Label.category_id)
        ).all()
        events = session.execute(select(LabelEvent.action, LabelEvent.note).order_by(LabelEvent.id)).all()
    return {
        "imported": [(i.name, i.category) for i in result.imported],
        "duplicates": [(d.name, d.existing_name) for d in result.duplicates],
        "refused": _refusals(result),
        "rows": sorted(tuple(r) for r in rows),
        "events": [tuple(e) for e in events],
    }


def _mixed_uploads() -> tuple[list[Upload], dict[str, str]]:
    """Twelve files: repeats within and across batches of 3, a near-duplicate, a bad file, labels for most."""
    shoe, bag, hat = image_bytes("Shoes", 300), image_bytes("Bags", 300), image_bytes("Hats", 300)
    uploads = [
        Upload("shoe.png", shoe),
        Upload("bag.png", bag),
        Upload("shoe-again.png", shoe),  # same batch as its original
        Upload("blocks.png", _blocky(7, 10, "PNG")),
        Upload("bag-again.png", bag),  # next batch
        Upload("notes.jpg", badfiles.TEXT),
        Upload("blocks-large.jpg", _blocky(7, 20, "JPEG")),  # a near-duplicate of blocks.png
        Upload("hat.png", hat),
        Upload("hat-unlabelled-first.png", image_bytes("Hats", 301)),
        Upload("hat-again.png", hat),
        Upload("hat-labelled-later.png", image_bytes("Hats", 301)),
        Upload("shoe-third.png", shoe),
    ]
    labels = {"shoe.png": "Shoes", "bag-again.png": "Bags", "hat.png": "Hats", "hat-labelled-later.png": "Caps"}
    labels |= {"blocks.png": "Blocks", "blocks-large.jpg": "Blocks", "shoe-third.png": "Boots"}
    return uploads, labels


def test_an_import_in_small_batches_matches_one_in_a_single_batch(
    db: Database, tmp_path: Path, small_batches: Callable[[int], None]
) -> None:
    uploads, labels = _mixed_uploads()
    whole = _other_db(tmp_path)  # the default batch holds every file
    expected = _outcome(whole, import_uploads(whole, uploads, labels=labels, actor="alice"))
    small_batches(3)
    seen: list[int] = []
    result = import_uploads(db, uploads, labels=labels, actor="alice", progress=lambda d, _t, _n: seen.append(d))
    assert _outcome(db, result) == expected
    assert seen == list(range(1, len(uploads) + 1))
    assert expected["imported"] == [
        ("shoe.png", "Shoes"),
        ("bag.png", None),
        ("blocks.png", "Blocks"),
        ("blocks-large.jpg", "Blocks"),
        ("hat.png", "Hats"),
        ("hat-unlabelled-first.png", None),
    ]
    assert expected["duplicates"] == [
        ("shoe-again.png", "shoe.png"),
        ("bag-again.png", "bag.png"),
        ("hat-again.png", "hat.png"),
        ("hat-labelled-later.png", "hat-unlabelled-first.png"),
        ("shoe-third.png", "shoe.png"),
    ]
    rows = {name: (split, grouped, label) for name, split, grouped, label in expected["rows"]}  # type: ignore[attr-defined]
    assert rows["bag.png"][2] == "Bags" and rows["hat-unlabelled-first.png"][2] == "Caps"  # labelled by a later copy
    assert rows["shoe.png"][2] == "Shoes"  # the third copy's "Boots" does not overwrite it
    assert rows["blocks-large.jpg"][:2] == (rows["blocks.png"][0], True)  # the near-duplicate joins its split
    assert _stored_files(db) == _files_of_rows(db)


def test_a_category_archived_during_an_import_refuses_only_its_files(
    db: Database, small_batches: Callable[[int], None]
) -> None:
    from core.catalog.labels import archive_category

    small_batches(2)
    item = image_bytes("Bags", 310)
    uploads = [
        Upload("a.png", image_bytes("Shoes", 310)),
        Upload("b.png", image_bytes("Shoes", 311)),
        Upload("c.png", item),
        Upload("c-copy.png", item),
        Upload("d.png", image_bytes("Shoes", 312)),
    ]
    labels = {"a.png": "Shoes", "b.png": "Old", "c.png": "Old", "c-copy.png": "Shoes", "d.png": "Shoes"}

    def archive_after_the_first_batch(done: int, _total: int | None, _name: str) -> None:
        if done == 2:
            archive_category(db, "Old", actor="admin")

    result = import_uploads(db, uploads, labels=labels, actor="alice", progress=archive_after_the_first_batch)
    # c.png was checked (and stored) before "Old" was archived; its row is refused when written. Its copy, for
    # another category, is imported in its place from the same stored files.
    assert _refusals(result) == {"c.png": "invalid category 'Old': category 'Old' is archived: un-archive it or "
                                           "choose another category"}  # fmt: skip
    assert [(i.name, i.category) for i in result.imported] == [
        ("a.png", "Shoes"),
        ("b.png", "Old"),
        ("c-copy.png", "Shoes"),
        ("d.png", "Shoes"),
    ]
    assert _stored_files(db) == _files_of_rows(db) and _image_count(db) == 4


def test_bytes_another_import_stores_meanwhile_become_a_duplicate(
    db: Database, small_batches: Callable[[int], None]
) -> None:
    small_batches(2)
    contested = image_bytes("Hats", 320)
    uploads = [Upload(f"{n}.png", image_bytes("Bags", 320 + i)) for i, n in enumerate("ab")]
    uploads += [Upload("c.png", contested), Upload("d.png", image_bytes("Bags", 330))]
    other: list[ImportResult] = []

    def import_elsewhere(done: int, _total: int | None, _name: str) -> None:
        if done == 2:  # c.png is looked up, decoded and stored already, its row not yet written
            other.append(import_uploads(db, [Upload("elsewhere.png", contested)], category="Hats", actor="bob"))

    result = import_uploads(db, uploads, category="Bags", actor="alice", progress=import_elsewhere)
    elsewhere_id = other[0].imported[0].image_id
    assert [i.name for i in result.imported] == ["a.png", "b.png", "d.png"]
    assert [(d.name, d.image_id, d.existing_name) for d in result.duplicates] == [
        ("c.png", elsewhere_id, "elsewhere.png")
    ]
    assert _labels(db)["elsewhere.png"] == "Hats"  # labelled already: the duplicate leaves it alone
    assert _stored_files(db) == _files_of_rows(db) and _image_count(db) == 4
    assert db.integrity_ok()


def test_zipped_image_folder_upload_labels_by_folder_skipping_the_wrapper(db: Database) -> None:
    entries = [(f"dataset/{c}/{c.lower()}_{i}.png", image_bytes(c, 90 + i)) for c in CATEGORY_COLOURS for i in range(2)]
    entries.append(("dataset/readme.txt", b"hello"))
    upload = Upload("dataset.zip", badfiles.make_zip(entries))
    result = import_uploads(db, [upload], labels_from_folders=True, actor="x")
    assert _refusals(result) == {"dataset.zip/dataset/readme.txt": "not an image: looks like text"}
    labels = _labels(db)
    assert len(labels) == 6
    assert all(name.split("/")[2] == category for name, category in labels.items())
    with db.read() as session:
        assert set(session.scalars(select(Image.source))) == {"zip:dataset.zip"}


def test_a_zip_listing_far_more_entries_than_the_cap_is_refused_before_its_directory_is_read(
    capped_db: Callable[..., Database],
) -> None:
    db = capped_db(zip_max_entries=3)
    archive = badfiles.make_zip([(f"{i}.png", b"") for i in range(13)])  # 13 > 4 x the cap of 3
    result = import_uploads(db, [Upload("lots.zip", archive), Upload("loose.png", image_bytes("Bags", 41))], actor="x")
    assert [i.name for i in result.imported] == ["loose.png"]
    assert "lists 13 entries, far more than the limit of 3" in _refusals(result)["lots.zip"]
    assert db.integrity_ok()


def test_listed_zip_entries_reads_the_zip64_record() -> None:
    import io
    import zipfile

    from core.catalog.ingest import listed_zip_entries

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for i in range(0x10000 + 5):  # more than a classic record's 16-bit count: zipfile writes zip64 records
            zf.writestr(zipfile.ZipInfo(f"{i}"), b"")
    data = buf.getvalue()
    assert b"PK\x06\x06" in data[-200:]
    assert listed_zip_entries(io.BytesIO(data)) == 0x10000 + 5
    assert listed_zip_entries(io.BytesIO(badfiles.make_zip([("a", b"x"), ("b", b"y")]))) == 2
    assert listed_zip_entries(io.BytesIO(b"PK\x03\x04 not really a zip")) is None


def _blocky(seed: int, scale: int, fmt: str) -> bytes:
    """A picture of 9x8 distinct grey blocks (a structure dHash sees clearly), at `scale` pixels per block."""
    grid = (np.random.default_rng(seed).permutation(72).reshape(8, 9) * 3 + 20).astype(np.uint8)
    pixels = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    buf = io.BytesIO()
    PILImage.fromarray(np.stack([pixels] * 3, axis=-1)).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_a_near_duplicate_joins_the_split_of_the_picture_it_copies(db: Database) -> None:
    import hashlib

    from core.catalog.imaging import difference_hash

    fractions = db.settings.split_fractions
    # A picture whose resized JPEG copy would land in another split by its own bytes' hash.
    seed = next(
        s
        for s in range(200)
        if split_for_hash(hashlib.sha256(_blocky(s, 10, "PNG")).hexdigest(), fractions)
        != split_for_hash(hashlib.sha256(_blocky(s, 20, "JPEG")).hexdigest(), fractions)
    )
    original, copy = _blocky(seed, 10, "PNG"), _blocky(seed, 20, "JPEG")
    result = import_uploads(db, [Upload("shirt.png", original)], actor="x")
    result2 = import_uploads(
        db, [Upload("shirt_large.jpg", copy), Upload("other.png", _blocky(seed + 1, 10, "PNG"))], actor="x"
    )
    assert not result.refused and not result2.refused
    with db.read() as session:
        rows = {
            r.original_name: r
            for r in session.execute(select(Image.original_name, Image.phash, Image.split, Image.sha256))
        }
    assert rows["shirt_large.jpg"].phash == rows["shirt.png"].phash is not None  # two files, one picture
    assert rows["shirt_large.jpg"].split == rows["shirt.png"].split  # so one split: the copy is not a leak
    assert rows["shirt_large.jpg"].split != str(split_for_hash(rows["shirt_large.jpg"].sha256, fractions))
    assert rows["other.png"].phash != rows["shirt.png"].phash  # a different picture keeps its own split
    assert rows["other.png"].split == str(split_for_hash(rows["other.png"].sha256, fractions))
    assert difference_hash(PILImage.new("RGB", (40, 40), (200, 10, 10))) is None  # flat: no structure to match on


# --- labels CSV round trips and name matching ----------------------------------------------------------------------


def _other_db(tmp_path: Path, name: str = "other-data") -> Database:
    """A second catalogue (its own data folder and SQLite file), as on another machine."""
    # database_url=None: a SQLite file in that folder even while this test runs on PostgreSQL.
    return core_db.open_database(Settings(data_dir=tmp_path / name, database_url=None))


def test_an_exported_csv_relabels_two_images_that_share_a_file_name(db: Database, tmp_path: Path) -> None:
    from core.catalog.export import labels_csv_bytes

    shoe, bag = image_bytes("Shoes", 200), image_bytes("Bags", 200)
    import_uploads(db, [Upload("IMG_0001.jpg", shoe)], category="Shoes", actor="alice")
    import_uploads(db, [Upload("IMG_0001.jpg", bag)], category="Bags", actor="alice")
    batch = [Upload("IMG_0001.jpg", shoe), Upload("IMG_0001.jpg", bag)]

    # --with-ids: each row is matched to its file by content, so both labels come back.
    with_ids = read_labels_csv(io.BytesIO(labels_csv_bytes(db, with_ids=True, actor="x")))
    other = _other_db(tmp_path)
    result = import_uploads(other, batch, labels=with_ids, actor="bob")
    assert [i.category for i in result.imported] == ["Shoes", "Bags"] and not result.notes and not result.refused

    # The plain export cannot tell the two apart: the file still imports, the name is left unlabelled and said so.
    plain = read_labels_csv(io.BytesIO(labels_csv_bytes(db, actor="x")))
    third = _other_db(tmp_path, "third-data")
    result = import_uploads(third, batch, labels=plain, actor="bob")
    assert len(result.imported) == 2 and not result.refused
    assert [i.category for i in result.imported] == [None, None]
    assert len(result.notes) == 1
    assert "label not applied: 'IMG_0001.jpg' is listed with different categories in the labels CSV" in result.notes[0]
    assert "'Bags'" in result.notes[0] and "'Shoes'" in result.notes[0]


def test_labels_exported_from_a_zip_import_reapply_to_the_same_zip(db: Database, tmp_path: Path) -> None:
    from core.catalog.export import labels_csv_bytes

    entries = [("Shoes/a.png", image_bytes("Shoes", 210)), ("Bags/b.png", image_bytes("Bags", 210))]
    archive = Upload("batch.zip", badfiles.make_zip(entries))
    import_uploads(db, [archive], labels_from_folders=True, actor="alice")
    exported = labels_csv_bytes(db, actor="x")
    assert b"batch.zip/Shoes/a.png,Shoes" in exported  # the stored name, zip name included
    other = _other_db(tmp_path)
    result = import_uploads(other, [archive], labels=read_labels_csv(io.BytesIO(exported)), actor="bob")
    assert {(i.name, i.category) for i in result.imported} == {
        ("batch.zip/Shoes/a.png", "Shoes"),
        ("batch.zip/Bags/b.png", "Bags"),
    }


def test_a_decomposed_zip_entry_name_matches_a_composed_csv_name(db: Database) -> None:
    import unicodedata

    decomposed = unicodedata.normalize("NFD", "café.png")  # how macOS Finder's "Compress" writes it
    archive = Upload("batch.zip", badfiles.make_zip([(decomposed, image_bytes("Hats", 220))]))
    labels = read_labels_csv(io.BytesIO("filename,category\ncafé.png,Cups\n".encode()))  # typed: composed
    result = import_uploads(db, [archive], labels=labels, actor="alice")
    assert [i.category for i in result.imported] == ["Cups"]


def test_a_csv_sku_column_attaches_skus_and_a_bad_sku_refuses_only_its_row(db: Database, tmp_path: Path) -> None:
    # A copy of b.png is in the catalogue already without a SKU, and a copy of c.png with another SKU.
    old = [Upload("old-b.png", image_bytes("Bags", 251)), Upload("old-c.png", image_bytes("Hats", 252))]
    import_uploads(db, old, actor="bob")
    with db.write() as session:
        session.scalars(select(Image).where(Image.original_name == "old-c.png")).one().sku = "HAT-OLD"
    rows = [
        "filename,category,sku",
        "a.png,Shoes, SKU-001 ",  # trimmed
        "b.png,Bags,BAG-7",
        "c.png,Hats,HAT-NEW",
        "d.png,Shoes,TSH\t042",  # a control character
        "e.png,Shoes," + "X" * 65,  # one over the column's 64
        "f.png,Shoes,",  # no SKU: fine
    ]
    csv_path = tmp_path / "shop.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    folder = tmp_path / "in"
    folder.mkdir()
    for k, name in enumerate("adef"):
        (folder / f"{name}.png").write_bytes(image_bytes("Shoes", 260 + k))
    (folder / "b.png").write_bytes(image_bytes("Bags", 251))
    (folder / "c.png").write_bytes(image_bytes("Hats", 252))

    result = import_paths(db, [folder], labels_csv=csv_path, actor="alice")

    assert not result.refused and len(result.imported) == 4 and len(result.duplicates) == 2
    with db.read() as session:
        skus = {name: sku for name, sku in session.execute(select(Image.original_name, Image.sku))}
    assert skus == {
        "in/a.png": "SKU-001",
        "old-b.png": "BAG-7",  # a stored copy without a SKU gets the CSV's
        "old-c.png": "HAT-OLD",  # one with another SKU keeps it, and the import says so
        "in/d.png": None,
        "in/e.png": None,
        "in/f.png": None,
    }
    assert _labels(db)["in/d.png"] == "Shoes" and _labels(db)["in/e.png"] == "Shoes"  # the rows' labels still count
    notes = "\n".join(result.notes)
    assert f"labels CSV {csv_path} line 5: SKU not attached to 'd.png': SKU 'TSH\\t042' contains a control" in notes
    assert "line 6: SKU not attached to 'e.png': SKU 'XXXX" in notes and "65 characters long; at most 64" in notes
    assert "SKU 'HAT-NEW' not attached to 'in/c.png'" in notes and "SKU 'HAT-OLD' was kept" in notes
    assert len(result.notes) == 3
    with db.read() as session:
        audit = session.scalars(select(AuditEvent).where(AuditEvent.detail["field"].as_string() == "sku")).all()
        filled = [(a.actor, a.subject, a.detail["new"]) for a in audit]
    assert filled == [("alice", f"image {result.duplicates[0].image_id}", "BAG-7")]


def test_a_csv_with_old_mac_line_endings_reads_and_broken_csv_names_file_and_line(tmp_path: Path) -> None:
    assert read_labels_csv(io.BytesIO(b"filename,category\ra.jpg,Shoes\rb.jpg,Bags\r")) == {
        "a.jpg": "Shoes",
        "b.jpg": "Bags",
    }
    # A quoted field spanning lines: the line reported is where the bad row ends, in the file people open.
    with pytest.raises(ProdcatError, match=r"my labels\.csv line 4: empty file name or category"):
        read_labels_csv(io.BytesIO(b'filename,category\n"a\nb.jpg",Shoes\nc.jpg,\n'), name="my labels.csv")
    huge = tmp_path / "huge.csv"
    huge.write_bytes(b"a.jpg,Shoes\n" + b"x" * 200_000 + b",Bags\n")  # over the csv module's field limit
    with pytest.raises(ProdcatError, match=r"huge\.csv line 2: not readable as CSV"):
        read_labels_csv(huge)
    # An unnamed file object is not called "labels CSV labels CSV".
    with pytest.raises(ProdcatError) as refused:
        read_labels_csv(io.BytesIO(b"a.jpg\n"))
    assert str(refused.value).startswith("labels CSV line 1:")


def test_an_uploaded_csv_is_named_in_its_errors(db: Database) -> None:
    from core.catalog.ingest import LabelSource, import_labelled_upload

    archive = Upload("batch.zip", badfiles.make_zip([("a.png", image_bytes("Hats", 230))]))
    with pytest.raises(ProdcatError, match=r"^labels CSV shop-labels\.csv line 3: expected two columns"):
        import_labelled_upload(
            db,
            archive,
            label_source=LabelSource.CSV,
            labels_csv=Upload("shop-labels.csv", b"a.png,Hats\nb.png,Hats\nc.png\n"),
            actor="alice",
        )
    assert _image_count(db) == 0


def test_one_label_source_per_import_and_contradictions_are_refused(db: Database, tmp_path: Path) -> None:
    from core.catalog.ingest import LabelSource, import_labelled_folder, import_labelled_upload

    archive = Upload(
        "dataset.zip", badfiles.make_zip([(f"dataset/{c}/{c}.png", image_bytes(c, 240)) for c in CATEGORY_COLOURS])
    )
    result = import_labelled_upload(db, archive, label_source=LabelSource.FOLDERS, actor="alice")
    assert {i.category for i in result.imported} == set(CATEGORY_COLOURS)
    root = write_image_folder(tmp_path / "photos", per_category=1)
    result = import_labelled_folder(db, root, label_source=LabelSource.CATEGORY, category="Misc", actor="alice")
    assert {i.category for i in result.imported} == {"Misc"}
    with pytest.raises(ProdcatError, match="none was given"):
        import_labelled_folder(db, root, label_source=LabelSource.CSV, actor="alice")
    with pytest.raises(ProdcatError, match="choose the CSV as the label source"):
        import_labelled_folder(db, root, label_source=LabelSource.FOLDERS, labels_csv=tmp_path / "x.csv", actor="a")


# --- what an import refuses up front ----------------------------------------------------------------------------


def test_an_empty_actor_is_refused_before_anything_is_written(db: Database) -> None:
    with pytest.raises(ProdcatError, match="actor is empty"):
        import_uploads(db, [Upload("a.png", image_bytes("Shoes", 250))], category="Shoes", actor="   ")
    assert _image_count(db) == 0
    assert not db.settings.images_dir.exists() or not any(db.settings.images_dir.rglob("*.*"))


def test_files_for_an_archived_category_are_refused_and_nothing_is_stored(db: Database) -> None:
    from core.catalog.labels import add_category, archive_category

    add_category(db, "Old", actor="a")
    archive_category(db, "Old", actor="a")
    uploads = [Upload("a.png", image_bytes("Shoes", 260)), Upload("b.png", image_bytes("Bags", 260))]
    result = import_uploads(db, uploads, category="Old", actor="a")
    assert not result.imported and len(result.refused) == 2
    assert all("category 'Old' is archived" in r.reason for r in result.refused)
    stored = [p for p in db.settings.data_dir.rglob("*") if p.is_file() and "sqlite" not in p.name]
    assert stored == [db.settings.data_dir / "catalogue.json"]  # no orphaned originals or thumbnails


def test_a_symlinked_file_pointing_outside_the_folder_is_refused(db: Database, tmp_path: Path) -> None:
    import core.catalog.ingest as ingest
    from core.catalog.serverfiles import exchange_path

    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.png").write_bytes(image_bytes("Hats", 270))
    photos = db.settings.exchange_dir / "photos"
    photos.mkdir(parents=True)
    (photos / "real.png").write_bytes(image_bytes("Bags", 270))
    (photos / "escape.png").symlink_to(outside / "secret.png")
    (photos / "alias.png").symlink_to(photos / "real.png")  # a link inside the folder is fine
    (photos / "linkdir").symlink_to(outside)  # folders are not followed at all
    result = import_paths(db, [exchange_path(db, "photos", actor="web")], actor="web")  # as the Categories page does
    assert _refusals(result) == {"photos/escape.png": ingest.LINK_OUTSIDE_FOLDER}
    assert "a link to a file outside the folder" in ingest.LINK_OUTSIDE_FOLDER
    assert [i.name for i in result.imported] == ["photos/alias.png"]  # sorted: the link inside comes first
    assert [d.name for d in result.duplicates] == ["photos/real.png"]


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([], "the archive holds no files"),
        (
            [("__MACOSX/._a.png", b"junk"), (".DS_Store", b"\x00\x00\x00\x01Bud1"), ("Thumbs.db", b"x")],
            "the archive holds only hidden or system files (3, such as __MACOSX or .DS_Store), no photos",
        ),
    ],
)
def test_an_empty_zip_or_one_of_only_system_files_is_refused_with_the_reason(
    db: Database, entries: list[tuple[str, bytes]], reason: str
) -> None:
    result = import_uploads(db, [Upload("photos.zip", badfiles.make_zip(entries))], actor="alice")
    assert _refusals(result) == {"photos.zip": reason}
    assert result.summary() == "0 imported, 0 duplicates, 1 refused"


def test_two_imports_of_the_same_files_at_once_store_each_file_once(
    db: Database, small_batches: Callable[[int], None]
) -> None:
    import threading

    small_batches(4)
    uploads = [Upload(f"p{i}.png", image_bytes("Shoes", 400 + i)) for i in range(16)]
    results: list[ImportResult | BaseException | None] = [None, None]
    start = threading.Barrier(2)

    def run(k: int) -> None:
        start.wait()
        try:  # opposite orders: on PostgreSQL each batch can wait for rows the other one is inserting
            results[k] = import_uploads(db, uploads[:: 1 - 2 * k], category="Shoes", actor=f"importer{k}")
        except BaseException as exc:  # the test looks at every outcome
            results[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    done = [r for r in results if isinstance(r, ImportResult)]
    assert len(done) == 2, results
    assert sorted(i.name for r in done for i in r.imported) == sorted(u.name for u in uploads)  # each stored once
    assert all(len(r.imported) + len(r.duplicates) == len(uploads) and not r.refused for r in done)
    assert set(_labels(db).values()) == {"Shoes"} and len(_labels(db)) == len(uploads)
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(LabelEvent)) == len(uploads)
    assert _stored_files(db) == _files_of_rows(db)
    assert db.integrity_ok()


def _zeros_entry(size: int) -> bytes:
    return bytes(size)  # zeros: deflate squeezes them about 1,000:1


def test_a_zip_bomb_entry_is_refused_before_inflating_and_the_good_entries_go_through(db: Database) -> None:
    import time
    import tracemalloc

    bomb = 64 * 1024 * 1024
    good = [("a.png", image_bytes("Shoes", 50)), ("c.png", image_bytes("Hats", 50))]
    archive = badfiles.make_zip([good[0], ("photos/bomb.png", _zeros_entry(bomb)), good[1]])
    assert len(archive) < 200_000
    tracemalloc.start()
    started = time.perf_counter()
    try:
        result = import_uploads(db, [Upload("supplier.zip", archive)], actor="x")
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [i.name for i in result.imported] == ["supplier.zip/a.png", "supplier.zip/c.png"]
    reason = _refusals(result)["supplier.zip/photos/bomb.png"]
    assert f"to {bomb:,}), more than the limit of 100:1" in reason and "expands 1,0" in reason, reason
    assert elapsed < 5  # the old code inflated all 64 MiB (and up to the 4 GiB cap for more such entries)
    assert peak < 16 * 1024 * 1024, f"{peak:,} bytes of Python memory at the peak"
    assert _image_count(db) == 2


def test_an_archive_of_many_small_bombs_is_refused_as_a_whole(db: Database) -> None:
    # Each entry is too small for the per-file rule, but together they expand about 1,000 times the archive.
    entries = [(f"{i}.png", _zeros_entry(1024 * 1024)) for i in range(24)]
    archive = badfiles.make_zip([("good.png", image_bytes("Bags", 51)), *entries])
    result = import_uploads(db, [Upload("many.zip", archive), Upload("loose.png", image_bytes("Bags", 52))], actor="x")
    assert [i.name for i in result.imported] == ["loose.png"]
    reason = _refusals(result)["many.zip"]
    assert f"to {24 * 1024 * 1024 + len(image_bytes('Bags', 51)):,}), more than the limit of 100:1" in reason, reason
    assert "nothing was read" in reason


def _lie_about_size(archive: bytes, name: bytes, declared: int) -> bytes:
    """The zip with entry `name`'s uncompressed size rewritten to `declared` in its local and central headers."""
    data = bytearray(archive)
    # (signature, offset of the uncompressed size, of the name's length, of the name) in each kind of header
    for signature, size_at, length_at, name_at in ((b"PK\x03\x04", 22, 26, 30), (b"PK\x01\x02", 24, 28, 46)):
        at = data.find(signature)
        while at >= 0:
            length = int.from_bytes(data[at + length_at : at + length_at + 2], "little")
            if data[at + name_at : at + name_at + length] == name:
                data[at + size_at : at + size_at + 4] = declared.to_bytes(4, "little")
                break
            at = data.find(signature, at + 4)
    return bytes(data)


def test_an_entry_that_lies_about_its_size_is_not_inflated_past_it(db: Database) -> None:
    real = 32 * 1024 * 1024
    archive = badfiles.make_zip([("liar.png", _zeros_entry(real)), ("ok.png", image_bytes("Shoes", 53))])
    compressed = len(archive)
    archive = _lie_about_size(archive, b"liar.png", 2 * compressed)  # an innocent 2:1, by its headers
    result = import_uploads(db, [Upload("lies.zip", archive)], actor="x")
    assert [i.name for i in result.imported] == ["lies.zip/ok.png"]
    assert "corrupt zip entry" in _refusals(result)["lies.zip/liar.png"]  # stopped at the listed size: bad CRC


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from /proc")
def test_large_pictures_decode_one_at_a_time_and_leave_little_behind(tmp_path: Path) -> None:
    """Peak resident memory while importing a zip of large PNGs, sampled in a fresh process."""
    import os
    import subprocess
    import sys

    side = 3000  # 9 megapixels: 36 MB of pixels each as Pillow holds them
    flat = io.BytesIO()
    PILImage.new("RGB", (side, side), (250, 250, 250)).save(flat, "PNG")
    png = flat.getvalue()
    tail = png.rindex(b"IEND") - 4
    archive = tmp_path / "big.zip"
    # Distinct bytes (a comment chunk each), the same pixels: none is a duplicate of another.
    archive.write_bytes(
        badfiles.make_zip([(f"{i}.png", png[:tail] + badfiles._png_chunk(b"tEXt", b"n\x00%d" % i) + png[tail:])
                           for i in range(6)])
    )  # fmt: skip
    script = f"""
import os, threading, time
from pathlib import Path
from core.db import open_database
from core.catalog.ingest import import_paths
from core.settings import get_settings

def resident():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

db = open_database(get_settings())
before, peak, done = resident(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], resident())
        time.sleep(0.005)
sampler = threading.Thread(target=sample)
sampler.start()
result = import_paths(db, [Path({str(archive)!r})], actor="x")
done.set()
sampler.join()
assert len(result.imported) == 6, result.summary()
print((peak[0] - before) // 2**20)
"""
    env = {
        **os.environ,
        "PRODCAT_DATA_DIR": str(tmp_path / "data"),
        "PRODCAT_AUTH": "none",
        "PRODCAT_MAX_IMAGE_PIXELS": str(side * side + 1),  # each one the largest allowed: one decode at a time
    }
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    grown_mb = int(run.stdout.split()[-1])
    # One picture decoded at a time and shrunk before its hashes (36 MB of pixels; measured 59 MB in all). Before,
    # every thread decoded a full picture, took content hashes over float32 copies of it and kept its freed memory
    # (measured 281-332 MB with two threads).
    assert grown_mb < 120, f"peak memory grew {grown_mb} MB"


def test_a_file_read_from_disk_is_refused_past_the_size_limit_even_when_it_grows_while_read(tmp_path: Path) -> None:
    from core.catalog.ingest.candidates import Refuse, peek, read_file

    photo = tmp_path / "shoe.png"
    photo.write_bytes(image_bytes("Shoes", 1, size=24))
    assert read_file(photo, 10_000) == photo.read_bytes()
    assert peek(photo) == b"\x89PNG"
    with pytest.raises(Refuse, match=f"file is {photo.stat().st_size:,} bytes, larger than the limit of 100 bytes"):
        read_file(photo, 100)
    # A file whose size says 0 but that never ends (what a file still being written can look like): read up to the
    # limit, then refused, not read without bound.
    with pytest.raises(Refuse, match="more than 1,000,000 bytes, larger than the limit"):
        read_file(Path("/dev/zero"), 1_000_000)
    with pytest.raises(Refuse, match="cannot be read"):
        read_file(tmp_path / "gone.png", 10_000)
    assert peek(tmp_path / "gone.png") == b""


# --- worker processes for a large import's small files (core.catalog.ingest.decoding.decode_processes) -----------


def _crash_on_named_file(files: Sequence[tuple[str, bytes, str]]) -> list[ProcessResult]:
    """Runs in a worker process (imported there by name): the process dies on one file, as one killed would."""
    if any(name.endswith("crash_here.png") for name, _, _ in files):
        os._exit(1)
    from core.catalog.ingest.decoding import prepare_in_process

    return prepare_in_process(files)


@pytest.fixture
def process_spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Imports of 8 files or more use worker processes, sent 4 files at a time, once they are up (waited for here);
    records which files went there and which this process prepared itself (the threads, or a file handed back)."""
    import core.catalog.ingest.decoding as decoding
    import core.catalog.ingest.importer as importer

    monkeypatch.setattr(decoding, "PROCESS_MIN_FILES", 8)
    monkeypatch.setattr(importer, "PROCESS_CHUNK_FILES", 4)
    seen: dict[str, list[str]] = {"in_process": [], "here": [], "started": []}
    prepared, prepare = importer.Importer.prepared, importer.Importer.prepare

    def started(files: int | None, settings: Settings) -> decoding.WorkerProcesses | None:
        seen["started"].append(str(files))
        processes = decoding.decode_processes(files, settings)
        assert processes is not None and processes.up.wait(60) and processes.ready()
        return processes

    def spy_prepared(self: importer.Importer, p: importer._Pending) -> Prepared:
        if p.chunk is not None:
            seen["in_process"].append(p.cand.name)
        return prepared(self, p)

    def spy_prepare(self: importer.Importer, name: str, data: bytes, sha: str) -> Prepared:
        seen["here"].append(name)
        return prepare(self, name, data, sha)

    monkeypatch.setattr(importer, "decode_processes", started)
    monkeypatch.setattr(importer.Importer, "prepared", spy_prepared)
    monkeypatch.setattr(importer.Importer, "prepare", spy_prepare)
    return seen


def test_a_large_imports_small_files_are_prepared_in_worker_processes_exactly_as_in_threads(
    db: Database, tmp_path: Path, process_spy: dict[str, list[str]]
) -> None:
    from core.catalog.imaging import content_hashes, difference_hash, inspect_and_decode
    from core.catalog.store import make_thumbnail, original_path, thumbnail_path

    root = write_image_folder(tmp_path / "photos", per_category=4, size=40)
    (root / "Shoes" / "copy.png").write_bytes((root / "Shoes" / "shoes_0.png").read_bytes())
    (root / "Shoes" / "broken.png").write_bytes((root / "Shoes" / "shoes_1.png").read_bytes()[:200])
    result = import_paths(db, [root], labels_from_folders=True, actor="ana")
    assert (len(result.imported), len(result.duplicates)) == (4 * len(CATEGORY_COLOURS), 1)
    assert [r.name for r in result.refused] == ["photos/Shoes/broken.png"]
    assert "truncated or corrupt PNG" in result.refused[0].reason
    # Every new file went to a worker process; none came back to be done here.
    assert len(process_spy["in_process"]) == 4 * len(CATEGORY_COLOURS) + 1 and process_spy["here"] == []
    settings = db.settings
    with db.read() as session:
        rows = session.scalars(select(Image)).all()
        for row in rows:  # what the worker stored and hashed is what this process makes of the same bytes
            data = original_path(settings, row).read_bytes()
            decoded = inspect_and_decode(row.original_name, data, settings, draft_size=settings.thumbnail_size)
            grey = make_thumbnail(decoded.image, settings.thumbnail_size).convert("L")
            hashes = content_hashes(grey)
            assert hashes is not None
            assert (row.sha256, row.width, row.height, row.format) == (
                decoded.sha256, decoded.width, decoded.height, decoded.format
            )  # fmt: skip
            assert (row.phash, row.box_dhash_h, row.box_dhash_v, row.box_phash) == (
                difference_hash(grey), hashes.dhash_h, hashes.dhash_v, hashes.phash
            )  # fmt: skip
            assert row.split == split_for_hash(row.sha256) and thumbnail_path(settings, row).stat().st_size > 0
            assert row.label is not None


def test_a_small_file_of_a_large_picture_is_decoded_within_the_importing_processs_pixel_budget(
    db: Database, tmp_path: Path, process_spy: dict[str, list[str]]
) -> None:
    root = write_image_folder(tmp_path / "photos", per_category=3, size=40)
    big = PILImage.new("RGB", (2500, 2000), (240, 240, 240))  # 5 megapixels of flat grey: a few kilobytes of PNG
    big.paste((20, 60, 200), (900, 700, 1600, 1300))
    big.save(root / "Bags" / "big.png")
    assert (root / "Bags" / "big.png").stat().st_size < 64 * 1024
    result = import_paths(db, [root], labels_from_folders=True, actor="ana")
    assert len(result.imported) == 3 * len(CATEGORY_COLOURS) + 1 and not result.refused
    assert "photos/Bags/big.png" in process_spy["in_process"]  # sent to a worker, which handed it back
    assert process_spy["here"] == ["photos/Bags/big.png"]
    with db.read() as session:
        big_row = session.scalars(select(Image).where(Image.original_name == "photos/Bags/big.png")).one()
        assert (big_row.width, big_row.height) == (2500, 2000)


def test_an_import_whose_worker_process_dies_finishes_in_threads_and_loses_nothing(
    db: Database, tmp_path: Path, process_spy: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.catalog.ingest.importer as importer

    monkeypatch.setattr(importer, "prepare_in_process", _crash_on_named_file)
    monkeypatch.setattr(importer, "READ_AHEAD_FILES", 2)  # files are still being sent out after the worker died
    root = write_image_folder(tmp_path / "photos", per_category=5, size=40)
    (root / "Bags" / "crash_here.png").write_bytes(image_bytes("Hats", 99, size=40))  # among the first files read
    result = import_paths(db, [root], labels_from_folders=True, actor="ana")
    assert len(result.imported) == 5 * len(CATEGORY_COLOURS) + 1 and not result.refused
    assert "photos/Bags/crash_here.png" in process_spy["here"]  # redone here after its worker died
    # and every file after it too: those in flight to the workers when it died, and the rest by the threads
    names = [item.name for item in result.imported]
    assert set(names[names.index("photos/Bags/crash_here.png") :]) <= set(process_spy["here"])
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 5 * len(CATEGORY_COLOURS) + 1
        stored = session.scalars(select(Image.stored_path)).all()
    assert all((db.settings.data_dir / path).stat().st_size > 0 for path in stored)
    assert db.integrity_ok()


def test_an_import_of_large_files_only_starts_no_worker_processes(
    db: Database, tmp_path: Path, process_spy: dict[str, list[str]]
) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos" / "Bags"
    folder.mkdir(parents=True)
    for i in range(10):  # noise compresses badly: each PNG is larger than what goes to a worker process
        PILImage.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(folder / f"photo_{i}.png")
        assert (folder / f"photo_{i}.png").stat().st_size > 64 * 1024
    result = import_paths(db, [tmp_path / "photos"], labels_from_folders=True, actor="ana")
    assert len(result.imported) == 10 and not result.refused
    assert process_spy["started"] == [] and len(process_spy["here"]) == 10  # all in threads, no processes started


def test_worker_processes_never_run_the_programs_main_module(
    db: Database, tmp_path: Path, process_spy: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys
    import types

    # Streamlit installs the page being shown as `__main__` while it runs; multiprocessing runs the main module again
    # in each new process, so each worker of an upload would have run the page.
    ran = tmp_path / "ran"
    ran.mkdir()
    page = tmp_path / "page.py"
    page.write_text(f"import os\nopen(os.path.join({str(ran)!r}, str(os.getpid())), 'w').close()\n")
    main = types.ModuleType("__main__")
    main.__file__ = str(page)
    monkeypatch.setitem(sys.modules, "__main__", main)
    root = write_image_folder(tmp_path / "photos", per_category=4, size=40)
    result = import_paths(db, [root], labels_from_folders=True, actor="ana")
    assert len(result.imported) == 4 * len(CATEGORY_COLOURS) and not result.refused
    assert len(process_spy["in_process"]) == 4 * len(CATEGORY_COLOURS)  # the workers did the work
    assert list(ran.iterdir()) == []  # and none of them ran the page


def _fail_on_named_file(files: Sequence[tuple[str, bytes, str]]) -> list[ProcessResult]:
    """Runs in a worker process: preparing one file raises an unexpected error (a bug), the files beside it in its
    chunk are prepared and stored."""
    from core.catalog.ingest import decoding

    real = decoding.prepare_file

    def failing(settings: Settings, name: str, *args: Any, **kwargs: Any) -> Prepared:
        if name.endswith("fail_here.png"):
            raise RuntimeError(f"a bug while preparing {name}")
        return real(settings, name, *args, **kwargs)

    decoding.prepare_file = failing
    try:
        return decoding.prepare_in_process(files)
    finally:
        decoding.prepare_file = real


def test_an_unexpected_error_in_a_worker_process_fails_the_import_without_files_left_behind(
    db: Database, tmp_path: Path, process_spy: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.catalog.ingest.importer as importer
    from core.catalog.filecheck import check_files

    monkeypatch.setattr(importer, "prepare_in_process", _fail_on_named_file)
    monkeypatch.setattr(importer, "BATCH_ROWS", 4)  # batches before the failing file are committed
    root = write_image_folder(tmp_path / "photos", per_category=4, size=40)
    first, second = sorted(CATEGORY_COLOURS)[:2]
    # Files go out 4 at a time in name order: the first folder's 4 files (a batch of 4 rows, committed), then the
    # second folder's _0, this file, and _1 and _2, which its worker prepares and stores after it.
    (root / second / f"{second.lower()}_0a_fail_here.png").write_bytes(image_bytes(second, 99, size=40))
    with pytest.raises(RuntimeError, match=r"a bug while preparing .*_0a_fail_here\.png"):
        import_paths(db, [root], labels_from_folders=True, actor="ana")
    with db.read() as session:
        names = session.scalars(select(Image.original_name)).all()
    assert sorted(names) == [f"photos/{first}/{first.lower()}_{i}.png" for i in range(4)]
    # What the failing file's chunk and the files after it stored was removed; the committed rows keep their files.
    found = check_files(db, grace_seconds=0)
    assert (found.missing, found.strays, found.leftovers) == ((), (), ())
    assert found.rows == 4
    assert db.integrity_ok()


def test_an_import_does_not_wait_for_its_worker_processes_to_start(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import core.catalog.ingest.decoding as decoding
    import core.catalog.ingest.importer as importer

    monkeypatch.setattr(decoding, "PROCESS_MIN_FILES", 8)
    release = threading.Event()
    start = decoding.WorkerProcesses._start

    def slow_start(self: decoding.WorkerProcesses) -> None:
        release.wait(60)  # as if the fork server were still importing its modules
        start(self)

    monkeypatch.setattr(decoding.WorkerProcesses, "_start", slow_start)
    here: list[str] = []
    prepare = importer.Importer.prepare

    def spy_prepare(self: importer.Importer, name: str, data: bytes, sha: str) -> Prepared:
        here.append(name)
        return prepare(self, name, data, sha)

    monkeypatch.setattr(importer.Importer, "prepare", spy_prepare)

    def progress(done: int, total: int | None, name: str) -> None:
        if done == total:  # every file reported: the workers may come up now
            release.set()

    root = write_image_folder(tmp_path / "photos", per_category=3, size=40)
    result = import_paths(db, [root], labels_from_folders=True, actor="ana", progress=progress)
    assert len(result.imported) == 3 * len(CATEGORY_COLOURS) and not result.refused
    assert sorted(here) == sorted(item.name for item in result.imported)  # all prepared by the threads meanwhile
