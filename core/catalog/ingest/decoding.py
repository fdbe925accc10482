"""Preparing an import's new files, off the importing thread: decode, validate, store, hash; decodes side by side
within a pixel budget, handing the memory of large ones back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from core.catalog.imaging import ContentHashes, DecodedImage, content_hashes, difference_hash, inspect_and_decode
from core.catalog.store import StoredFiles, make_thumbnail, store_image
from core.errors import ImageRefused, as_storage_error
from core.settings import Settings

# Threads that decode in the importing process (Pillow and hashlib release the GIL; at most the CPU count).
DECODE_THREADS = 4


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): their allocators give memory back anyway
        return None


_MALLOC_TRIM = _glibc_malloc_trim()
# A decode this large (4 megapixels, 16 MB of pixels) hands its freed memory back to the system when it is done.
_TRIM_AFTER_PIXELS = 4_000_000


class DecodeGate:
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


# ---------------------------------------------------------------------------------------------------------------------
# One new file.


@dataclass
class Prepared:
    """What became of one new file: its validated metadata and stored files, or the refusal."""

    decoded: DecodedImage | None = None
    stored: StoredFiles | None = None
    refusal: str | None = None
    phash: int | None = None
    hashes: ContentHashes | None = None


def prepare_file(
    settings: Settings,
    name: str,
    data: bytes,
    sha: str,
    decode_slot: Callable[[int], AbstractContextManager[object]] | None = None,
) -> Prepared:
    """Validate, decode and store one file, and hash its picture (touches no database)."""
    try:
        decoded = inspect_and_decode(
            name, data, settings, sha256=sha, draft_size=settings.thumbnail_size, decode_slot=decode_slot
        )
    except ImageRefused as exc:
        return Prepared(refusal=exc.reason)
    # The thumbnail is made once: stored, and the hashes are taken from it (a photo's draft decode has about 4x its
    # pixels; the hashes are made to survive resizing, and a stored image's pixel check reads its thumbnail).
    thumbnail = make_thumbnail(decoded.image, settings.thumbnail_size)
    decoded.image = None  # type: ignore[assignment]  # free the decoded pixels now
    try:
        stored = store_image(settings, data, decoded, thumbnail=thumbnail)
    except OSError as exc:  # a full or read-only disk reads as such (EFBIG's "File too large" would blame the photo)
        known = as_storage_error(exc, settings.data_dir.name)
        return Prepared(refusal=f"could not be stored: {known if known is not None else exc.strerror or exc}")
    grey = thumbnail.convert("L")  # both hashes read grey levels: converted once
    return Prepared(decoded=decoded, stored=stored, phash=difference_hash(grey), hashes=content_hashes(grey))


def decode_threads() -> ThreadPoolExecutor:
    """The threads that prepare an import's new files (Pillow and hashlib release the GIL).

    Threads, not processes: measured on 2 shared cores (benchmarks/bench_ingest.py, 3,000 64 px PNGs and 400
    1000 px JPEGs, 2026-11-30), a pool of forkserver processes imported 30 % fewer small files and 30 % fewer photos a
    second than these threads, starting it and moving the bytes cost more than the GIL did.
    """
    return ThreadPoolExecutor(max_workers=min(DECODE_THREADS, os.cpu_count() or 1), thread_name_prefix="ingest")
