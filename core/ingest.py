"""Import images into the catalogue: loose files, folder trees and zip archives, with optional labels.

CONTRACT (stub; the ingest helper implements it). Used by the CLI, the pages, the demo and tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from core.db import Database

# progress(done, total, current_name); total may be None while a zip or folder is still being listed.
ProgressCallback = Callable[[int, int | None, str], None]


@dataclass
class ImportedItem:
    name: str  # the file's name as the user knows it (relative path inside a folder or zip)
    image_id: int
    category: str | None  # label attached by this import, if any


@dataclass
class DuplicateItem:
    name: str
    image_id: int  # the existing image with the same bytes
    existing_name: str  # its original file name


@dataclass
class RefusedItem:
    name: str
    reason: str


@dataclass
class ImportResult:
    imported: list[ImportedItem] = field(default_factory=list)
    duplicates: list[DuplicateItem] = field(default_factory=list)
    refused: list[RefusedItem] = field(default_factory=list)

    def summary(self) -> str:
        return f"{len(self.imported)} imported, {len(self.duplicates)} duplicates, {len(self.refused)} refused"


@dataclass
class Upload:
    """An in-memory or file-like upload (Streamlit's UploadedFile fits: name + read())."""

    name: str
    data: bytes


def import_uploads(
    db: Database,
    uploads: Iterable[Upload],
    *,
    category: str | None = None,
    labels: dict[str, str] | None = None,
    actor: str,
    source: str = "upload",
    progress: ProgressCallback | None = None,
) -> ImportResult:
    """Import in-memory files. Zip uploads (detected by content) are expanded safely.

    `category` labels every image; `labels` maps file name -> category (CSV). Unknown categories are created.
    """
    raise NotImplementedError


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
    category. labels_csv: `filename,category` rows, matched on the relative path or the bare file name.
    """
    raise NotImplementedError


def read_labels_csv(path_or_file: Path | BinaryIO) -> dict[str, str]:
    """Parse a `filename,category` CSV (header optional) into a mapping; refuses malformed rows clearly."""
    raise NotImplementedError
