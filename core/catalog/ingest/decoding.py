"""Decodes side by side within a pixel budget, handing the memory of large ones back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


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
