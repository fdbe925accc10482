"""Export the labels: a `filename,category[,sku]` CSV that re-imports, and an ImageFolder tree of the originals."""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TextIO

from sqlalchemy import func, select

from core.auth import Action, authorize, record
from core.catalog.store import original_path
from core.db import Database
from core.errors import ProdcatError
from core.schema import Category, Image, Label

CSV_COLUMNS = ("filename", "category", "image_id", "sha256", "split", "sku")
PLAIN_COLUMNS = ("filename", "category")
SKU_COLUMN = "sku"  # the importer's optional SKU column (core.catalog.ingest.labels_csv)
# File systems limit a name to 255 bytes (not characters): 200 leaves room for a `_2` clash suffix.
MAX_COMPONENT_BYTES = 200
# Excel reads a CSV without a byte order mark in the local code page; with one it shows non-ASCII names right.
# The importer (`core.catalog.ingest.read_labels_csv`) reads either.
CSV_ENCODING = "utf-8-sig"
# Names Windows refuses as files or folders whatever the extension; exported trees get copied around.
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(1, 10)} | {f"LPT{i}" for i in range(1, 10)}
_YIELD_PER = 1000
# A spreadsheet runs a cell that starts with one of these as a formula (`=HYPERLINK(...)` in a category name, a file
# named `=2+3.png`): OWASP's "CSV injection". Such cells are written with a leading single quote.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
_QUOTE = "'"


class ExportError(ProdcatError):
    """The export cannot be written where it was asked to go."""


@dataclass
class ImageFolderExport:
    """What `export_imagefolder` wrote: file count per category folder and anything it could not copy."""

    directory: Path
    written: int = 0
    per_category: dict[str, int] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)  # category name -> folder name used
    missing: list[str] = field(default_factory=list)  # "image 12 (name.png): reason" (not found or not written)
    unlabelled_skipped: int = 0


def safe_component(name: str, *, fallback: str = "_") -> str:
    """One path component from a user's text: no separators, no '..', no leading dot, no control characters.

    `safe_component("../../etc/passwd")` is `"_.._etc_passwd"`: a harmless name inside the export folder.
    A long name is cut to MAX_COMPONENT_BYTES of UTF-8 (file systems count bytes: 150 CJK characters are 450),
    keeping its extension and never splitting a character.
    """
    text = unicodedata.normalize("NFC", str(name))
    text = "".join("_" if ch in "/\\:" or unicodedata.category(ch)[0] == "C" else ch for ch in text)
    # Leading dots would hide the file or make '.'/'..'; trailing dots and spaces vanish on Windows.
    text = text.strip().lstrip(".").rstrip(" .")
    if len(text.encode("utf-8")) > MAX_COMPONENT_BYTES:
        stem, dot, suffix = text.rpartition(".")
        if dot and 0 < len(suffix) <= 10:
            room = MAX_COMPONENT_BYTES - len(suffix.encode("utf-8")) - 1
            text = _utf8_prefix(stem, room).rstrip(" .") + "." + suffix
        else:
            text = _utf8_prefix(text, MAX_COMPONENT_BYTES).rstrip(" .")
    if not text:
        return fallback
    if text.split(".")[0].upper() in _WINDOWS_RESERVED:
        text = "_" + text
    return text


def _utf8_prefix(text: str, max_bytes: int) -> str:
    """The longest start of `text` that is at most `max_bytes` in UTF-8, never ending inside a character."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def _base_name(original_name: str) -> str:
    """The file name part of what the user uploaded ('Shoes/red.png' or 'C:\\x\\red.png' -> 'red.png')."""
    return PureWindowsPath(PurePosixPath(original_name).name).name


class _UniqueNames:
    """Hands out names unique within one folder, case-insensitively (macOS and Windows fold case)."""

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def claim(self, name: str) -> str:
        candidate, n = name, 1
        stem, suffix = os.path.splitext(name)
        while candidate.casefold() in self._taken:
            n += 1
            candidate = f"{stem}_{n}{suffix}"
        self._taken.add(candidate.casefold())
        return candidate


def spreadsheet_safe(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: text starting like a formula gets a leading single quote (OWASP).

    Text already starting with a quote gets one more, so `spreadsheet_text` gives every name back exactly;
    numbers pass unchanged.
    """
    if isinstance(value, str) and value.startswith((*FORMULA_TRIGGERS, _QUOTE)):
        return _QUOTE + value
    return value


def spreadsheet_text(cell: str) -> str:
    """A cell as `spreadsheet_safe` wrote it, read back: one leading quote before a formula character (or before
    another quote) is dropped; any other text is left as it is."""
    if len(cell) >= 2 and cell[0] == _QUOTE and cell[1] in (*FORMULA_TRIGGERS, _QUOTE):
        return cell[1:]
    return cell


def _labelled_rows(db: Database) -> Iterator[tuple[Image, str]]:
    with db.read() as session:
        query = (
            select(Image, Category.name)
            .join(Label, Label.image_id == Image.id)
            .join(Category, Category.id == Label.category_id)
            .order_by(Category.name, Image.id)
            .execution_options(yield_per=_YIELD_PER)
        )
        for image, category in session.execute(query):  # noqa: UP028 (rows unpack to plain tuples)
            yield image, category


def _export_columns(db: Database, *, with_ids: bool) -> tuple[str, ...]:
    """Every column with ids; the plain export is `filename,category`, plus `sku` when a labelled image has one (so
    SKUs survive the trip into another catalogue, and a catalogue without SKUs gets no empty column)."""
    if with_ids:
        return CSV_COLUMNS
    with db.read() as session:
        any_sku = session.scalar(
            select(Image.id).join(Label, Label.image_id == Image.id).where(Image.sku.is_not(None)).limit(1)
        )
    return (*PLAIN_COLUMNS, SKU_COLUMN) if any_sku is not None else PLAIN_COLUMNS


def _write_labels_csv(db: Database, handle: TextIO, *, with_ids: bool) -> int:
    """The labels CSV (header row first) into an open text handle; returns the number of data rows."""
    columns = _export_columns(db, with_ids=with_ids)
    writer = csv.writer(handle)
    writer.writerow(columns)
    count = 0
    for image, category in _labelled_rows(db):
        cells = {
            "filename": image.original_name,
            "category": category,
            "image_id": image.id,
            "sha256": image.sha256,
            "split": image.split,
            "sku": image.sku or "",
        }
        writer.writerow([spreadsheet_safe(cells[column]) for column in columns])
        count += 1
    return count


def _audit(db: Database, actor: str, subject: str, **detail: object) -> None:
    with db.write() as session:
        record(session, actor, Action.EXPORT, subject, **detail)


def labels_csv_bytes(db: Database, *, with_ids: bool = False, actor: str) -> bytes:
    """The same CSV as `export_labels_csv`, as UTF-8 bytes with a byte order mark (for a download button)."""
    authorize(db, actor, Action.EXPORT)
    buffer = io.StringIO(newline="")
    count = _write_labels_csv(db, buffer, with_ids=with_ids)
    _audit(db, actor, "labels CSV download", rows=count)
    return buffer.getvalue().encode(CSV_ENCODING)


def export_labels_csv(db: Database, path: Path | str, *, with_ids: bool = False, actor: str) -> int:
    """Write every labelled image as a `filename,category` CSV (header row first) that `import --labels-csv`
    reads back; `filename` is the image's original name as imported.

    with_ids adds `image_id,sha256,split,sku` columns for spreadsheets and scripts (the importer goes by the header:
    it matches rows by sha256 and attaches the SKUs, so such a file re-imports too); without it, a `sku` column
    follows when any labelled image has a SKU. The file is written to a temporary name and moved into
    place, so a failed export never leaves half a CSV. UTF-8 with a byte order mark, so Excel shows non-ASCII
    names right. Returns the number of rows. Only an actor allowed to export may (PermissionDenied otherwise); the
    export is recorded in the audit trail.
    """
    authorize(db, actor, Action.EXPORT)
    path = Path(path).expanduser()
    if path.is_dir():
        raise ExportError(f"{path} is a directory: give a file name such as labels.csv")
    if not path.parent.is_dir():
        raise ExportError(f"folder {path.parent} does not exist: create it first")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding=CSV_ENCODING) as handle:
            count = _write_labels_csv(db, handle, with_ids=with_ids)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _audit(db, actor, f"labels CSV {path}", rows=count)
    return count


def _copy_new(source: Path, target: Path) -> None:
    """Copy `source` to a new file `target` (never overwriting one); a failed copy leaves no partial file."""
    target.parent.mkdir(exist_ok=True)
    with target.open("xb") as dst:  # "x": never overwrite anything
        try:
            with source.open("rb") as src:
                shutil.copyfileobj(src, dst)
        except BaseException:
            dst.close()
            target.unlink(missing_ok=True)
            raise


def export_imagefolder(db: Database, directory: Path | str, *, actor: str) -> ImageFolderExport:
    """Copy the original of every labelled image to `directory/<category>/<file name>` (ImageFolder layout).

    Category and file names come from users, so each becomes one safe path component; clashes get a
    `_2`, `_3`... suffix. `directory` must be new or empty, and nothing is ever written outside it.
    Images whose stored original is missing, or whose copy the file system refuses, are listed in `missing`
    and the rest are still exported. Only an actor allowed to export may (PermissionDenied otherwise); the export is
    recorded in the audit trail.
    """
    authorize(db, actor, Action.EXPORT)
    root = Path(directory).expanduser()
    if root.exists() and not root.is_dir():
        raise ExportError(f"{root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()):
        raise ExportError(f"{root} is not empty: export into a new or empty folder so nothing is overwritten")
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    result = ImageFolderExport(directory=root)
    folder_names = _UniqueNames()
    files_in: dict[str, _UniqueNames] = {}

    for image, category in _labelled_rows(db):
        folder = result.folders.get(category)
        if folder is None:
            folder = folder_names.claim(safe_component(category, fallback="category"))
            result.folders[category] = folder
            files_in[folder] = _UniqueNames()
        name = safe_component(_base_name(image.original_name), fallback=f"image_{image.id}")
        if not os.path.splitext(name)[1] and image.format:
            name = f"{name}.{image.format.lower()}"  # loaders such as torchvision's ImageFolder go by extension
        target = root / folder / files_in[folder].claim(name)
        # Belt and braces: the names are already single safe components, but never write outside root.
        if not target.resolve().is_relative_to(root):
            raise ExportError(f"refusing to write {target}: it is outside {root}")
        try:
            source = original_path(db.settings, image)
        except ValueError as exc:  # a tampered row pointing outside the data directory
            result.missing.append(f"image {image.id} ({image.original_name}): {exc}")
            continue
        if not source.is_file():
            result.missing.append(f"image {image.id} ({image.original_name}): stored original {source} is missing")
            continue
        try:
            _copy_new(source, target)
        except OSError as exc:  # one file the file system refuses (name, permissions, I/O) is not the whole export
            where = target.relative_to(root)
            result.missing.append(
                f"image {image.id} ({image.original_name}): could not write {where}: {exc.strerror or exc}"
            )
            continue
        result.written += 1
        result.per_category[category] = result.per_category.get(category, 0) + 1

    with db.read() as session:
        total = session.scalar(select(func.count()).select_from(Image)) or 0
        labelled = session.scalar(select(func.count()).select_from(Label)) or 0
    result.unlabelled_skipped = int(total) - int(labelled)
    _audit(db, actor, f"image folder {root}", written=result.written, missing=len(result.missing))
    return result
