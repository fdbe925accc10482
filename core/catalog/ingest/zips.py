"""Zip archives read safely: entry by entry, held to caps on entries, bytes, file size and compression ratio checked
from the declared sizes before a byte is inflated and again while reading; entry names are labels, never paths."""

from __future__ import annotations

import functools
import io
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from core.catalog.ingest.candidates import Candidate, Refuse, Skip, clean_parts, is_litter, is_plain_name
from core.catalog.ingest.results import RefusedItem
from core.errors import ArchiveRefused
from core.settings import Settings

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_READ_CHUNK = 1024 * 1024


def looks_like_zip(head: bytes) -> bool:
    return head[:4] in _ZIP_MAGIC


class _ZipBudget:
    """Bytes actually decompressed from one archive (header sizes can lie, so we count while reading)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self.exhausted = False


@dataclass(frozen=True)
class ZipCaps:
    """The limits an archive is held to: files per archive, bytes it may expand to in all, bytes per file, and the
    compression ratio of a file (and of the archive as a whole)."""

    max_entries: int
    max_total_bytes: int
    max_file_bytes: int
    max_ratio: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ZipCaps:
        """The caps an operator set (PRODCAT_ZIP_MAX_ENTRIES, _ZIP_MAX_TOTAL_BYTES, _MAX_FILE_BYTES, _ZIP_MAX_RATIO)."""
        return cls(
            max_entries=settings.zip_max_entries,
            max_total_bytes=settings.zip_max_total_bytes,
            max_file_bytes=settings.max_file_bytes,
            max_ratio=settings.zip_max_ratio,
        )


# Entries (and archives) that expand to less than this are not held to the compression ratio: a small flat image or
# an empty file compresses far better than 100:1 and costs nothing to read.
RATIO_FLOOR_BYTES = 1024 * 1024


def _expands_too_far(expanded: int, compressed: int, max_ratio: float) -> float | None:
    """The ratio `expanded`/`compressed` when it is over `max_ratio` for more than RATIO_FLOOR_BYTES, else None."""
    ratio = expanded / max(compressed, 1)
    return ratio if expanded > RATIO_FLOOR_BYTES and ratio > max_ratio else None


def _declared_refusal(info: zipfile.ZipInfo, caps: ZipCaps) -> str | None:
    """Why an entry is refused from the sizes the archive declares, before a byte of it is inflated; None if not."""
    if info.file_size > caps.max_file_bytes:
        return (
            f"file is {info.file_size:,} bytes (as the archive lists it), larger than the limit of "
            f"{caps.max_file_bytes:,} bytes: not read"
        )
    ratio = _expands_too_far(info.file_size, info.compress_size, caps.max_ratio)
    if ratio is not None:
        return (
            f"expands {ratio:,.0f}:1 ({info.compress_size:,} compressed bytes to {info.file_size:,}), more than the "
            f"limit of {caps.max_ratio:,.0f}:1 for a file in a zip (a zip bomb?): not read"
        )
    return None


def _read_zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _ZipBudget, caps: ZipCaps) -> bytes:
    if info.flag_bits & 0x1:
        raise Refuse("encrypted zip entry: password-protected files cannot be read; unzip it first")
    chunks: list[bytes] = []
    size = 0
    try:
        with zf.open(info) as fh:
            while chunk := fh.read(_READ_CHUNK):
                if not chunks and looks_like_zip(chunk):
                    raise Refuse("nested archive (a zip inside the zip) is not expanded: import the inner zip itself")
                budget.used += len(chunk)
                size += len(chunk)
                if budget.used > budget.cap:
                    budget.exhausted = True
                    raise Refuse(
                        f"the archive expands to more than the limit of {budget.cap:,} bytes; stopped reading here"
                    )
                # The declared sizes were checked before reading; the bytes actually inflated are held to them too.
                if size > (allowed := min(caps.max_file_bytes, info.file_size)):
                    raise Refuse(
                        f"inflates past {allowed:,} bytes (its listed size, or the limit per file): not read further"
                    )
                if (ratio := _expands_too_far(size, info.compress_size, caps.max_ratio)) is not None:
                    raise Refuse(f"expands more than {ratio:,.0f}:1 while read (a zip bomb?): not read further")
                chunks.append(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise Refuse(f"corrupt zip entry: {exc}") from exc
    except NotImplementedError as exc:
        raise Refuse(f"unsupported zip compression: {exc}") from exc
    except RuntimeError as exc:  # zipfile raises RuntimeError for encryption it detects itself
        raise Refuse(f"unreadable zip entry: {exc}") from exc
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


class ZipSource:
    """A zip archive (on disk or in memory) expanded entry by entry; entry names are labels, never paths."""

    def __init__(self, name: str, opener: Callable[[], BinaryIO], *, caps: ZipCaps, strip_top: bool) -> None:
        self.name = name
        self.opener = opener
        self.caps = caps
        self.strip_top = strip_top
        self.entries: list[zipfile.ZipInfo] = []
        self.common_top = False
        with self.opener() as fh:
            listed = listed_zip_entries(fh)
            archive_bytes = fh.seek(0, io.SEEK_END)
        if listed is not None and listed > ZIP_LISTED_FACTOR * self.caps.max_entries:
            raise ArchiveRefused(
                f"the archive lists {listed:,} entries, far more than the limit of {self.caps.max_entries:,} "
                f"files per archive: split it into smaller archives"
            )
        litter = 0
        with self.opener() as fh, zipfile.ZipFile(fh) as zf:  # raises BadZipFile for a broken archive
            for info in zf.infolist():
                if info.is_dir():
                    continue
                if is_litter(clean_parts(info.filename)):
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
        tops = {tuple(clean_parts(i.filename)[:1]) for i in self.entries}
        self.common_top = strip_top and len(tops) == 1 and any(len(clean_parts(i.filename)) >= 3 for i in self.entries)

    @property
    def count(self) -> int:
        over = len(self.entries) > self.caps.max_entries
        return min(len(self.entries), self.caps.max_entries) + (1 if over else 0)

    def candidates(self) -> Iterator[Candidate | Skip | RefusedItem]:
        budget = _ZipBudget(self.caps.max_total_bytes)
        declared_total = 0  # what the entries read so far claim to expand to
        source = f"zip:{self.name}"
        with self.opener() as fh, zipfile.ZipFile(fh) as zf:
            allowed = self.entries[: self.caps.max_entries]
            for position, info in enumerate(allowed):
                name = f"{self.name}/{info.filename}"
                refusal = _declared_refusal(info, self.caps)
                if refusal is not None:
                    yield RefusedItem(name, refusal)
                    continue
                declared_total += info.file_size
                if budget.exhausted or declared_total > budget.cap:
                    left = len(allowed) - position
                    yield Skip(
                        self.name,
                        f"the archive expands to more than the limit of {budget.cap:,} bytes: "
                        f"{left} remaining entries were not read",
                        left,
                    )
                    break
                parts = clean_parts(info.filename)
                label_parts = parts[1:] if self.common_top else parts
                yield Candidate(
                    name=name,
                    read=functools.partial(_read_zip_entry, zf, info, budget, self.caps),
                    source=source,
                    # An absolute or ../ entry name says nothing trustworthy about its category.
                    folder_category=label_parts[0] if len(label_parts) >= 2 and is_plain_name(info.filename) else None,
                    # The full name first: it is the stored original_name, so an exported labels CSV re-applies.
                    label_keys=(name, "/".join(parts), "/".join(label_parts), parts[-1] if parts else ""),
                )
            if len(self.entries) > self.caps.max_entries:
                yield Skip(
                    self.name,
                    f"the archive has {len(self.entries):,} files, more than the limit of {self.caps.max_entries:,}: "
                    f"the last {len(self.entries) - self.caps.max_entries:,} were not read",
                    1,
                )
