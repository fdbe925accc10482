"""Exports: the labels CSV re-imports, the ImageFolder tree round-trips, and user names never escape the folder."""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
from pathlib import Path

import pytest
from sqlalchemy import select, update

from core.catalog import export, labels
from core.catalog.export import ExportError, export_imagefolder, export_labels_csv, labels_csv_bytes, safe_component
from core.catalog.ingest import import_paths, read_labels_csv
from core.catalog.skus import set_sku
from core.db import Database, open_database
from core.schema import Category, Image, Label
from core.settings import Settings
from tests.imagegen import write_image_folder


def tree_contents(root: Path) -> set[tuple[str, str]]:
    """(category folder, sha256 of bytes) for every file of an ImageFolder tree."""
    return {(p.parent.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in root.rglob("*") if p.is_file()}


def skus_by_sha(db: Database) -> dict[str, str | None]:
    with db.read() as session:
        return {sha: sku for sha, sku in session.execute(select(Image.sha256, Image.sku))}


def labelled_by_sha(db: Database) -> dict[str, str]:
    """sha256 -> category name of every labelled image."""
    with db.read() as session:
        rows = session.execute(
            select(Image.sha256, Category.name)
            .join(Label, Label.image_id == Image.id)
            .join(Category, Category.id == Label.category_id)
        ).all()
    return {sha: name for sha, name in rows}


@pytest.fixture
def source_tree(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "photos", per_category=3, size=24)


@pytest.fixture
def imported(db: Database, source_tree: Path) -> Database:
    result = import_paths(db, [source_tree], labels_from_folders=True, actor="alice")
    assert len(result.imported) == 9 and not result.refused
    return db


def test_imagefolder_round_trips_what_was_imported_from_folders(imported: Database, source_tree: Path, tmp_path: Path):
    out = tmp_path / "export"
    result = export_imagefolder(imported, out, actor="admin")
    assert result.written == 9 and result.per_category == {"Bags": 3, "Hats": 3, "Shoes": 3}
    assert tree_contents(out) == tree_contents(source_tree)
    assert all(p.suffix == ".png" for p in out.rglob("*.png")) and len(list(out.rglob("*.png"))) == 9


def test_labels_csv_reimports_into_a_fresh_catalogue(imported: Database, source_tree: Path, tmp_path: Path) -> None:
    labels.set_label(imported, 1, "Hats", actor="bob")  # a correction must survive the trip
    csv_path = tmp_path / "labels.csv"
    assert export_labels_csv(imported, csv_path, actor="admin") == 9
    rows = list(csv.reader(csv_path.open(encoding="utf-8-sig")))
    assert rows[0] == ["filename", "category"] and all(len(r) == 2 for r in rows)

    before = labelled_by_sha(imported)
    other = open_database(Settings(data_dir=tmp_path / "other-data"))
    result = import_paths(other, [source_tree], labels_csv=csv_path, actor="carol")
    assert len(result.imported) == 9 and not result.refused
    after = labelled_by_sha(other)
    assert after == before and len(after) == 9


def test_labels_csv_with_ids(imported: Database, tmp_path: Path) -> None:
    path = tmp_path / "ids.csv"
    export_labels_csv(imported, path, with_ids=True, actor="admin")
    rows = list(csv.DictReader(path.open(encoding="utf-8-sig")))
    with imported.read() as session:
        shas = {i: s for i, s in session.execute(select(Image.id, Image.sha256))}
    assert len(rows) == 9 and all(shas[int(r["image_id"])] == r["sha256"] for r in rows)
    assert {r["split"] for r in rows} <= {"train", "val", "test"}


def test_labels_csv_with_ids_reimports_into_a_fresh_catalogue(
    imported: Database, source_tree: Path, tmp_path: Path
) -> None:
    labels.set_label(imported, 2, "Shoes", actor="bob")
    path = tmp_path / "ids.csv"
    assert export_labels_csv(imported, path, with_ids=True, actor="admin") == 9
    other = open_database(Settings(data_dir=tmp_path / "other-data"))
    result = import_paths(other, [source_tree], labels_csv=path, actor="carol")
    assert len(result.imported) == 9 and not result.refused
    assert labelled_by_sha(other) == labelled_by_sha(imported)


@pytest.mark.parametrize("with_ids", [False, True])
def test_skus_travel_with_the_labels_csv_into_a_fresh_catalogue(
    imported: Database, source_tree: Path, tmp_path: Path, with_ids: bool
) -> None:
    set_sku(imported, [1, 2], "AB-100", actor="admin")
    set_sku(imported, [3], "CD-7", actor="admin")
    path = tmp_path / "labels.csv"
    assert export_labels_csv(imported, path, with_ids=with_ids, actor="admin") == 9
    header = next(csv.reader(path.open(encoding="utf-8-sig")))
    assert header == (list(export.CSV_COLUMNS) if with_ids else ["filename", "category", "sku"])

    other = open_database(Settings(data_dir=tmp_path / "other-data"))
    result = import_paths(other, [source_tree], labels_csv=path, actor="carol")
    assert len(result.imported) == 9 and not result.refused and not result.notes
    assert skus_by_sha(other) == skus_by_sha(imported)
    assert sorted(v for v in skus_by_sha(other).values() if v) == ["AB-100", "AB-100", "CD-7"]
    assert labelled_by_sha(other) == labelled_by_sha(imported)


def test_a_catalogue_without_skus_exports_no_sku_column(imported: Database) -> None:
    assert labels_csv_bytes(imported, actor="admin").decode("utf-8-sig").splitlines()[0] == "filename,category"


def test_labels_csv_bytes_is_the_exported_file(imported: Database, tmp_path: Path) -> None:
    labels.rename_category(imported, "Hats", 'Hüte, "warm"', actor="admin")  # non-ASCII, comma and quotes
    for with_ids in (False, True):
        path = tmp_path / f"labels-{with_ids}.csv"
        export_labels_csv(imported, path, with_ids=with_ids, actor="admin")
        data = labels_csv_bytes(imported, with_ids=with_ids, actor="admin")
        assert data == path.read_bytes()
        # A byte order mark, so Excel reads the file as UTF-8 instead of mangling 'Hüte'.
        assert data.startswith(codecs.BOM_UTF8) and "Hüte" in data.decode("utf-8-sig")
        assert read_labels_csv(io.BytesIO(data)) == read_labels_csv(path)
    assert sorted(set(read_labels_csv(io.BytesIO(labels_csv_bytes(imported, actor="admin"))).values())) == [
        "Bags",
        'Hüte, "warm"',
        "Shoes",
    ]


def test_unsafe_names_stay_inside_the_export_folder(imported: Database, tmp_path: Path) -> None:
    # Names as a careless or hostile user might have typed them, written straight into the rows.
    hostile_names = ["../../escape.png", "same.png", "SAME.png", ".bashrc", "", "a\\..\\b.png", "x" * 400 + ".png"]
    with imported.write() as session:
        ids = session.scalars(select(Image.id).order_by(Image.id)).all()
        for image_id, name in zip(ids, hostile_names, strict=False):
            session.execute(update(Image).where(Image.id == image_id).values(original_name=name))
    labels.rename_category(imported, "Shoes", "../up", actor="admin")
    labels.rename_category(imported, "Bags", "a/b", actor="admin")
    labels.rename_category(imported, "Hats", "a_b", actor="admin")

    out = tmp_path / "deep" / "export"
    result = export_imagefolder(imported, out, actor="admin")
    files = [p for p in out.rglob("*") if p.is_file()]
    assert result.written == 9 and len(files) == 9
    assert all(p.resolve().is_relative_to(out.resolve()) for p in files)
    assert not any(part.startswith(".") for p in files for part in p.relative_to(out).parts)
    assert sorted(p.name for p in out.iterdir()) == ["_up", "a_b", "a_b_2"]
    # Same names in one folder (also differing only in case) got a suffix instead of overwriting.
    assert len({(p.parent.name, p.name.casefold()) for p in files}) == 9
    assert result.folders == {"../up": "_up", "a/b": "a_b", "a_b": "a_b_2"}
    # Nothing appeared next to the export folder.
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["export"]


def test_refuses_a_non_empty_folder_and_reports_missing_originals(imported: Database, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_imagefolder(imported, busy, actor="admin")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    with imported.read() as session:
        victim = session.scalars(select(Image).order_by(Image.id)).first()
        assert victim is not None
        victim_id, victim_path = victim.id, imported.settings.data_dir / victim.stored_path
    victim_path.unlink()
    result = export_imagefolder(imported, tmp_path / "partial", actor="admin")
    assert result.written == 8 and len(result.missing) == 1 and f"image {victim_id}" in result.missing[0]


def test_safe_component() -> None:
    assert safe_component("..") == "_"
    assert safe_component("../../etc/passwd") == "_.._etc_passwd"
    assert safe_component(".hidden") == "hidden"
    assert safe_component("CON") == "_CON"
    assert safe_component("Shoes & Bags") == "Shoes & Bags"
    long = safe_component("y" * 500 + ".jpeg")
    assert long.endswith(".jpeg") and len(long.encode()) <= export.MAX_COMPONENT_BYTES


def test_safe_component_limits_utf8_bytes_and_never_splits_a_character() -> None:
    limit = export.MAX_COMPONENT_BYTES
    shoes = safe_component("靴" * 120)  # 120 characters, 360 bytes: more than a file system allows
    assert len(shoes.encode()) <= limit and shoes == "靴" * (limit // 3)
    photo = safe_component("商品写真" * 40 + ".png")
    assert photo.endswith(".png") and len(photo.encode()) <= limit and ("商品写真" * 40).startswith(photo[:-4])
    accents = safe_component("é" * 300)  # two bytes each
    assert accents == "é" * (limit // 2)
    odd = safe_component("a" + "€" * 100)  # 1 + 300 bytes: the cut falls inside a three-byte character
    assert odd == "a" + "€" * ((limit - 1) // 3)


def _give_long_cjk_names(db: Database) -> int:
    """Rename Shoes to 120 CJK characters (360 bytes) and give one Shoes image a 480-byte name; returns its id."""
    labels.rename_category(db, "Shoes", "靴" * 120, actor="admin")
    with db.write() as session:
        image_id = session.scalars(
            select(Label.image_id).join(Category, Category.id == Label.category_id).where(Category.name == "靴" * 120)
        ).first()
        assert image_id is not None
        session.execute(update(Image).where(Image.id == image_id).values(original_name="商品写真" * 40 + ".png"))
    return image_id


def test_long_non_ascii_names_export_completely(imported: Database, source_tree: Path, tmp_path: Path) -> None:
    _give_long_cjk_names(imported)
    out = tmp_path / "export"
    result = export_imagefolder(imported, out, actor="admin")
    assert result.written == 9 and result.missing == []
    assert result.per_category == {"Bags": 3, "Hats": 3, "靴" * 120: 3}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert all(len(part.encode()) <= 255 for p in files for part in p.relative_to(out).parts)
    assert any(p.name.startswith("商品写真") and p.suffix == ".png" for p in files)  # extension kept
    # Same bytes as imported, only the long category's folder name is shortened.
    assert {sha for _, sha in tree_contents(out)} == {sha for _, sha in tree_contents(source_tree)}


def test_a_file_the_file_system_refuses_is_reported_and_the_rest_exported(
    imported: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_id = _give_long_cjk_names(imported)
    # Let one name through longer than the file system takes (480 bytes): the OS refuses that one file.
    monkeypatch.setattr(export, "MAX_COMPONENT_BYTES", 1000)
    labels.rename_category(imported, "靴" * 120, "Shoes", actor="admin")
    out = tmp_path / "export"
    result = export_imagefolder(imported, out, actor="admin")
    assert result.written == 8 and len(result.missing) == 1
    assert f"image {image_id} (商品写真" in result.missing[0] and "too long" in result.missing[0]
    assert len([p for p in out.rglob("*") if p.is_file()]) == 8  # no partial file, nothing else lost


def test_labels_csv_has_a_byte_order_mark_and_reimports(imported: Database, tmp_path: Path) -> None:
    labels.rename_category(imported, "Bags", "Sacs à main", actor="admin")
    path = tmp_path / "labels.csv"
    export_labels_csv(imported, path, actor="admin")
    raw = path.read_bytes()
    assert raw.startswith(codecs.BOM_UTF8) and raw.count(codecs.BOM_UTF8) == 1
    assert raw.decode("utf-8-sig").splitlines()[0] == "filename,category"
    # The importer skips the mark: the header is recognised and the names come back intact.
    assert sorted(set(read_labels_csv(path).values())) == ["Hats", "Sacs à main", "Shoes"]


FORMULAS = ['=HYPERLINK("http://evil.example","open")', "+1", "-2+3", "@SUM(A1)", "'=quoted already"]


def test_labels_csv_cells_never_start_a_spreadsheet_formula_and_still_reimport(db: Database, tmp_path: Path) -> None:
    from core.catalog.ingest import Upload, import_uploads
    from tests.imagegen import image_bytes

    uploads = [Upload("=2+3.png", image_bytes("Shoes", 1)), Upload("-cmd.png", image_bytes("Bags", 2))]
    uploads += [Upload(f"{i}.png", image_bytes("Hats", i + 3)) for i in range(len(FORMULAS))]
    result = import_uploads(db, uploads[:2], category="Shoes", actor="alice")
    for upload, category in zip(uploads[2:], FORMULAS, strict=True):
        result.imported += import_uploads(db, [upload], category=category, actor="alice").imported
    assert len(result.imported) == 2 + len(FORMULAS)
    path = tmp_path / "labels.csv"
    export_labels_csv(db, path, with_ids=True, actor="admin")
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))))[1:]
    cells = [cell for row in rows for cell in row[:2]]
    assert not [c for c in cells if c.startswith(export.FORMULA_TRIGGERS)]
    assert {"'=2+3.png", "'-cmd.png", "'" + FORMULAS[0], "''=quoted already"} <= set(cells)
    assert path.read_bytes() == labels_csv_bytes(db, with_ids=True, actor="admin")  # the download is the same file
    # Read back, the quotes are gone: every name and category is what it was.
    read = read_labels_csv(path)
    assert read["=2+3.png"] == "Shoes" and read["-cmd.png"] == "Shoes"
    assert sorted(read.by_sha256.values()) == sorted(["Shoes", "Shoes", *FORMULAS])


def test_spreadsheet_safe_round_trips_any_text() -> None:
    for text in ["=1", "+", "-", "@", "\tx", "\rx", "'", "''=", "'plain", "plain", "", "a=b"]:
        assert export.spreadsheet_text(export.spreadsheet_safe(text)) == text  # type: ignore[arg-type]
    assert export.spreadsheet_safe(-5) == -5  # numbers are not text
    assert export.spreadsheet_text("'hello") == "'hello"  # a quote someone typed before a word is theirs
