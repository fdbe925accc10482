"""The labels CSV: `filename,category` rows (or an `export labels --with-ids` file, matched by content hash), with an
optional `sku` column, read into a mapping the importer looks files up in, with malformed rows refused by file and
line (a bad SKU refuses only that row's SKU)."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from core.catalog.export import spreadsheet_text
from core.catalog.ingest.candidates import norm_key
from core.catalog.skus import SkuRefused, clean_sku
from core.errors import ProdcatError

_CSV_FILENAME_HEADERS = {"filename", "file", "file_name", "filepath", "path", "image", "name", "image_path"}
_CSV_CATEGORY_HEADERS = {"category", "label", "class", "category_name", "class_name"}
_CSV_SHA256_HEADER = "sha256"  # the content-hash column of `export labels --with-ids`
_CSV_SKU_HEADERS = ("sku", "product_sku", "item_sku")  # the product's SKU, attached to the image (optional)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class _Columns:
    filename: int
    category: int
    sha256: int | None = None
    sku: int | None = None


def _header_columns(cells: list[str]) -> _Columns | None:
    """The file name, category (and sha256) columns when a row is a header naming both, else None.

    The usual names win (`filename`, `category`), then the first of the accepted synonyms, so an exported file with
    extra columns (`export labels --with-ids`: image_id, sha256, split) reads back by its header.
    """
    lowered = [c.lower() for c in cells]

    def pick(names: set[str], usual: str) -> int | None:
        if usual in lowered:
            return lowered.index(usual)
        return next((i for i, c in enumerate(lowered) if c in names), None)

    filename_col = pick(_CSV_FILENAME_HEADERS, "filename")
    category_col = pick(_CSV_CATEGORY_HEADERS, "category")
    if filename_col is None or category_col is None or filename_col == category_col:
        return None
    sha_col = lowered.index(_CSV_SHA256_HEADER) if _CSV_SHA256_HEADER in lowered else None
    sku_col = next((lowered.index(name) for name in _CSV_SKU_HEADERS if name in lowered), None)
    return _Columns(filename_col, category_col, sha_col, sku_col)


class LabelsCSV(dict[str, str]):
    """A labels CSV as read: file name -> category for every name listed with one category, plus what a plain
    mapping cannot hold (the importer also accepts a plain dict).

    `by_sha256`: content hash -> category, from the sha256 column of `export labels --with-ids`; tried first, so two
    images that share a file name each get their own label back. `ambiguous`: names listed with different
    categories (in order of appearance); files of such a name import unlabelled and the import says so.
    `ambiguous_sha256`: the same for hashes.

    SKUs (a `sku` column) are kept the same way beside the categories: `skus` by name, `skus_by_sha256` by content hash,
    names and hashes listed with different SKUs in `ambiguous_skus` and `ambiguous_skus_sha256`. `sku_refusals` says,
    by line, which rows' SKUs were refused (too long, control characters); those rows' categories still count.
    """

    def __init__(self, source: str = "") -> None:
        super().__init__()
        self.source = source
        self.by_sha256: dict[str, str] = {}
        self.ambiguous: dict[str, list[str]] = {}
        self.ambiguous_sha256: dict[str, list[str]] = {}
        self.skus: dict[str, str] = {}
        self.skus_by_sha256: dict[str, str] = {}
        self.ambiguous_skus: dict[str, list[str]] = {}
        self.ambiguous_skus_sha256: dict[str, list[str]] = {}
        self.sku_refusals: list[str] = []


def _settle(listed: dict[str, list[str]], single: dict[str, str], ambiguous: dict[str, list[str]]) -> None:
    for key, categories in listed.items():
        if len(categories) == 1:
            single[key] = categories[0]
        else:
            ambiguous[key] = categories


def _list(listed: dict[str, list[str]], key: str, value: str) -> None:
    values = listed.setdefault(key, [])
    if value not in values:
        values.append(value)


@dataclass
class _Rows:
    """What the rows read so far list: categories and SKUs by file name and by content hash, refused SKUs."""

    where: str
    by_name: dict[str, list[str]] = field(default_factory=dict)
    by_sha: dict[str, list[str]] = field(default_factory=dict)
    skus_by_name: dict[str, list[str]] = field(default_factory=dict)
    skus_by_sha: dict[str, list[str]] = field(default_factory=dict)
    sku_refusals: list[str] = field(default_factory=list)

    def add(self, line: int, filename: str, category: str, sha: str, sku_cell: str) -> None:
        # A sha256 cell that is no digest (a spreadsheet turned it into a number, someone typed a note) is not
        # trusted: that row is matched by its name alone.
        sha = sha if _SHA256_HEX.fullmatch(sha) else ""
        _list(self.by_name, norm_key(filename), category)
        if sha:
            _list(self.by_sha, sha, category)
        try:
            sku = clean_sku(sku_cell)
        except SkuRefused as exc:  # that row's SKU only: its category and the other rows still count
            self.sku_refusals.append(f"{self.where} line {line}: SKU not attached to {filename!r}: {exc}")
            return
        if sku is not None:
            _list(self.skus_by_name, norm_key(filename), sku)
            if sha:
                _list(self.skus_by_sha, sha, sku)

    def settled(self, source: str) -> LabelsCSV:
        labels = LabelsCSV(source)
        _settle(self.by_name, labels, labels.ambiguous)
        _settle(self.by_sha, labels.by_sha256, labels.ambiguous_sha256)
        _settle(self.skus_by_name, labels.skus, labels.ambiguous_skus)
        _settle(self.skus_by_sha, labels.skus_by_sha256, labels.ambiguous_skus_sha256)
        labels.sku_refusals = self.sku_refusals
        return labels


def read_labels_csv(path_or_file: Path | BinaryIO, *, name: str | None = None) -> LabelsCSV:
    """Parse a labels CSV into file name -> category; refuses malformed rows clearly (by file and line number).

    Without a header every row is exactly `filename,category`. With a header row naming a file name and a category
    column (`filename,category`, `file,label`...), those two columns are read and other columns are ignored, except
    `sha256` (`export labels --with-ids`), which matches rows to files by content, and `sku` (the product's SKU,
    attached to the image; a SKU `core.catalog.skus.clean_sku` refuses is left out and named by line in `sku_refusals`).
    A name listed twice with one category is fine; with different categories it is ambiguous (see `LabelsCSV`), not an
    error.
    `name` names the file in messages (an upload's name); a path or a file object with a name names itself.
    """
    if isinstance(path_or_file, str | Path):
        name = name or str(path_or_file)
        try:
            raw: bytes | str = Path(path_or_file).read_bytes()
        except OSError as exc:
            raise ProdcatError(f"labels CSV {name}: cannot be read ({exc.strerror or exc})") from exc
    else:
        name = name or getattr(path_or_file, "name", None)
        raw = path_or_file.read()
    where = f"labels CSV {name}" if name else "labels CSV"
    try:
        text = raw.decode("utf-8-sig") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise ProdcatError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    rows = _Rows(where)
    header: list[str] | None = None
    columns = _Columns(0, 1)
    first = True
    # newline="" leaves line endings to the csv module: \r\n, \n and a lone \r (old Mac, some exports) all end a
    # row, and a quoted field may hold a line break.
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            line = reader.line_num  # the physical line the row ends on (a quoted field can span lines)
            # Cells `export labels` quoted against spreadsheet formulas (`'=2+3.png`) read back as the names they were.
            cells = [spreadsheet_text(c.strip()) for c in row]
            while cells and not cells[-1]:
                cells.pop()
            if not cells:
                continue
            if first:
                first = False
                found = _header_columns(cells)
                if found is not None:
                    header, columns = cells, found
                    continue
            if header is None and len(cells) != 2:
                raise ProdcatError(
                    f"{where} line {line}: expected two columns 'filename,category', got {len(cells)}: {row!r}"
                )
            if header is not None and len(cells) > len(header):
                raise ProdcatError(
                    f"{where} line {line}: {len(cells)} columns but the header has {len(header)} "
                    f"({','.join(header)}): {row!r}"
                )
            filename, category = _cell(cells, columns.filename), _cell(cells, columns.category)
            if not filename or not category:
                raise ProdcatError(f"{where} line {line}: empty file name or category: {row!r}")
            rows.add(line, filename, category, _cell(cells, columns.sha256).lower(), _cell(cells, columns.sku))
    except csv.Error as exc:
        raise ProdcatError(f"{where} line {reader.line_num}: not readable as CSV ({exc})") from exc
    return rows.settled(str(name or ""))


def _cell(cells: list[str], column: int | None) -> str:
    return cells[column] if column is not None and column < len(cells) else ""
