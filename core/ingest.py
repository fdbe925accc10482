"""Import images into the catalogue: loose files, folder trees and zip archives, with optional labels.

Every file is validated by content, stored content-addressed (files first, then one short write
transaction for its row and label), and reported as imported, duplicate or refused with the reason.
One bad file never stops the batch; one file's bytes are in memory at a time.
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import hashlib
import io
import os
import re
import struct
import threading
import unicodedata
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from core.auth import Action, authorize
from core.db import Database
from core.duplicates import HashIndex, join_group, load_hash_index
from core.errors import ArchiveRefused, CategoryError, ImageRefused, ProdcatError
from core.export import spreadsheet_text
from core.imaging import ContentHashes, DecodedImage, content_hashes, difference_hash, inspect_and_decode
from core.labels import apply_label, clean_actor, clean_category_name, get_or_create_category
from core.schema import Category, Image, Label
from core.splits import split_for_hash
from core.store import StoredFiles, store_image

# progress(done, total, current_name); total may be None while a zip or folder is still being listed.
ProgressCallback = Callable[[int, int | None, str], None]

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_READ_CHUNK = 1024 * 1024
# Operating-system litter that is not a product photo; skipped silently rather than reported as refusals.
_LITTER_NAMES = {"__macosx", "thumbs.db", "desktop.ini"}
_CSV_FILENAME_HEADERS = {"filename", "file", "file_name", "filepath", "path", "image", "name", "image_path"}
_CSV_CATEGORY_HEADERS = {"category", "label", "class", "category_name", "class_name"}
_CSV_SHA256_HEADER = "sha256"  # the content-hash column of `export labels --with-ids`
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_MAX_NAME = 500  # images.original_name / images.source column width
# Decode/store threads: Pillow and hashlib release the GIL, so two threads use two cores.
DECODE_THREADS = 4
# Bytes of files read ahead of the one whose row is written next (besides the window of 2 per thread): ten 200 MB
# files are not all held at once.
READ_AHEAD_BYTES = 256 * 1024 * 1024


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


# --------------------------------------------------------------------------------------------------------------
# Candidates: one file to import, whatever it came from.


class _Refuse(Exception):
    """A candidate refused before validation (unreadable, encrypted, nested archive, over a cap)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Candidate:
    name: str  # shown to the user and stored as original_name
    read: Callable[[], bytes]  # raises _Refuse
    source: str
    folder_category: str | None = None  # first folder below the root, for labels_from_folders
    label_keys: tuple[str, ...] = ()  # names to look up in a labels mapping, most specific first


@dataclass
class _Skip:
    """Entries after an archive hit a cap: one refusal standing for `count` entries."""

    name: str
    reason: str
    count: int


def _is_litter(parts: Iterable[str]) -> bool:
    return any(p.startswith(".") or p.lower() in _LITTER_NAMES for p in parts)


def _clean_parts(name: str) -> list[str]:
    """Path components of a zip entry or relative path, for display and labels only (never for writing)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return [p for p in parts if p not in ("", "/", ".", "..") and not p.endswith(":")]


def _plain(name: str) -> bool:
    """A relative entry name with no '..' and no drive or root: the only kind whose folders become labels."""
    raw = PurePosixPath(name.replace("\\", "/"))
    return not raw.is_absolute() and ".." not in raw.parts and not (raw.parts and raw.parts[0].endswith(":"))


def _norm_key(name: str) -> str:
    """The form names are matched in: separators unified, `.`/`..` dropped, and NFC-normalised, so a name macOS
    stored decomposed (Finder's zips, HFS+ folders) matches the same name typed or saved composed (a CSV)."""
    return "/".join(_clean_parts(unicodedata.normalize("NFC", name.strip())))


def _upload_bytes(upload: object) -> bytes:
    data = getattr(upload, "data", None)
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if hasattr(upload, "getvalue"):
        return bytes(upload.getvalue())
    return bytes(upload.read())  # type: ignore[attr-defined]


def _looks_like_zip(head: bytes) -> bool:
    return head[:4] in _ZIP_MAGIC


class _ZipBudget:
    """Bytes actually decompressed from one archive (header sizes can lie, so we count while reading)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self.exhausted = False


@dataclass(frozen=True)
class _ZipCaps:
    """The settings an archive is held to (see core.settings: zip_max_entries, zip_max_total_bytes, max_file_bytes,
    zip_max_ratio)."""

    max_entries: int
    max_total: int
    max_file: int
    max_ratio: float


# Entries (and archives) that expand to less than this are not held to the compression ratio: a small flat image or
# an empty file compresses far better than 100:1 and costs nothing to read.
RATIO_FLOOR_BYTES = 1024 * 1024


def _expands_too_far(expanded: int, compressed: int, max_ratio: float) -> float | None:
    """The ratio `expanded`/`compressed` when it is over `max_ratio` for more than RATIO_FLOOR_BYTES, else None."""
    ratio = expanded / max(compressed, 1)
    return ratio if expanded > RATIO_FLOOR_BYTES and ratio > max_ratio else None


def _declared_refusal(info: zipfile.ZipInfo, caps: _ZipCaps) -> str | None:
    """Why an entry is refused from the sizes the archive declares, before a byte of it is inflated; None if not."""
    if info.file_size > caps.max_file:
        return (
            f"file is {info.file_size:,} bytes (as the archive lists it), larger than the limit of {caps.max_file:,} "
            "bytes: not read"
        )
    ratio = _expands_too_far(info.file_size, info.compress_size, caps.max_ratio)
    if ratio is not None:
        return (
            f"expands {ratio:,.0f}:1 ({info.compress_size:,} compressed bytes to {info.file_size:,}), more than the "
            f"limit of {caps.max_ratio:,.0f}:1 for a file in a zip (a zip bomb?): not read"
        )
    return None


def _read_zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _ZipBudget, caps: _ZipCaps) -> bytes:
    if info.flag_bits & 0x1:
        raise _Refuse("encrypted zip entry: password-protected files cannot be read; unzip it first")
    chunks: list[bytes] = []
    size = 0
    try:
        with zf.open(info) as fh:
            while chunk := fh.read(_READ_CHUNK):
                if not chunks and _looks_like_zip(chunk):
                    raise _Refuse("nested archive (a zip inside the zip) is not expanded: import the inner zip itself")
                budget.used += len(chunk)
                size += len(chunk)
                if budget.used > budget.cap:
                    budget.exhausted = True
                    raise _Refuse(
                        f"the archive expands to more than the limit of {budget.cap:,} bytes; stopped reading here"
                    )
                # The declared sizes were checked before reading; the bytes actually inflated are held to them too.
                if size > min(caps.max_file, info.file_size):
                    raise _Refuse(
                        f"inflates past {min(caps.max_file, info.file_size):,} bytes (its listed size, or the limit "
                        "per file): not read further"
                    )
                if (ratio := _expands_too_far(size, info.compress_size, caps.max_ratio)) is not None:
                    raise _Refuse(f"expands more than {ratio:,.0f}:1 while read (a zip bomb?): not read further")
                chunks.append(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise _Refuse(f"corrupt zip entry: {exc}") from exc
    except NotImplementedError as exc:
        raise _Refuse(f"unsupported zip compression: {exc}") from exc
    except RuntimeError as exc:  # zipfile raises RuntimeError for encryption it detects itself
        raise _Refuse(f"unreadable zip entry: {exc}") from exc
    return b"".join(chunks)


# An archive listing more entries than this many times the cap is refused before its directory is parsed:
# zipfile builds one object per listed entry, so a small upload listing millions of entries would cost gigabytes.
ZIP_LISTED_FACTOR = 4


def listed_zip_entries(fh: BinaryIO) -> int | None:
    """How many entries a zip's end-of-central-directory record claims (zip64 aware), read from the last bytes.

    None when no record is found (zipfile then reports the archive as broken). Leaves `fh` at its start.
    """
    fh.seek(0, io.SEEK_END)
    size = fh.tell()
    tail_len = min(size, 22 + 0xFFFF + 20)  # the record, its longest comment, and a zip64 locator before it
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    fh.seek(0)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        return None
    (total,) = struct.unpack_from("<H", tail, at + 10)
    if total == 0xFFFF and at >= 20 and tail[at - 20 : at - 16] == b"PK\x06\x07":
        (offset,) = struct.unpack_from("<Q", tail, at - 20 + 8)
        if offset < size:
            fh.seek(offset)
            record = fh.read(40)
            fh.seek(0)
            if len(record) == 40 and record[:4] == b"PK\x06\x06":
                (total,) = struct.unpack_from("<Q", record, 32)
    return int(total)


class _ZipSource:
    """A zip archive (on disk or in memory) expanded entry by entry; entry names are labels, never paths."""

    def __init__(self, name: str, opener: Callable[[], BinaryIO], *, caps: _ZipCaps, strip_top: bool) -> None:
        self.name = name
        self.opener = opener
        self.caps = caps
        self.max_entries, self.max_total = caps.max_entries, caps.max_total
        self.strip_top = strip_top
        self.entries: list[zipfile.ZipInfo] = []
        self.common_top = False
        with self.opener() as fh:
            listed = listed_zip_entries(fh)
            archive_bytes = fh.seek(0, io.SEEK_END)
        if listed is not None and listed > ZIP_LISTED_FACTOR * self.max_entries:
            raise ArchiveRefused(
                f"the archive lists {listed:,} entries, far more than the limit of {self.max_entries:,} "
                f"files per archive: split it into smaller archives"
            )
        litter = 0
        with self.opener() as fh, zipfile.ZipFile(fh) as zf:  # raises BadZipFile for a broken archive
            for info in zf.infolist():
                if info.is_dir():
                    continue
                if _is_litter(_clean_parts(info.filename)):
                    litter += 1
                    continue
                self.entries.append(info)
        if not self.entries:
            # Said out loud: "0 imported, 0 refused" would leave the user guessing what happened to the upload.
            raise ArchiveRefused(
                f"the archive holds only hidden or system files ({litter:,}, such as __MACOSX or .DS_Store), no photos"
                if litter
                else "the archive holds no files"
            )
        # Many entries each too small for the ratio rule can still add up to a bomb: the archive as a whole is held
        # to it too (entries refused on their own do not count: they are never read).
        declared = sum(i.file_size for i in self.entries if _declared_refusal(i, caps) is None)
        ratio = _expands_too_far(declared, archive_bytes, caps.max_ratio)
        if ratio is not None:
            raise ArchiveRefused(
                f"the archive's files expand {ratio:,.0f}:1 ({archive_bytes:,} bytes to {declared:,}), more than the "
                f"limit of {caps.max_ratio:,.0f}:1 (a zip bomb?): nothing was read"
            )
        # A zip of a folder ("dataset/Shoes/a.jpg") gets its single wrapping folder stripped for labels.
        tops = {tuple(_clean_parts(i.filename)[:1]) for i in self.entries}
        self.common_top = strip_top and len(tops) == 1 and any(len(_clean_parts(i.filename)) >= 3 for i in self.entries)

    @property
    def count(self) -> int:
        over = len(self.entries) > self.max_entries
        return min(len(self.entries), self.max_entries) + (1 if over else 0)

    def candidates(self) -> Iterator[_Candidate | _Skip | RefusedItem]:
        budget = _ZipBudget(self.max_total)
        declared_total = 0  # what the entries read so far claim to expand to
        source = f"zip:{self.name}"
        with self.opener() as fh, zipfile.ZipFile(fh) as zf:
            allowed = self.entries[: self.max_entries]
            for position, info in enumerate(allowed):
                name = f"{self.name}/{info.filename}"
                refusal = _declared_refusal(info, self.caps)
                if refusal is not None:
                    yield RefusedItem(name, refusal)
                    continue
                declared_total += info.file_size
                if budget.exhausted or declared_total > budget.cap:
                    left = len(allowed) - position
                    yield _Skip(
                        self.name,
                        f"the archive expands to more than the limit of {budget.cap:,} bytes: "
                        f"{left} remaining entries were not read",
                        left,
                    )
                    break
                parts = _clean_parts(info.filename)
                label_parts = parts[1:] if self.common_top else parts
                yield _Candidate(
                    name=name,
                    read=lambda info=info: _read_zip_entry(zf, info, budget, self.caps),
                    source=source,
                    # An absolute or ../ entry name says nothing trustworthy about its category.
                    folder_category=label_parts[0] if len(label_parts) >= 2 and _plain(info.filename) else None,
                    # The full name first: it is the stored original_name, so an exported labels CSV re-applies.
                    label_keys=(name, "/".join(parts), "/".join(label_parts), parts[-1] if parts else ""),
                )
            if len(self.entries) > self.max_entries:
                yield _Skip(
                    self.name,
                    f"the archive has {len(self.entries):,} files, more than the limit of {self.max_entries:,}: "
                    f"the last {len(self.entries) - self.max_entries:,} were not read",
                    1,
                )


# --------------------------------------------------------------------------------------------------------------
# The importer: one candidate at a time.


@dataclass
class _Prepared:
    """What a worker thread made of one new file: its validated metadata and stored files, or the refusal."""

    decoded: DecodedImage | None = None
    stored: StoredFiles | None = None
    refusal: str | None = None
    phash: int | None = None
    hashes: ContentHashes | None = None


@dataclass
class _Pending:
    """One candidate between reading (main thread) and its database row (main thread, in input order)."""

    cand: _Candidate
    category: str | None = None
    sha: str = ""
    refusal: str | None = None
    existing: tuple[int, str] | None = None  # a duplicate of an image already in the database
    same_as_in_flight: bool = False  # same bytes as an earlier file of this batch not yet committed
    data: bytes | None = None  # kept only for same_as_in_flight (re-done if the earlier copy was refused)
    future: Future[_Prepared] | None = None
    size: int = 0  # bytes read, held until the worker thread is done with them


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): their allocators give memory back anyway
        return None


_MALLOC_TRIM = _glibc_malloc_trim()
# A decode this large (4 megapixels, 16 MB of pixels) hands its freed memory back to the system when it is done.
_TRIM_AFTER_PIXELS = 4_000_000


class _DecodeGate:
    """Decodes run side by side only while their pixels together stay within `capacity` (the largest image allowed):
    small photos decode in parallel, an 80-megapixel one alone, so twenty of them never sit in memory at once.

    After a large decode the C heap is trimmed: glibc keeps what a thread freed in that thread's own arena, so without
    it each decode thread would keep its own largest picture's worth of memory (measured: 2 threads, 740 MB peak for
    twenty 80-megapixel PNGs instead of 430 MB)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self.changed = threading.Condition()

    @contextmanager
    def slot(self, pixels: int) -> Iterator[None]:
        with self.changed:
            self.changed.wait_for(lambda: self.in_use == 0 or self.in_use + pixels <= self.capacity)
            self.in_use += pixels
        try:
            yield
        finally:
            with self.changed:
                self.in_use -= pixels
                self.changed.notify_all()
            if pixels >= _TRIM_AFTER_PIXELS and _MALLOC_TRIM is not None:
                _MALLOC_TRIM(0)


class _Importer:
    """Runs a batch: the main thread reads, hashes and writes rows in order; a small thread pool decodes,
    validates and stores files (Pillow and hashlib release the GIL), a bounded number at a time so memory
    stays flat whatever the batch size.
    """

    def __init__(
        self,
        db: Database,
        *,
        actor: str,
        category: str | None,
        labels: dict[str, str] | None,
        labels_from_folders: bool,
        progress: ProgressCallback | None,
    ) -> None:
        self.db = db
        self.settings = db.settings
        self.actor = clean_actor(actor)  # refused before anything is read or written
        self.category = category
        self.labels = {_norm_key(k): v for k, v in (labels or {}).items()}
        table = labels if isinstance(labels, LabelsCSV) else LabelsCSV()
        self.labels_by_sha256 = table.by_sha256
        self.ambiguous = {_norm_key(k): v for k, v in table.ambiguous.items()}
        self.ambiguous_sha256 = table.ambiguous_sha256
        self.csv_name = f"the labels CSV {table.source}" if table.source else "the labels CSV"
        self.noted: set[str] = set()
        self.labels_from_folders = labels_from_folders
        self.progress = progress
        self.result = ImportResult()
        self.done = 0
        self.total: int | None = None
        self.seen: dict[str, tuple[int, str]] = {}  # sha256 -> (image id, original name) committed in this batch
        self.in_flight: set[str] = set()
        self.category_checks: dict[str, str | CategoryError] = {}
        self.workers = min(DECODE_THREADS, os.cpu_count() or 1)
        self.decode_gate = _DecodeGate(self.settings.max_image_pixels)
        self._hash_index: HashIndex | None = None  # loaded at the first new image, appended to as rows go in

    @property
    def hash_index(self) -> HashIndex:
        if self._hash_index is None:
            self._hash_index = load_hash_index(self.db)
        return self._hash_index

    @property
    def caps(self) -> _ZipCaps:
        s = self.settings
        return _ZipCaps(s.zip_max_entries, s.zip_max_total_bytes, s.max_file_bytes, s.zip_max_ratio)

    def tick(self, name: str, count: int = 1) -> None:
        self.done += count
        if self.progress is not None:
            self.progress(self.done, self.total, name)

    def refuse(self, name: str, reason: str, count: int = 1) -> None:
        self.result.refused.append(RefusedItem(name, reason))
        self.tick(name, count)

    def _flatten(self, items: Iterable[_Candidate | _Skip | RefusedItem | _ZipSource]) -> Iterator[object]:
        for item in items:
            if isinstance(item, _ZipSource):
                yield from item.candidates()
            else:
                yield item

    def run(self, items: Iterable[_Candidate | _Skip | RefusedItem | _ZipSource]) -> ImportResult:
        pending: deque[_Pending | _Skip | RefusedItem] = deque()
        window = 2 * self.workers

        def held(items: deque[_Pending | _Skip | RefusedItem]) -> int:
            return sum(p.size for p in items if isinstance(p, _Pending))

        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="ingest") as pool:
            try:
                for item in self._flatten(items):
                    # Read in the main thread, in order: zip budgets and progress stay sequential.
                    pending.append(self.start(item, pool) if isinstance(item, _Candidate) else item)  # type: ignore[arg-type]
                    while len(pending) > window or (len(pending) > 1 and held(pending) > READ_AHEAD_BYTES):
                        self.finish(pending.popleft())
                while pending:
                    self.finish(pending.popleft())
            finally:
                for left in pending:  # an unexpected error: do not leave threads decoding for nobody
                    if isinstance(left, _Pending) and left.future is not None:
                        left.future.cancel()
        return self.result

    def note(self, key: str, text: str) -> None:
        if key not in self.noted:
            self.noted.add(key)
            self.result.notes.append(text)

    def wanted_category(self, cand: _Candidate, sha: str) -> str | None:
        """The CSV row for this file (by content hash, then by name), else its folder, else the batch category.

        A CSV row that cannot tell this file apart (its name or hash listed with different categories) leaves the
        file unlabelled, and the import says so once per name.
        """
        if (found := self.labels_by_sha256.get(sha)) is not None:
            return found
        if sha in self.ambiguous_sha256:
            listed = ", ".join(repr(c) for c in self.ambiguous_sha256[sha])
            self.note(
                sha,
                f"label not applied to {cand.name!r}: its sha256 {sha[:12]}... is listed with different categories "
                f"in {self.csv_name} ({listed}); it was left unlabelled",
            )
            return None
        for key in cand.label_keys:
            if not key:
                continue
            norm = _norm_key(key)
            if (found := self.labels.get(norm)) is not None:
                return found
            if norm in self.ambiguous:
                listed = ", ".join(repr(c) for c in self.ambiguous[norm])
                self.note(
                    norm,
                    f"label not applied: {norm!r} is listed with different categories in {self.csv_name} ({listed}); "
                    "files of that name were left unlabelled (a CSV with a sha256 column, as `export labels "
                    "--with-ids` writes, tells them apart by content)",
                )
                return None
        if self.labels_from_folders and cand.folder_category:
            return cand.folder_category
        return self.category

    def checked_category(self, name: str) -> str:
        """The cleaned name of a live category (or a new one), else CategoryError.

        Cached per name, so a batch of 10,000 checks each name once; checked before any file is decoded or stored,
        so a file bound for an archived category leaves nothing behind.
        """
        checked = self.category_checks.get(name)
        if checked is None:
            try:
                checked = clean_category_name(name)
                with self.db.read() as session:
                    archived_at = session.scalar(select(Category.archived_at).where(Category.name == checked))
                if archived_at is not None:
                    raise CategoryError(f"category {checked!r} is archived: un-archive it or choose another category")
            except CategoryError as exc:
                checked = exc
            self.category_checks[name] = checked
        if isinstance(checked, CategoryError):
            raise checked
        return checked

    def find_existing(self, sha: str) -> tuple[int, str] | None:
        if sha in self.seen:
            return self.seen[sha]
        with self.db.read() as session:
            row = session.execute(select(Image.id, Image.original_name).where(Image.sha256 == sha)).first()
        return (row[0], row[1]) if row else None

    def prepare(self, name: str, data: bytes, sha: str) -> _Prepared:
        """Validate, decode and store one file (runs in a worker thread; touches no database)."""
        try:
            decoded = inspect_and_decode(
                name,
                data,
                self.settings,
                sha256=sha,
                draft_size=self.settings.thumbnail_size,
                decode_slot=self.decode_gate.slot,
            )
        except ImageRefused as exc:
            return _Prepared(refusal=exc.reason)
        try:
            stored = store_image(self.settings, data, decoded)
        except OSError as exc:
            return _Prepared(refusal=f"could not be stored ({exc.strerror or exc}); check free disk space")
        phash, hashes = difference_hash(decoded.image), content_hashes(decoded.image)
        decoded.image = None  # type: ignore[assignment]  # the thumbnail is written: free the pixels now
        return _Prepared(decoded=decoded, stored=stored, phash=phash, hashes=hashes)

    def start(self, cand: _Candidate, pool: ThreadPoolExecutor) -> _Pending:
        p = _Pending(cand)
        try:
            data = cand.read()
        except _Refuse as exc:
            p.refusal = exc.reason
            return p
        p.sha = hashlib.sha256(data).hexdigest()  # hashed once; duplicates are never decoded
        wanted = self.wanted_category(cand, p.sha)
        try:
            p.category = self.checked_category(wanted) if wanted is not None else None
        except CategoryError as exc:
            p.refusal = f"invalid category {wanted!r}: {exc}"
            return p
        if p.sha in self.in_flight:
            p.same_as_in_flight, p.data, p.size = True, data, len(data)
            return p
        p.existing = self.find_existing(p.sha)
        if p.existing is None:
            self.in_flight.add(p.sha)
            p.future, p.size = pool.submit(self.prepare, cand.name, data, p.sha), len(data)
        return p

    def finish(self, p: _Pending | _Skip | RefusedItem) -> None:
        if isinstance(p, _Skip):
            self.refuse(p.name, p.reason, p.count)
            return
        if isinstance(p, RefusedItem):
            self.refuse(p.name, p.reason)
            return
        name = p.cand.name
        if p.refusal is not None:
            self.refuse(name, p.refusal)
            return
        if p.same_as_in_flight:
            existing = self.seen.get(p.sha)
            if existing is not None:
                self.duplicate(name, existing, p.category)
                return
            # The earlier copy was refused: this one gets its own verdict (the same one, named after it).
            assert p.data is not None
            prepared = self.prepare(name, p.data, p.sha)
            p.data = None
        elif p.existing is not None:
            self.duplicate(name, p.existing, p.category)
            return
        else:
            assert p.future is not None
            prepared = p.future.result()
            self.in_flight.discard(p.sha)
        if prepared.refusal is not None:
            self.refuse(name, prepared.refusal)
            return
        assert prepared.decoded is not None and prepared.stored is not None
        self.insert(p, prepared)

    def insert(self, p: _Pending, prepared: _Prepared) -> None:
        """The image row and its label in one short write transaction (files are already in place)."""
        name, category = p.cand.name, p.category
        decoded, stored, phash, hashes = prepared.decoded, prepared.stored, prepared.phash, prepared.hashes
        assert decoded is not None and stored is not None
        # A near-duplicate (content hashes within the match rule's distance) joins the split of the earliest image
        # like it, so a resized, re-encoded, cropped or watermarked copy of a test image is never trained on; it
        # joins (or starts, or merges) their stored duplicate group.
        match = self.hash_index.matches(hashes) if hashes is not None else None
        row = Image(
            sha256=p.sha,
            stored_path=stored.original_rel,
            thumb_path=stored.thumb_rel,
            width=decoded.width,
            height=decoded.height,
            format=decoded.format,
            file_size=decoded.file_size,
            original_name=name[:_MAX_NAME],
            source=p.cand.source[:_MAX_NAME],
            split=match.split if match else str(split_for_hash(p.sha, self.settings.split_fractions)),
            uploaded_by=self.actor,
            phash=phash,
            box_dhash_h=hashes.dhash_h if hashes else None,
            box_dhash_v=hashes.dhash_v if hashes else None,
            box_phash=hashes.phash if hashes else None,
            duplicates_checked=True,
        )
        try:
            with self.db.write() as session:
                if match is not None:
                    row.duplicate_group_id = join_group(session, match.image_ids)
                if match is None and phash is not None:
                    # Only images imported before the content hashes existed (not yet scanned) match by equal dHash:
                    # among hashed ones, equal dHashes of distinct products are common (78 pairs in 2,000 FMNIST).
                    unscanned = (Image.phash == phash) & Image.box_phash.is_(None)
                    first = select(Image.split).where(unscanned).order_by(Image.id).limit(1)
                    row.split = session.scalar(first) or row.split
                session.add(row)
                session.flush()
                if category is not None:
                    cat = get_or_create_category(session, category)
                    apply_label(session, row.id, cat.id, actor=self.actor, action="import", note=p.cand.source)
        except CategoryError as exc:  # archived since checked_category: the image row was rolled back with it
            self.refuse(name, f"invalid category {category!r}: {exc}")
            return
        except IntegrityError:
            # Another process stored the same bytes between our lookup and insert: a duplicate after all.
            existing = self.find_existing(p.sha)
            if existing is None:
                raise
            self.duplicate(name, existing, category)
            return
        self.seen[p.sha] = (row.id, row.original_name)
        if hashes is not None:
            self.hash_index.add(row.id, hashes, row.split)
        self.result.imported.append(ImportedItem(name, row.id, category))
        self.tick(name)

    def duplicate(self, name: str, existing: tuple[int, str], category: str | None) -> None:
        image_id, existing_name = existing
        if category is not None:
            # Label an unlabelled duplicate; a different existing label is left alone (never overwritten).
            try:
                with self.db.write() as session:
                    if session.get(Label, image_id) is None:
                        cat = get_or_create_category(session, category)
                        apply_label(session, image_id, cat.id, actor=self.actor, action="import", note=name)
            except CategoryError:
                pass  # the name was checked already; only an archived category lands here: leave it unlabelled
        self.result.duplicates.append(DuplicateItem(name, image_id, existing_name))
        self.tick(name)


# --------------------------------------------------------------------------------------------------------------
# Public entry points.


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
    importer = _Importer(
        db,
        actor=actor,
        category=category,
        labels=labels,
        labels_from_folders=labels_from_folders,
        progress=progress,
    )
    items: list[_Candidate | RefusedItem | _ZipSource] = []
    for upload in uploads:
        name = str(getattr(upload, "name", "") or "upload")
        data = _upload_bytes(upload)
        if _looks_like_zip(data):
            try:
                items.append(_ZipSource(name, lambda data=data: io.BytesIO(data), caps=importer.caps, strip_top=True))
            except ArchiveRefused as exc:
                items.append(RefusedItem(name, str(exc)))
            except (zipfile.BadZipFile, OSError, ValueError) as exc:
                items.append(RefusedItem(name, f"not a readable zip archive: {exc}"))
            continue
        parts = _clean_parts(name) or [name]
        items.append(
            _Candidate(
                name,
                read=lambda data=data: data,
                source=source,
                folder_category=parts[0] if len(parts) >= 2 and _plain(name) else None,
                label_keys=(name, parts[-1]),
            )
        )
    importer.total = sum(i.count if isinstance(i, _ZipSource) else 1 for i in items)
    return importer.run(items)


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise _Refuse(f"file is {size:,} bytes, larger than the limit of {max_bytes:,} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise _Refuse(f"cannot be read ({exc.strerror or exc})") from exc


def _peek(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read(4)
    except OSError:
        return b""  # reported when the file itself is read


LINK_OUTSIDE_FOLDER = "a link to a file outside the folder: not followed (copy the file into the folder instead)"


def _walk(root: Path) -> Iterator[tuple[Path, str | None]]:
    """Files under root, sorted, each with None or the reason it is refused.

    Hidden and OS-litter folders and files are skipped; symlinked folders are not followed, and a symlinked file is
    refused when its target lies outside root (a folder typed in the web page must not read the rest of the disk).
    """
    inside = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _is_litter([d]))
        for filename in sorted(filenames):
            if _is_litter([filename]):
                continue
            path = Path(dirpath) / filename
            if path.is_symlink():
                try:
                    target = path.resolve()
                except (OSError, RuntimeError):  # a link loop
                    yield path, "a link that cannot be followed (it loops)"
                    continue
                if not target.is_relative_to(inside):
                    yield path, LINK_OUTSIDE_FOLDER
                    continue
            yield path, None


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
    importer = _Importer(
        db, actor=actor, category=category, labels=labels, labels_from_folders=labels_from_folders, progress=progress
    )
    max_bytes = db.settings.max_file_bytes
    items: list[_Candidate | RefusedItem | _ZipSource] = []

    def add_file(path: Path, display: str, rel_parts: list[str], source: str) -> None:
        if csv_resolved is not None and path.resolve() == csv_resolved:
            return  # the labels file kept beside the images is not an image to refuse
        if _looks_like_zip(_peek(path)):
            try:
                items.append(_ZipSource(display, lambda path=path: path.open("rb"), caps=importer.caps, strip_top=True))
            except ArchiveRefused as exc:
                items.append(RefusedItem(display, str(exc)))
            except (zipfile.BadZipFile, OSError, ValueError) as exc:
                items.append(RefusedItem(display, f"not a readable zip archive: {exc}"))
            return
        items.append(
            _Candidate(
                name=display,
                read=lambda path=path: _read_file(path, max_bytes),
                source=source,
                folder_category=rel_parts[0] if len(rel_parts) >= 2 else None,
                label_keys=("/".join(rel_parts), display, rel_parts[-1]),
            )
        )

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            source = f"folder:{path.resolve().name}"
            for file, refusal in _walk(path):
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
    importer.total = sum(i.count if isinstance(i, _ZipSource) else 1 for i in items)
    return importer.run(items)


@dataclass(frozen=True)
class _Columns:
    filename: int
    category: int
    sha256: int | None = None


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
    return _Columns(filename_col, category_col, sha_col)


class LabelsCSV(dict[str, str]):
    """A labels CSV as read: file name -> category for every name listed with one category, plus what a plain
    mapping cannot hold (the importer also accepts a plain dict).

    `by_sha256`: content hash -> category, from the sha256 column of `export labels --with-ids`; tried first, so two
    images that share a file name each get their own label back. `ambiguous`: names listed with different
    categories (in order of appearance); files of such a name import unlabelled and the import says so.
    `ambiguous_sha256`: the same for hashes.
    """

    def __init__(self, source: str = "") -> None:
        super().__init__()
        self.source = source
        self.by_sha256: dict[str, str] = {}
        self.ambiguous: dict[str, list[str]] = {}
        self.ambiguous_sha256: dict[str, list[str]] = {}


def _settle(listed: dict[str, list[str]], single: dict[str, str], ambiguous: dict[str, list[str]]) -> None:
    for key, categories in listed.items():
        if len(categories) == 1:
            single[key] = categories[0]
        else:
            ambiguous[key] = categories


def read_labels_csv(path_or_file: Path | BinaryIO, *, name: str | None = None) -> LabelsCSV:
    """Parse a labels CSV into file name -> category; refuses malformed rows clearly (by file and line number).

    Without a header every row is exactly `filename,category`. With a header row naming a file name and a category
    column (`filename,category`, `file,label`...), those two columns are read and other columns are ignored, except
    `sha256` (`export labels --with-ids`), which matches rows to files by content. A name listed twice with one
    category is fine; with different categories it is ambiguous (see `LabelsCSV`), not an error.
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
    by_name: dict[str, list[str]] = {}
    by_sha: dict[str, list[str]] = {}
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
            filename = cells[columns.filename] if columns.filename < len(cells) else ""
            category = cells[columns.category] if columns.category < len(cells) else ""
            if not filename or not category:
                raise ProdcatError(f"{where} line {line}: empty file name or category: {row!r}")
            listed = by_name.setdefault(_norm_key(filename), [])
            if category not in listed:
                listed.append(category)
            sha = cells[columns.sha256].lower() if columns.sha256 is not None and columns.sha256 < len(cells) else ""
            # A cell that is no digest (a spreadsheet turned it into a number, someone typed a note) is not trusted:
            # that row is matched by its name alone.
            if _SHA256_HEX.fullmatch(sha):
                listed = by_sha.setdefault(sha, [])
                if category not in listed:
                    listed.append(category)
    except csv.Error as exc:
        raise ProdcatError(f"{where} line {reader.line_num}: not readable as CSV ({exc})") from exc
    labels = LabelsCSV(str(name or ""))
    _settle(by_name, labels, labels.ambiguous)
    _settle(by_sha, labels.by_sha256, labels.ambiguous_sha256)
    return labels


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
        labels = read_labels_csv(io.BytesIO(_upload_bytes(labels_csv)), name=str(labels_csv.name or "upload"))
    return import_uploads(
        db,
        [upload],
        labels=labels,
        labels_from_folders=choice.from_folders,
        category=choice.category,
        actor=actor,
        progress=progress,
    )
