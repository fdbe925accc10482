"""What an import reports (imported, duplicate, refused items and notes), what it accepts as an upload, and its
progress callback."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
    # Things the user should know that refused no file, e.g. a CSV label not applied because it was ambiguous.
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{len(self.imported)} imported, {len(self.duplicates)} duplicates, {len(self.refused)} refused"


@dataclass
class Upload:
    """An in-memory or file-like upload (Streamlit's UploadedFile fits: name + read())."""

    name: str
    data: bytes
