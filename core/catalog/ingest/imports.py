"""The public import functions: uploads, files and folder trees from disk, and either with one label source."""

from __future__ import annotations

import functools
import io
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from core.auth import Action, authorize
from core.catalog.ingest.candidates import (
    Candidate,
    clean_parts,
    is_plain_name,
    peek,
    read_file,
    upload_bytes,
    walk_folder,
)
from core.catalog.ingest.importer import Importer
from core.catalog.ingest.labels_csv import read_labels_csv
from core.catalog.ingest.results import ImportResult, ProgressCallback, RefusedItem, Upload
from core.catalog.ingest.zips import ZipSource, looks_like_zip
from core.catalog.labels import clean_category_name
from core.db import Database
from core.errors import ArchiveRefused, CategoryError, ProdcatError


def _holding(data: bytes) -> Callable[[], bytes]:
    """A reader of bytes already in memory, bound to these ones."""
    return lambda: data


def import_uploads(
    db: Database,
    uploads: Iterable[Upload],
    *,
    category: str | None = None,
    labels: dict[str, str] | None = None,
    actor: str,
    source: str = "upload",
    progress: ProgressCallback | None = None,
    labels_from_folders: bool = False,
) -> ImportResult:
    """Import in-memory files. Zip uploads (detected by content) are expanded safely.

    `category` labels every image; `labels` maps file name -> category (CSV; a `LabelsCSV` from `read_labels_csv`
    also matches by content hash). Unknown categories are created; archived ones are refused per file.
    `labels_from_folders` (an addition to the contract): a zipped ImageFolder tree labels its images by their
    first folder (a single wrapping folder, as "zip the dataset folder" makes, is skipped).
    Precedence when several apply: `labels`, then the folder, then `category`.
    Only an actor allowed to upload may (PermissionDenied, before anything is read).
    """
    authorize(db, actor, Action.UPLOAD)
    importer = Importer(
        db,
        actor=actor,
        category=category,
        labels=labels,
        labels_from_folders=labels_from_folders,
        progress=progress,
    )
    items: list[Candidate | RefusedItem | ZipSource] = []
    for upload in uploads:
        name = str(getattr(upload, "name", "") or "upload")
        data = upload_bytes(upload)
        if looks_like_zip(data):
            try:
                items.append(ZipSource(name, functools.partial(io.BytesIO, data), caps=importer.caps, strip_top=True))
            except ArchiveRefused as exc:
                items.append(RefusedItem(name, str(exc)))
            except (zipfile.BadZipFile, OSError, ValueError) as exc:
                items.append(RefusedItem(name, f"not a readable zip archive: {exc}"))
            continue
        parts = clean_parts(name) or [name]
        items.append(
            Candidate(
                name,
                read=_holding(data),
                source=source,
                folder_category=parts[0] if len(parts) >= 2 and is_plain_name(name) else None,
                label_keys=(name, parts[-1]),
            )
        )
    importer.total = sum(i.count if isinstance(i, ZipSource) else 1 for i in items)
    return importer.run(items)


def import_paths(
    db: Database,
    paths: Iterable[Path],
    *,
    labels_from_folders: bool = False,
    labels_csv: Path | None = None,
    category: str | None = None,
    actor: str,
    progress: ProgressCallback | None = None,
) -> ImportResult:
    """Import files, folder trees (recursively) and zip archives from disk.

    labels_from_folders: ImageFolder layout, the image's parent folder name (below the given root) is its
    category. labels_csv: `filename,category` rows, matched on the content hash when the CSV has a sha256 column
    (`export labels --with-ids`), else on the full name, the relative path or the bare file name.
    A symlinked file inside a folder is refused when it points outside that folder.
    Precedence when several apply: the CSV row, then the folder, then `category`.
    Only an actor allowed to upload may (PermissionDenied, before anything is read).
    """
    authorize(db, actor, Action.UPLOAD)
    labels = read_labels_csv(labels_csv) if labels_csv is not None else None
    csv_resolved = Path(labels_csv).resolve() if labels_csv is not None else None
    importer = Importer(
        db, actor=actor, category=category, labels=labels, labels_from_folders=labels_from_folders, progress=progress
    )
    max_bytes = db.settings.max_file_bytes
    items: list[Candidate | RefusedItem | ZipSource] = []

    def add_file(path: Path, display: str, rel_parts: list[str], source: str) -> None:
        if csv_resolved is not None and path.resolve() == csv_resolved:
            return  # the labels file kept beside the images is not an image to refuse
        if looks_like_zip(peek(path)):
            try:
                items.append(ZipSource(display, lambda: path.open("rb"), caps=importer.caps, strip_top=True))
            except ArchiveRefused as exc:
                items.append(RefusedItem(display, str(exc)))
            except (zipfile.BadZipFile, OSError, ValueError) as exc:
                items.append(RefusedItem(display, f"not a readable zip archive: {exc}"))
            return
        items.append(
            Candidate(
                name=display,
                read=functools.partial(read_file, path, max_bytes),
                source=source,
                folder_category=rel_parts[0] if len(rel_parts) >= 2 else None,
                label_keys=("/".join(rel_parts), display, rel_parts[-1]),
            )
        )

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            source = f"folder:{path.resolve().name}"
            for file, refusal in walk_folder(path):
                rel = file.relative_to(path).parts
                display = f"{path.name}/{'/'.join(rel)}" if path.name else "/".join(rel)
                if refusal is not None:
                    items.append(RefusedItem(display, refusal))
                else:
                    add_file(file, display, list(rel), source)
        elif path.is_file():
            # A loose file: its own folder is its label folder.
            add_file(path, path.name, [path.parent.resolve().name, path.name], f"folder:{path.parent.resolve().name}")
        else:
            items.append(RefusedItem(str(path), "no such file or folder"))
    importer.total = sum(i.count if isinstance(i, ZipSource) else 1 for i in items)
    return importer.run(items)


# --------------------------------------------------------------------------------------------------------------
# One label source per import, as the Categories page offers it for a server folder and for a zip upload alike.


class LabelSource(StrEnum):
    """Where an import's labels come from."""

    FOLDERS = "folders"  # ImageFolder layout: each image's first folder below the root (a zip's wrapper skipped)
    CSV = "csv"  # a `filename,category` CSV (or an `export labels --with-ids` file)
    CATEGORY = "category"  # one category for every image
    NONE = "none"  # imported unlabelled


@dataclass(frozen=True)
class _LabelChoice:
    from_folders: bool
    use_csv: bool
    category: str | None


def _label_choice(source: LabelSource | str, *, csv_given: bool, category: str | None) -> _LabelChoice:
    """The import arguments for one label source; refuses a choice that contradicts what was given."""
    source = LabelSource(source)
    category = (category or "").strip() or None
    if source is LabelSource.CSV and not csv_given:
        raise ProdcatError("labels are to come from a CSV but none was given: give the CSV, or choose another source")
    if csv_given and source is not LabelSource.CSV:
        raise ProdcatError(
            "a labels CSV was given but labels are set to come from elsewhere: choose the CSV as the label source, "
            "or remove the file"
        )
    if source is LabelSource.CATEGORY:
        if category is None:
            raise CategoryError("labels are to be one category for every image but none was given: choose one")
        return _LabelChoice(from_folders=False, use_csv=False, category=clean_category_name(category))
    if category is not None:
        raise ProdcatError(
            f"category {category!r} was given but labels are set to come from elsewhere: choose one category as the "
            "label source, or clear the category"
        )
    return _LabelChoice(from_folders=source is LabelSource.FOLDERS, use_csv=source is LabelSource.CSV, category=None)


def import_labelled_folder(
    db: Database,
    folder: Path,
    *,
    label_source: LabelSource | str,
    labels_csv: Path | None = None,
    category: str | None = None,
    actor: str,
    progress: ProgressCallback | None = None,
) -> ImportResult:
    """Import a folder tree (`import_paths`) labelled from one source: folder names, a CSV, one category, or none."""
    authorize(db, actor, Action.UPLOAD)
    choice = _label_choice(label_source, csv_given=labels_csv is not None, category=category)
    return import_paths(
        db,
        [folder],
        labels_from_folders=choice.from_folders,
        labels_csv=labels_csv if choice.use_csv else None,
        category=choice.category,
        actor=actor,
        progress=progress,
    )


def import_labelled_upload(
    db: Database,
    upload: Upload,
    *,
    label_source: LabelSource | str,
    labels_csv: Upload | None = None,
    category: str | None = None,
    actor: str,
    progress: ProgressCallback | None = None,
) -> ImportResult:
    """Import an uploaded zip (or image) labelled from one source: folder names, an uploaded CSV (named by its file
    name in any error), one category, or none."""
    authorize(db, actor, Action.UPLOAD)
    choice = _label_choice(label_source, csv_given=labels_csv is not None, category=category)
    labels = None
    if choice.use_csv and labels_csv is not None:
        labels = read_labels_csv(io.BytesIO(upload_bytes(labels_csv)), name=str(labels_csv.name or "upload"))
    return import_uploads(
        db,
        [upload],
        labels=labels,
        labels_from_folders=choice.from_folders,
        category=choice.category,
        actor=actor,
        progress=progress,
    )
