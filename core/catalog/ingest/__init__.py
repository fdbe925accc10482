"""Import images into the catalogue: loose files, folder trees and zip archives, with optional labels.

Every file is validated by content, stored content-addressed, and reported as imported, duplicate or refused with the
reason; one bad file never stops the import. The package: `imports` (the public functions), `importer` (reading,
the lookups, the write transactions), `decoding` (decoding, checking, storing and hashing new files, in threads or
processes), `zips` (zip archives and their caps), `labels_csv` (the labels CSV), `candidates` (one file to import and
the names it goes by), `results`. Everything public is
importable from `core.catalog.ingest`.
"""

from core.catalog.ingest.candidates import LINK_OUTSIDE_FOLDER
from core.catalog.ingest.decoding import DECODE_THREADS
from core.catalog.ingest.importer import READ_AHEAD_BYTES
from core.catalog.ingest.imports import (
    LabelSource,
    import_labelled_folder,
    import_labelled_upload,
    import_paths,
    import_uploads,
)
from core.catalog.ingest.labels_csv import LabelsCSV, read_labels_csv
from core.catalog.ingest.results import (
    DuplicateItem,
    ImportedItem,
    ImportResult,
    ProgressCallback,
    RefusedItem,
    Upload,
    stored_before,
)
from core.catalog.ingest.zips import RATIO_FLOOR_BYTES, ZIP_LISTED_FACTOR, ZipCaps, listed_zip_entries

__all__ = [
    "DECODE_THREADS",
    "LINK_OUTSIDE_FOLDER",
    "RATIO_FLOOR_BYTES",
    "READ_AHEAD_BYTES",
    "ZIP_LISTED_FACTOR",
    "DuplicateItem",
    "ImportResult",
    "ImportedItem",
    "LabelSource",
    "LabelsCSV",
    "ProgressCallback",
    "RefusedItem",
    "Upload",
    "ZipCaps",
    "import_labelled_folder",
    "import_labelled_upload",
    "import_paths",
    "import_uploads",
    "listed_zip_entries",
    "read_labels_csv",
    "stored_before",
]
