"""Preparing an import's new files, off the importing thread: decode, validate, store, hash; decodes side by side
within a pixel budget, handing the memory of large ones back to the system.

Two pools share the work. Threads (`decode_threads`) take every file of a small import and a large import's large
files: Pillow decodes, resizes and encodes those without the interpreter lock, and the pixel budget (`DecodeGate`)
keeps large pictures from decoding side by side. A large import's small files go to worker processes
(`decode_processes`): their cost is mostly Python (checks, hashes, file-system calls) that threads run one at a time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.context
import multiprocessing.spawn
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from core.catalog.imaging import ContentHashes, DecodedImage, content_hashes, difference_hash, inspect_and_decode
from core.catalog.store import StoredFiles, make_thumbnail, store_image
from core.errors import ImageRefused, as_storage_error
from core.settings import Settings

# Threads that decode in the importing process (Pillow and hashlib release the GIL; at most the CPU count).
DECODE_THREADS = 4
# Worker processes for a large import's small files (at most the CPU count; none on one core): an import of at least
# PROCESS_MIN_FILES files sends each file of at most PROCESS_FILE_BYTES there. Measured on 2 cores against threads
# alone (docs/benchmarks.md, 2026-12-01), with the workers started in the background and sent 16 files a call: 64 px
# PNGs 1.1-1.2x the files a second at 1,000 files, 1.35x at 2,000, about even at 600 and 0.6x at 300 (an import
# ends by waiting for its workers to have started); 1000 px JPEGs sent there 0.8x (moving 100 KB a photo to another
# process costs more than the lock does), so they stay in threads.
DECODE_PROCESSES = 4
PROCESS_MIN_FILES = 1_000
PROCESS_FILE_BYTES = 64 * 1024
# Small files travel to a worker process this many at a time. Sent one a call, the workers waited for work about
# 60 % of the time (py-spy, 6,000 small PNGs on 2 cores): every call and every answer passes through the pool's own
# threads in the importing process, which need the interpreter lock that the importing thread holds.
PROCESS_CHUNK_FILES = 16


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


class _DecodeInThread(Exception):
    """A small file whose picture is too large to decode outside the importing process's pixel budget."""


# A worker process decodes outside the pixel budget: pictures this large go back to the importing process.
PROCESS_MAX_PIXELS = _TRIM_AFTER_PIXELS


def _process_slot(pixels: int) -> AbstractContextManager[object]:
    """A worker process decodes outside the pixel budget, so only pictures that do not need it."""
    if pixels >= PROCESS_MAX_PIXELS:
        raise _DecodeInThread
    return nullcontext()


# The import's settings in a worker process (`decode_processes` passes them once, not with every file).
_worker_settings: Settings | None = None


def _start_worker(settings: Settings) -> None:
    """A worker process's initializer: the settings every file of the import is prepared with."""
    global _worker_settings
    _worker_settings = settings


# What a worker process makes of one file: Prepared; None for a picture too large to decode outside the importing
# process's pixel budget (decoded there instead); or the unexpected error it raised, in that file's place, so the
# files prepared beside it in its chunk are still accounted for (their stored files removed if the import fails).
ProcessResult = Prepared | None | Exception


def prepare_in_process(files: Sequence[tuple[str, bytes, str]]) -> list[ProcessResult]:
    """`prepare_file` in a worker process for a chunk of (name, bytes, sha256), in order. A few kilobytes of PNG can
    claim 80 megapixels: such a picture comes back as None, to be decoded within the importing process's budget."""
    assert _worker_settings is not None, "a decode_processes() worker"
    results: list[ProcessResult] = []
    for name, data, sha in files:
        try:
            results.append(prepare_file(_worker_settings, name, data, sha, _process_slot))
        except _DecodeInThread:
            results.append(None)
        except Exception as exc:  # handed back in its place, raised there with where it happened
            exc.add_note("".join(traceback.format_exception(exc)).rstrip() + "\n(in an import worker process)")
            results.append(exc)
    return results


def _started() -> bool:
    """A first call that returns once a worker process is up."""
    return True


class WorkerProcesses:
    """A large import's worker processes, started in the background. The fork server imports the decoding modules
    first (about half a second on 2 cores); until the workers answer, `ready()` is false and the threads take every
    file, so an import never waits for its workers to start."""

    def __init__(self, executor: ProcessPoolExecutor) -> None:
        self.executor = executor
        self.up = threading.Event()
        self.failed: Exception | None = None
        self._starter = threading.Thread(target=self._start, name="ingest-start-processes", daemon=True)
        self._starter.start()

    def _start(self) -> None:
        try:
            self.executor.submit(_started).result()
        except Exception as exc:  # no worker could start (a process limit, memory): threads do it all
            self.failed = exc
        finally:
            self.up.set()

    def ready(self) -> bool:
        return self.up.is_set() and self.failed is None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Raises BrokenProcessPool once a worker process has died (killed, out of memory)."""
        return self.executor.submit(fn, *args)

    def __enter__(self) -> WorkerProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self._starter.join()
        self.executor.shutdown(wait=True, cancel_futures=True)


# Set while this thread starts one of our worker processes (`_WorkerProcess`).
_starting_worker = threading.local()
_get_preparation_data = multiprocessing.spawn.get_preparation_data


def _preparation_data(name: str) -> dict[str, Any]:
    """multiprocessing's description of a new process, without the main module for our workers (below)."""
    data: dict[str, Any] = _get_preparation_data(name)
    if getattr(_starting_worker, "active", False):
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
    return data


multiprocessing.spawn.get_preparation_data = _preparation_data  # unchanged for every other process


if sys.platform != "win32":  # no fork server there, so no worker processes (`decode_processes`)

    class _WorkerProcess(multiprocessing.context.ForkServerProcess):
        """A worker process that does not run the importing program's main module again. multiprocessing runs it in
        every new process (as `__mp_main__`), for functions defined there; ours are all in modules. In a Streamlit
        server the main module is the page being shown (Streamlit installs each page as `__main__` while it runs):
        each worker of an upload would run the page once more, and a script without an `if __name__ == "__main__":`
        guard its own import."""

        @staticmethod
        def _Popen(process_obj: Any) -> Any:  # multiprocessing's name
            from multiprocessing.popen_forkserver import Popen

            _starting_worker.active = True
            try:
                return Popen(process_obj)
            finally:
                _starting_worker.active = False

    class _WorkerContext(multiprocessing.context.ForkServerContext):
        Process = _WorkerProcess


def decode_processes(files: int | None, settings: Settings) -> WorkerProcesses | None:
    """Worker processes for an import of `files` files, or None: too few files for starting them to pay, one core,
    or no `forkserver` (Windows). Forkserver workers start from a clean process, not a copy of a web server's threads,
    and never run the program's main module (`_WorkerProcess`)."""
    workers = min(DECODE_PROCESSES, os.cpu_count() or 1)
    if files is None or files < PROCESS_MIN_FILES or workers < 2:
        return None
    if sys.platform == "win32" or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = _WorkerContext()
    # Imported once by the fork server (when it starts, on the first large import), not by each worker: the workers
    # start sooner and share those pages. A process has one fork server, shared with models.distributed's ranks:
    # whichever starts it decides what it preloads; the other's processes then import their module themselves.
    context.set_forkserver_preload([__name__])
    return WorkerProcesses(
        ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(settings,))
    )


def decode_threads() -> ThreadPoolExecutor:
    """The threads that prepare an import's new files (Pillow and hashlib release the GIL): every file of a small
    import, and a large import's large files (`decode_processes` takes its small ones)."""
    return ThreadPoolExecutor(max_workers=min(DECODE_THREADS, os.cpu_count() or 1), thread_name_prefix="ingest")
