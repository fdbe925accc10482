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

    def empty(self) -> bool:
        """Whether nothing at all was reported."""
        return not (self.imported or self.duplicates or self.refused or self.notes)


_RESULT_ATTRIBUTE = "prodcat_import_result"


def attach_result(exc: BaseException, result: ImportResult) -> None:
    """Let an error that ended an import carry the report of what the batches before it stored (`stored_before`):
    the error itself propagates unchanged, so every handler of database and disk failures still recognises it."""
    try:
        setattr(exc, _RESULT_ATTRIBUTE, result)
    except AttributeError:  # an exception type with __slots__: the report is lost, the error is not
        pass


def stored_before(exc: BaseException) -> ImportResult | None:
    """The report of what an import stored before `exc` ended it (imported, duplicates, refused so far), if any."""
    result = getattr(exc, _RESULT_ATTRIBUTE, None)
    return result if isinstance(result, ImportResult) and not result.empty() else None


@dataclass
class Upload:
    """An in-memory or file-like upload (Streamlit's UploadedFile fits: name + read())."""

    name: str
    data: bytes
