"""The importer: reads candidates in order, decodes, validates and stores new files in threads and worker processes
(`core.catalog.ingest.decoding`), and writes the rows and labels of many images in one transaction, reporting every
file as imported, duplicate or refused.

Files are stored before their rows, and each batch's files are flushed to the disk before its rows commit, so a row
never points to a missing or empty file, even after a power cut. When a batch's transaction fails, the originals and
thumbnails that batch (and the files still in flight) wrote are removed again, unless a row of another import now
points to the same bytes; then the error propagates. Only a killed process or a power cut can leave stored files
without rows, and importing them again reuses them.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass, field

from sqlalchemy import CursorResult, Table, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from core.auth import Action, record
from core.catalog.duplicates import HashArrays, HashIndex, join_group, load_hash_index
from core.catalog.imaging import ContentHashes
from core.catalog.ingest.candidates import Candidate, Refuse, Skip, norm_key
from core.catalog.ingest.decoding import (
    PROCESS_CHUNK_FILES,
    PROCESS_FILE_BYTES,
    DecodeGate,
    Prepared,
    ProcessResult,
    WorkerProcesses,
    decode_processes,
    decode_threads,
    prepare_file,
    prepare_in_process,
)
from core.catalog.ingest.labels_csv import LabelsCSV
from core.catalog.ingest.results import (
    DuplicateItem,
    ImportedItem,
    ImportResult,
    ProgressCallback,
    RefusedItem,
    attach_result,
)
from core.catalog.ingest.zips import ZipCaps, ZipSource
from core.catalog.labels import (
    LabelMove,
    apply_label,
    apply_moves,
    clean_actor,
    clean_category_name,
    get_or_create_category,
)
from core.catalog.splits import split_for_hash
from core.catalog.store import StoredFiles, flush_stored
from core.db import Database, in_chunks
from core.errors import CategoryError
from core.schema import Category, Image, Label, LabelAction

_MAX_NAME = 500  # images.original_name / images.source column width
# Files read ahead of the one that joins a batch next, and at most this many bytes of them (but always one file): the
# thread pool keeps decoding small files while the main thread writes a batch, and large files are not all held at once.
READ_AHEAD_FILES = 128
READ_AHEAD_BYTES = 16 * 1024 * 1024
# Files read and then looked up in the catalogue by one query (at most this many bytes of them, or one larger file).
LOOKUP_FILES = 64
LOOKUP_BYTES = 8 * 1024 * 1024
# Images written in one transaction (their rows, labels and import events), and the longest a batch waits for more
# files before it is written anyway, so progress moves while large pictures decode. A batch holds no pixels or bytes,
# only each image's metadata, so memory does not grow with it.
BATCH_ROWS = 256
BATCH_SECONDS = 1.0

# A batch's transaction ended by PostgreSQL's deadlock detector (40P01) or a serialization failure (40001) is written
# again, up to this many times.
WRITE_RETRIES = 5
_RETRY_SQLSTATES = {"40P01", "40001"}

_IMAGES = Image.__table__
assert isinstance(_IMAGES, Table)  # a declarative class maps one Table
# Core, not the ORM: many rows per statement ("insertmanyvalues"), their ids returned in the order of the rows.
_INSERT_IMAGES = insert(_IMAGES).returning(_IMAGES.c.id, sort_by_parameter_order=True)


@dataclass
class _Pending:
    """One candidate between reading (main thread) and joining a batch (main thread, in input order)."""

    cand: Candidate
    category: str | None = None
    sku: str | None = None  # the labels CSV's SKU for this file
    sha: str = ""
    refusal: str | None = None
    existing: tuple[int, str] | None = None  # a duplicate of an image already in the database
    same_as_in_flight: bool = False  # same bytes as an earlier file of this import not yet written
    data: bytes | None = None  # until submitted; kept for same_as_in_flight (re-done if the earlier copy is refused)
    future: Future[Prepared] | None = None  # a decode thread's
    chunk: _Chunk | None = None  # for a worker process, with `data` kept until it answers, to be redone here if need be
    slot: int = 0  # this file's place in its chunk
    size: int = 0  # bytes read, held until the worker thread is done with them


@dataclass
class _Chunk:
    """Small files sent to a worker process in one call (`decoding.PROCESS_CHUNK_FILES`), once it is full or one of
    its files is needed."""

    files: list[_Pending] = field(default_factory=list)
    future: Future[list[ProcessResult]] | None = None


@dataclass
class _New:
    """A new image in a batch: decoded, validated and stored, waiting for its row."""

    cand: Candidate
    sha: str
    category: str | None
    prepared: Prepared
    sku: str | None = None


@dataclass
class _Dup:
    """A file with the same bytes as a stored image (`existing`), or as a new image earlier in its batch (None)."""

    cand: Candidate
    sha: str
    category: str | None
    existing: tuple[int, str] | None
    sku: str | None = None  # attached to the stored image when it has none yet


_Outcome = _New | _Dup | RefusedItem | Skip
_Verdict = ImportedItem | DuplicateItem | RefusedItem | Skip


@dataclass
class _Batch:
    """Files in input order whose verdicts are reported together, once their rows are written in one transaction."""

    items: list[_Outcome] = field(default_factory=list)
    new_by_sha: dict[str, _New] = field(default_factory=dict)
    started: float = 0.0

    def add(self, item: _Outcome) -> None:
        if not self.items:
            self.started = time.monotonic()
        self.items.append(item)
        if isinstance(item, _New):
            self.new_by_sha[item.sha] = item

    def full(self) -> bool:
        return len(self.items) >= BATCH_ROWS or time.monotonic() - self.started >= BATCH_SECONDS

    def writes(self) -> bool:
        """Whether the batch has anything for the database (refusals alone have not)."""
        return any(
            isinstance(i, _New) or (isinstance(i, _Dup) and (i.category is not None or i.sku is not None))
            for i in self.items
        )


class _Rows:
    """New images' rows not yet inserted, with what is needed once their ids are known, and their content hashes (under
    their positions) so that a near-duplicate of one of them is noticed."""

    def __init__(self) -> None:
        self.values: list[dict[str, object]] = []
        self.meta: list[tuple[int, _New | _Dup, int | None, str, ContentHashes | None]] = []
        self.shas: set[str] = set()
        self.index = HashIndex(HashArrays.from_rows([]), [])

    def add(
        self,
        slot: int,
        item: _New | _Dup,
        category_id: int | None,
        row: dict[str, object],
        split: str,
        hashes: ContentHashes | None,
    ) -> None:
        if hashes is not None:
            self.index.add(len(self.values), hashes, split)
        self.values.append(row)
        self.meta.append((slot, item, category_id, split, hashes))
        self.shas.add(item.sha)

    def clear(self) -> None:
        self.values, self.meta, self.shas = [], [], set()
        self.index = HashIndex(HashArrays.from_rows([]), [])


def _without_writes(item: _Outcome) -> _Verdict:
    """The verdict of an item of a batch with nothing to write: a refusal, or a duplicate of a stored image."""
    if isinstance(item, _Dup) and item.existing is not None:
        return DuplicateItem(item.cand.name, *item.existing)
    assert isinstance(item, RefusedItem | Skip), item  # new images and their copies always write
    return item


def _size(item: _Pending | Skip | RefusedItem) -> int:
    return item.size if isinstance(item, _Pending) else 0


class Importer:
    """Runs an import: the main thread reads and hashes files in order and looks them up in the catalogue a group at a
    time; a few threads (`decode_threads`), and for a large import's small files a few processes (`decode_processes`),
    decode, validate and store new files, a bounded number at a time; the main thread writes the rows of up to
    BATCH_ROWS images in one transaction, in input order. Memory stays flat whatever the number of files and the batch
    size.
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
        self.labels = {norm_key(k): v for k, v in (labels or {}).items()}
        table = labels if isinstance(labels, LabelsCSV) else LabelsCSV()
        self.labels_by_sha256 = table.by_sha256
        self.ambiguous = {norm_key(k): v for k, v in table.ambiguous.items()}
        self.ambiguous_sha256 = table.ambiguous_sha256
        self.csv_name = f"the labels CSV {table.source}" if table.source else "the labels CSV"
        self.skus = {norm_key(k): v for k, v in table.skus.items()}
        self.skus_by_sha256 = table.skus_by_sha256
        self.ambiguous_skus = {norm_key(k): v for k, v in table.ambiguous_skus.items()}
        self.ambiguous_skus_sha256 = table.ambiguous_skus_sha256
        self.noted: set[str] = set()
        self.labels_from_folders = labels_from_folders
        self.progress = progress
        self.result = ImportResult(notes=list(table.sku_refusals))
        self.done = 0
        self.total: int | None = None
        self.seen: dict[str, tuple[int, str]] = {}  # sha256 -> (image id, original name) written by this import
        self.in_flight: set[str] = set()  # new images of this import not yet written (or refused)
        self.stored_before: dict[str, tuple[int, str]] = {}  # the current lookup group's hashes found in the database
        self.category_checks: dict[str, str | CategoryError] = {}
        self.decode_gate = DecodeGate(self.settings.max_image_pixels)
        self.batch = _Batch()
        self._hash_index: HashIndex | None = None  # loaded at the first new image, appended to as rows go in
        self._unscanned: bool | None = None  # whether any stored image has a dHash but no content hashes yet
        self.processes: WorkerProcesses | None = None  # for a large import's small files (`worker_processes`)
        self.processes_asked = False
        self.workers_stop = ExitStack()  # stops the worker processes at the end of `run`
        self.chunk = _Chunk()  # small files not yet sent to a worker process
        self.threads: ThreadPoolExecutor | None = None  # the decode threads, while `run` runs

    @property
    def hash_index(self) -> HashIndex:
        if self._hash_index is None:
            self._hash_index = load_hash_index(self.db)
        return self._hash_index

    @property
    def caps(self) -> ZipCaps:
        return ZipCaps.from_settings(self.settings)

    def tick(self, name: str, count: int = 1) -> None:
        self.done += count
        if self.progress is not None:
            self.progress(self.done, self.total, name)

    def refuse(self, name: str, reason: str, count: int = 1) -> None:
        self.result.refused.append(RefusedItem(name, reason))
        self.tick(name, count)

    def _flatten(
        self, items: Iterable[Candidate | Skip | RefusedItem | ZipSource]
    ) -> Iterator[Candidate | Skip | RefusedItem]:
        for item in items:
            if isinstance(item, ZipSource):
                yield from item.candidates()
            else:
                yield item

    def _read_groups(
        self, flat: Iterable[Candidate | Skip | RefusedItem]
    ) -> Iterator[list[_Pending | Skip | RefusedItem]]:
        """Candidates read and hashed in order (in the main thread: zip budgets stay sequential), in groups of
        LOOKUP_FILES files or LOOKUP_BYTES, whichever comes first; other items pass through in their place."""
        group: list[_Pending | Skip | RefusedItem] = []
        size = 0
        for item in flat:
            if isinstance(item, Candidate):
                p = _Pending(item)
                try:
                    data = item.read()
                except Refuse as exc:
                    p.refusal = exc.reason
                else:
                    p.sha = hashlib.sha256(data).hexdigest()  # hashed once; duplicates are never decoded
                    p.data, p.size = data, len(data)
                    size += len(data)
                group.append(p)
            else:
                group.append(item)
            if len(group) >= LOOKUP_FILES or size >= LOOKUP_BYTES:
                yield group
                group, size = [], 0
        if group:
            yield group

    def run(self, items: Iterable[Candidate | Skip | RefusedItem | ZipSource]) -> ImportResult:
        pending: deque[_Pending | Skip | RefusedItem] = deque()
        held = 0  # bytes of the pending files, read and not yet decoded (or kept for a copy)
        with decode_threads() as pool, ExitStack() as self.workers_stop:
            self.threads = pool
            try:
                for group in self._read_groups(self._flatten(items)):
                    self.stored_before = self.find_stored(
                        p.sha for p in group if isinstance(p, _Pending) and p.sha and p.sha not in self.seen
                    )
                    for item in group:
                        pending.append(self.start(item) if isinstance(item, _Pending) else item)
                        held += _size(pending[-1])
                        while len(pending) > READ_AHEAD_FILES or (len(pending) > 1 and held > READ_AHEAD_BYTES):
                            held -= _size(pending[0])
                            self.finish(pending.popleft())
                while pending:
                    self.finish(pending.popleft())
                self.write_batch()
            except BaseException as exc:
                self.abandon(pending)
                attach_result(exc, self.result)  # what the committed batches stored, for the report beside the error
                raise
        return self.result

    def abandon(self, pending: Iterable[_Pending | Skip | RefusedItem]) -> None:
        """After an unexpected error: stop the threads decoding for nobody, and remove the files that the unwritten
        batch and the files in flight stored (they have no rows)."""
        stored = [n.prepared.stored for n in self.batch.items if isinstance(n, _New) and n.prepared.stored]
        for p in pending:
            if not isinstance(p, _Pending):
                continue
            future = p.chunk.future if p.chunk is not None else p.future
            if future is None or future.cancel():  # never sent, or cancelled before it started: nothing stored
                continue
            try:
                done = future.result()
            except Exception:  # noqa: S112  # already failing: the first error is the one to report
                continue
            prepared = done[p.slot] if isinstance(done, list) else done
            if isinstance(prepared, Prepared) and prepared.stored is not None:  # None: a process handed a file back
                stored.append(prepared.stored)
        self.batch = _Batch()
        self._hash_index = None
        self.discard(stored)

    def note(self, key: str, text: str) -> None:
        if key not in self.noted:
            self.noted.add(key)
            self.result.notes.append(text)

    def wanted_category(self, cand: Candidate, sha: str) -> str | None:
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
        for key in cand.label_keys if self.labels or self.ambiguous else ():  # no CSV names: nothing to look up
            if not key:
                continue
            norm = norm_key(key)
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

    def wanted_sku(self, cand: Candidate, sha: str) -> str | None:
        """The labels CSV's SKU for this file (by content hash, then by name), else None. A hash or name listed with
        different SKUs gets none, and the import says so once."""
        if (found := self.skus_by_sha256.get(sha)) is not None:
            return found
        if sha in self.ambiguous_skus_sha256:
            self._ambiguous_sku(sha, f"{cand.name!r} (sha256 {sha[:12]}...)", self.ambiguous_skus_sha256[sha])
            return None
        for key in filter(None, cand.label_keys if self.skus or self.ambiguous_skus else ()):
            norm = norm_key(key)
            if (found := self.skus.get(norm)) is not None:
                return found
            if norm in self.ambiguous_skus:
                self._ambiguous_sku(norm, repr(norm), self.ambiguous_skus[norm])
                return None
        return None

    def _ambiguous_sku(self, key: str, what: str, listed: list[str]) -> None:
        skus = ", ".join(repr(s) for s in listed)
        self.note(f"sku:{key}", f"SKU not attached: {what} is listed with different SKUs in {self.csv_name} ({skus})")

    def checked_category(self, name: str) -> str:
        """The cleaned name of a live category (or a new one), else CategoryError.

        Cached per name, so an import of 10,000 files checks each name once; checked before any file is decoded or
        stored, so a file bound for an archived category leaves nothing behind.
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

    def find_stored(self, shas: Iterable[str]) -> dict[str, tuple[int, str]]:
        """sha256 -> (image id, original name) of the stored images among `shas` (one query per IN-chunk)."""
        wanted = sorted(set(shas))
        found: dict[str, tuple[int, str]] = {}
        if not wanted:
            return found
        with self.db.read() as session:
            for chunk in in_chunks(wanted):
                query = select(Image.sha256, Image.id, Image.original_name).where(Image.sha256.in_(chunk))
                found.update({sha: (image_id, name) for sha, image_id, name in session.execute(query)})
        return found

    def prepare(self, name: str, data: bytes, sha: str) -> Prepared:
        """`prepare_file` within this import's pixel budget (runs in a decode thread; touches no database)."""
        return prepare_file(self.settings, name, data, sha, self.decode_gate.slot)

    def start(self, p: _Pending) -> _Pending:
        """Decide what a read file needs (its group already looked up): nothing, or decoding on the pool."""
        if p.refusal is not None:
            return p
        wanted = self.wanted_category(p.cand, p.sha)
        try:
            p.category = self.checked_category(wanted) if wanted is not None else None
        except CategoryError as exc:
            p.refusal, p.data, p.size = f"invalid category {wanted!r}: {exc}", None, 0
            return p
        p.sku = self.wanted_sku(p.cand, p.sha)
        if p.sha in self.in_flight:
            p.same_as_in_flight = True
            return p
        p.existing = self.seen.get(p.sha) or self.stored_before.get(p.sha)
        if p.existing is None:
            self.in_flight.add(p.sha)
            assert p.data is not None  # read without a refusal: its bytes are held until submitted here
            if len(p.data) <= PROCESS_FILE_BYTES and self.worker_processes() is not None:
                p.chunk, p.slot = self.chunk, len(self.chunk.files)
                self.chunk.files.append(p)
                if len(self.chunk.files) >= PROCESS_CHUNK_FILES:
                    self.send_chunk()
                return p
            self.submit_to_thread(p)
        else:
            p.size = 0
            p.data = None
        return p

    def worker_processes(self) -> WorkerProcesses | None:
        """The worker processes for small files, started at the import's first small new file (an import of photos
        never starts them; `decode_processes` decides whether the import is large enough); None until they are up."""
        if not self.processes_asked:
            self.processes_asked = True
            self.processes = decode_processes(self.total, self.settings)
            if self.processes is not None:
                self.workers_stop.enter_context(self.processes)
        return self.processes if self.processes is not None and self.processes.ready() else None

    def submit_to_thread(self, p: _Pending) -> None:
        assert self.threads is not None and p.data is not None
        p.chunk, p.future = None, self.threads.submit(self.prepare, p.cand.name, p.data, p.sha)
        p.data = None

    def send_chunk(self) -> None:
        """Send the small files gathered so far to a worker process; to the threads once one has died."""
        chunk, self.chunk = self.chunk, _Chunk()
        if self.processes is not None:
            files = [(p.cand.name, p.data, p.sha) for p in chunk.files]
            try:
                chunk.future = self.processes.submit(prepare_in_process, files)
                return
            except BrokenProcessPool:  # a worker process died: the threads take the rest
                self.processes = None
        for p in chunk.files:
            self.submit_to_thread(p)

    def prepared(self, p: _Pending) -> Prepared:
        """What became of a submitted file. A worker process hands a large picture back (None) to be decoded here,
        within the pixel budget; when a worker process died (killed, out of memory), the file is done here and the
        rest of the import goes to the threads."""
        if p.chunk is not None and p.chunk.future is None:
            self.send_chunk()  # the file is needed now: its chunk goes as it is
        if p.chunk is None:  # a thread's
            assert p.future is not None
            return p.future.result()
        assert p.chunk.future is not None
        try:
            prepared = p.chunk.future.result()[p.slot]
        except BrokenProcessPool:
            self.processes = None
            prepared = None
        if isinstance(prepared, Exception):
            raise prepared
        if prepared is None:
            assert p.data is not None
            prepared = self.prepare(p.cand.name, p.data, p.sha)
        p.data = None
        return prepared

    def finish(self, p: _Pending | Skip | RefusedItem) -> None:
        """Put one item's outcome into the batch, in input order (writing the batch when it is full)."""
        if isinstance(p, Skip | RefusedItem):
            self.add(p)
            return
        name = p.cand.name
        if p.refusal is not None:
            self.add(RefusedItem(name, p.refusal))
            return
        if p.same_as_in_flight:
            existing = self.seen.get(p.sha)
            if existing is not None or p.sha in self.batch.new_by_sha:
                self.add(_Dup(p.cand, p.sha, p.category, existing, sku=p.sku))
                return
            # The earlier copy was refused: this one gets its own verdict (the same one, named after it).
            assert p.data is not None
            prepared = self.prepare(name, p.data, p.sha)
            p.data = None
        elif p.existing is not None:
            self.add(_Dup(p.cand, p.sha, p.category, p.existing, sku=p.sku))
            return
        else:
            prepared = self.prepared(p)
        if prepared.refusal is not None:
            self.in_flight.discard(p.sha)
            self.add(RefusedItem(name, prepared.refusal))
            return
        assert prepared.decoded is not None and prepared.stored is not None
        self.in_flight.add(p.sha)
        self.add(_New(p.cand, p.sha, p.category, prepared, sku=p.sku))

    def add(self, item: _Outcome) -> None:
        self.batch.add(item)
        if self.batch.full():
            self.write_batch()

    # ----------------------------------------------------------------------------------------------------------------
    # Writing a batch.

    def write_batch(self) -> None:
        """Write the batch's rows and labels in one transaction, then report its files in input order.

        Another import storing the same bytes meanwhile makes the transaction fail on the unique hash: it is written
        again with those files as duplicates of the rows now there. Any other failure propagates (run() removes the
        batch's files); a category archived since it was checked refuses only its files.
        """
        batch = self.batch
        if not batch.items:
            return
        written: dict[str, tuple[int, str]] = {}
        if not batch.writes():
            verdicts = [_without_writes(i) for i in batch.items]
        else:
            _ = self.hash_index  # loaded before the write lock is taken, on the first batch with new images
            flush_stored(self.settings, (n.prepared.stored for n in batch.new_by_sha.values() if n.prepared.stored))
            stored_meanwhile: dict[str, tuple[int, str]] = {}
            retries = 0
            while True:
                try:
                    with self.db.write() as session:
                        verdicts, written = _RowWriter(self, session, batch, stored_meanwhile).write()
                    break
                except IntegrityError:
                    self._hash_index = None  # it holds rows that were rolled back
                    found = self.find_stored(n.sha for n in batch.new_by_sha.values() if n.sha not in stored_meanwhile)
                    if not found:
                        raise
                    stored_meanwhile.update(found)
                except OperationalError as exc:
                    # PostgreSQL ends one of two transactions that wait for each other (two imports inserting the same
                    # files in different orders): the batch is written again, with whatever the other stored.
                    if getattr(exc.orig, "sqlstate", None) not in _RETRY_SQLSTATES or retries >= WRITE_RETRIES:
                        raise
                    retries += 1
                    self._hash_index = None
            for sha, existing in stored_meanwhile.items():
                written.setdefault(sha, existing)
        self.batch = _Batch()
        self.seen.update(written)
        self.in_flight.difference_update(batch.new_by_sha)
        # Files of new images refused here (their category was archived meanwhile) have no rows.
        self.discard(n.prepared.stored for n in batch.new_by_sha.values() if n.sha not in written and n.prepared.stored)
        for verdict in verdicts:
            if isinstance(verdict, ImportedItem):
                self.result.imported.append(verdict)
                self.tick(verdict.name)
            elif isinstance(verdict, DuplicateItem):
                self.result.duplicates.append(verdict)
                self.tick(verdict.name)
            elif isinstance(verdict, Skip):
                self.refuse(verdict.name, verdict.reason, verdict.count)
            else:
                self.refuse(verdict.name, verdict.reason)

    def attach_skus(self, session: Session, wanted: list[tuple[int, str, str]]) -> None:
        """Give stored images that files of this import duplicate the CSV's SKU where they have none yet, with an
        audit row each (audit_events); a different SKU already there is kept, and the import says so."""
        for image_id, sku, name in wanted:
            result = session.execute(update(Image).where(Image.id == image_id, Image.sku.is_(None)).values(sku=sku))
            assert isinstance(result, CursorResult)  # an UPDATE's result
            filled = result.rowcount
            if filled:
                record(session, self.actor, Action.UPLOAD, f"image {image_id}", field="sku", new=sku, file=name)
                continue
            have = session.scalar(select(Image.sku).where(Image.id == image_id))
            if have is not None and have != sku:
                self.note(
                    f"sku:{image_id}",
                    f"SKU {sku!r} not attached to {name!r}: it is a copy of image #{image_id}, whose SKU {have!r} "
                    "was kept (`images set-sku` changes it)",
                )

    def image_row(
        self, session: Session, cand: Candidate, sha: str, prepared: Prepared
    ) -> tuple[dict[str, object], str]:
        """The values of a new image's row (its files are already in place) and its split."""
        decoded, stored, phash, hashes = prepared.decoded, prepared.stored, prepared.phash, prepared.hashes
        assert decoded is not None and stored is not None
        # A near-duplicate (content hashes within the match rule's distance, confirmed by its pixels) joins the split of
        # the earliest image like it, so a resized, re-encoded, cropped or watermarked copy of a test image is never
        # trained on; it joins (or starts, or merges) their stored duplicate group.
        match = self.hash_index.near_duplicates(session, hashes) if hashes is not None else None
        split = match.split if match else str(split_for_hash(sha, self.settings.split_fractions))
        group_id = join_group(session, match.image_ids) if match is not None else None
        if match is None and phash is not None and self.any_unscanned(session):
            # Only images imported before the content hashes existed (not yet scanned) match by equal dHash:
            # among hashed ones, equal dHashes of distinct products are common (78 pairs in 2,000 FMNIST).
            unscanned = (Image.phash == phash) & Image.box_phash.is_(None)
            split = session.scalar(select(Image.split).where(unscanned).order_by(Image.id).limit(1)) or split
        row = {
            "sha256": sha,
            "stored_path": stored.original_rel,
            "thumb_path": stored.thumb_rel,
            "width": decoded.width,
            "height": decoded.height,
            "format": decoded.format,
            "file_size": decoded.file_size,
            "original_name": cand.name[:_MAX_NAME],
            "source": cand.source[:_MAX_NAME],
            "split": split,
            "uploaded_by": self.actor,
            "phash": phash,
            "box_dhash_h": hashes.dhash_h if hashes else None,
            "box_dhash_v": hashes.dhash_v if hashes else None,
            "box_phash": hashes.phash if hashes else None,
            "duplicate_group_id": group_id,
            "duplicates_checked": True,
        }
        return row, split

    def any_unscanned(self, session: Session) -> bool:
        """Whether the catalogue holds images from before the content hashes (asked once per import)."""
        if self._unscanned is None:
            query = select(Image.id).where(Image.phash.is_not(None), Image.box_phash.is_(None)).limit(1)
            self._unscanned = session.scalar(query) is not None
        return self._unscanned

    def label_state(self, session: Session, image_ids: Iterable[int]) -> tuple[set[int], set[int]]:
        """Which of these stored images still exist, and which of them are labelled (one query per IN-chunk)."""
        present: set[int] = set()
        labelled: set[int] = set()
        query = select(Image.id, Label.image_id).outerjoin(Label, Label.image_id == Image.id)
        for chunk in in_chunks(sorted(set(image_ids))):
            for image_id, label_of in session.execute(query.where(Image.id.in_(chunk))):
                present.add(image_id)
                if label_of is not None:
                    labelled.add(image_id)
        return present, labelled

    def discard(self, stored: Iterable[StoredFiles]) -> None:
        """Remove the originals and thumbnails this import wrote for images that got no row, unless a row of another
        import now points to the same bytes. Best effort: it runs while an error is already on its way."""
        wrote = [s for s in stored if s.wrote_original]
        if not wrote:
            return
        try:
            referenced = self.find_stored(s.sha256 for s in wrote)
        except Exception:  # the database itself is failing: no row of this import points to these files
            referenced = {}
        for files in wrote:
            if files.sha256 in referenced:
                continue
            for path in (files.original, files.thumb):
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass


class _RowWriter:
    """One batch's rows, labels and SKUs, written inside its transaction in input order (`Importer.write_batch`): the
    new images' rows (near-duplicates match the rows before them, within the batch too), and the labels and import
    events of new images and of unlabelled images that duplicates name a category for (a label already there is never
    overwritten). `write` returns the verdicts in input order and the rows written (sha256 -> id, original name).

    Rows go in with one multi-row INSERT ... RETURNING, written early only when a later file needs their ids (a copy,
    a near-duplicate, a duplicate's label): one statement per row would hand the interpreter lock to the decoding
    threads and wait to get it back after every row.
    """

    def __init__(
        self, importer: Importer, session: Session, batch: _Batch, stored_meanwhile: dict[str, tuple[int, str]]
    ) -> None:
        self.importer = importer
        self.session = session
        self.batch = batch
        self.stored_meanwhile = stored_meanwhile
        self.categories: dict[str, int | CategoryError] = {}
        stored_targets = [
            (i.existing if isinstance(i, _Dup) else None) or stored_meanwhile.get(i.sha)
            for i in batch.items
            if isinstance(i, _New | _Dup) and i.category is not None
        ]
        self.present, self.labelled = importer.label_state(session, {t[0] for t in stored_targets if t is not None})
        self.written: dict[str, tuple[int, str]] = {}
        self.new_rows: set[int] = set()
        self.verdicts: list[_Verdict | None] = []
        self.moves: list[LabelMove] = []  # labels of rows written here and of duplicates of them, in input order
        self.skus: list[tuple[int, str, str]] = []  # (stored image, SKU, file name) of duplicates given a SKU
        self.rows = _Rows()

    def write(self) -> tuple[list[_Verdict], dict[str, tuple[int, str]]]:
        for item in self.batch.items:
            if isinstance(item, RefusedItem | Skip):
                self.verdicts.append(item)
                continue
            if item.sha in self.rows.shas:  # a copy of a row not yet written: it needs its id
                self.write_pending_rows()
            target = (item.existing if isinstance(item, _Dup) else None) or self.stored_meanwhile.get(item.sha)
            target = target or self.written.get(item.sha)
            if target is not None:
                self.duplicate(item, target)
            else:
                self.new_image(item)
        self.write_moves()
        self.importer.attach_skus(self.session, self.skus)
        done = [v for v in self.verdicts if v is not None]
        assert len(done) == len(self.verdicts)  # write_pending_rows filled in every new row's slot
        return done, self.written

    def category_id(self, name: str) -> int | CategoryError:
        if name not in self.categories:
            try:
                self.categories[name] = get_or_create_category(self.session, name).id
            except CategoryError as exc:  # archived since checked_category
                self.categories[name] = exc
        return self.categories[name]

    def write_pending_rows(self) -> None:
        if not self.rows.values:
            return
        image_ids: Sequence[int] = self.session.execute(_INSERT_IMAGES, self.rows.values).scalars().all()
        for (slot, item, category, split, hashes), image_id in zip(self.rows.meta, image_ids, strict=True):
            self.written[item.sha] = (image_id, item.cand.name[:_MAX_NAME])
            self.new_rows.add(image_id)
            if hashes is not None:
                self.importer.hash_index.add(image_id, hashes, split)
            if category is not None:
                self.moves.append(LabelMove(image_id, None, category, note=item.cand.source))
                self.labelled.add(image_id)
            self.verdicts[slot] = ImportedItem(item.cand.name, image_id, item.category)
        self.rows.clear()

    def write_moves(self) -> None:
        self.write_pending_rows()
        apply_moves(self.session, self.moves, actor=self.importer.actor, action=LabelAction.IMPORT, batch_id=None)
        self.moves.clear()

    def duplicate(self, item: _New | _Dup, target: tuple[int, str]) -> None:
        """A file with the bytes of a stored image or of a row written here: its SKU and category go to that image,
        when it has none yet."""
        name = item.cand.name
        self.verdicts.append(DuplicateItem(name, target[0], target[1]))
        image_id = target[0]
        gone = image_id not in self.present and image_id not in self.new_rows  # deleted since it was looked up
        if item.sku is not None and not gone:
            self.skus.append((image_id, item.sku, name))
        if item.category is None or image_id in self.labelled or gone:
            return
        if image_id in self.new_rows:  # a row of this batch: unlabelled so far, so no need to look
            cat = self.category_id(item.category)
            if isinstance(cat, int):
                self.write_pending_rows()  # the labels of the rows before it come first
                self.moves.append(LabelMove(image_id, None, cat, note=name))
                self.labelled.add(image_id)
            return
        self.write_moves()  # as `apply_label` would have: one image after the other
        if self.session.get(Label, image_id) is None:
            cat = self.category_id(item.category)
            if isinstance(cat, int):
                apply_label(self.session, image_id, cat, actor=self.importer.actor, action="import", note=name)
        self.labelled.add(image_id)

    def new_image(self, item: _New | _Dup) -> None:
        """A new image, or the copy of one refused earlier in this batch, imported in its place: its row waits for
        the next multi-row INSERT."""
        cat = self.category_id(item.category) if item.category is not None else None
        if isinstance(cat, CategoryError):
            self.verdicts.append(RefusedItem(item.cand.name, f"invalid category {item.category!r}: {cat}"))
            return
        prepared = item.prepared if isinstance(item, _New) else self.batch.new_by_sha[item.sha].prepared
        if prepared.hashes is not None and self.rows.index.matches(prepared.hashes) is not None:
            self.write_pending_rows()  # a near-duplicate of a row not yet written: match it by its id
        row, split = self.importer.image_row(self.session, item.cand, item.sha, prepared)
        row["sku"] = item.sku
        self.rows.add(len(self.verdicts), item, cat, row, split, prepared.hashes)
        self.verdicts.append(None)  # filled in when the row is written
