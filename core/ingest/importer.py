"""The importer: reads candidates in order, decodes, validates and stores new files on a small thread pool, and writes
each image's row and label, reporting every file as imported, duplicate or refused with the reason."""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from core.db import Database
from core.duplicates import HashIndex, join_group, load_hash_index
from core.errors import CategoryError, ImageRefused
from core.imaging import ContentHashes, DecodedImage, content_hashes, difference_hash, inspect_and_decode
from core.ingest.candidates import Candidate, Refuse, Skip, norm_key
from core.ingest.decoding import DecodeGate
from core.ingest.labels_csv import LabelsCSV
from core.ingest.results import DuplicateItem, ImportedItem, ImportResult, ProgressCallback, RefusedItem
from core.ingest.zips import ZipCaps, ZipSource
from core.labels import apply_label, clean_actor, clean_category_name, get_or_create_category
from core.schema import Category, Image, Label
from core.splits import split_for_hash
from core.store import StoredFiles, store_image

_MAX_NAME = 500  # images.original_name / images.source column width
# Decode/store threads: Pillow and hashlib release the GIL, so two threads use two cores.
DECODE_THREADS = 4
# Bytes of files read ahead of the one whose row is written next (besides the window of 2 per thread): ten 200 MB
# files are not all held at once.
READ_AHEAD_BYTES = 256 * 1024 * 1024


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

    cand: Candidate
    category: str | None = None
    sha: str = ""
    refusal: str | None = None
    existing: tuple[int, str] | None = None  # a duplicate of an image already in the database
    same_as_in_flight: bool = False  # same bytes as an earlier file of this batch not yet committed
    data: bytes | None = None  # kept only for same_as_in_flight (re-done if the earlier copy was refused)
    future: Future[_Prepared] | None = None
    size: int = 0  # bytes read, held until the worker thread is done with them


class Importer:
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
        self.labels = {norm_key(k): v for k, v in (labels or {}).items()}
        table = labels if isinstance(labels, LabelsCSV) else LabelsCSV()
        self.labels_by_sha256 = table.by_sha256
        self.ambiguous = {norm_key(k): v for k, v in table.ambiguous.items()}
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
        self.decode_gate = DecodeGate(self.settings.max_image_pixels)
        self._hash_index: HashIndex | None = None  # loaded at the first new image, appended to as rows go in

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

    def _flatten(self, items: Iterable[Candidate | Skip | RefusedItem | ZipSource]) -> Iterator[object]:
        for item in items:
            if isinstance(item, ZipSource):
                yield from item.candidates()
            else:
                yield item

    def run(self, items: Iterable[Candidate | Skip | RefusedItem | ZipSource]) -> ImportResult:
        pending: deque[_Pending | Skip | RefusedItem] = deque()
        window = 2 * self.workers

        def held(items: deque[_Pending | Skip | RefusedItem]) -> int:
            return sum(p.size for p in items if isinstance(p, _Pending))

        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="ingest") as pool:
            try:
                for item in self._flatten(items):
                    # Read in the main thread, in order: zip budgets and progress stay sequential.
                    pending.append(self.start(item, pool) if isinstance(item, Candidate) else item)  # type: ignore[arg-type]
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
        for key in cand.label_keys:
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

    def start(self, cand: Candidate, pool: ThreadPoolExecutor) -> _Pending:
        p = _Pending(cand)
        try:
            data = cand.read()
        except Refuse as exc:
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

    def finish(self, p: _Pending | Skip | RefusedItem) -> None:
        if isinstance(p, Skip):
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
