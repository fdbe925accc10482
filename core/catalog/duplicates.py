"""Near-duplicate images: Hamming-distance matching of content hashes, groups, and "keep this one"."""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import Select, Subquery, case, func, select, update
from sqlalchemy.orm import Session

from core.catalog.deletion import DeletedImage, delete_images
from core.catalog.imaging import CONTENT_PIXELS_SIDE, ContentHashes, content_hashes, content_pixels, open_normalised
from core.catalog.store import original_path, thumbnail_path
from core.db import Database, in_chunks
from core.errors import DuplicateRefused, NotFound
from core.schema import Category, Image, Label
from core.settings import Settings

log = logging.getLogger(__name__)

_MASK = (1 << 64) - 1
_BLOCK = 1024  # rows compared at once when grouping: a 1024 x N distance block stays a few MB


@dataclass(frozen=True)
class MatchRule:
    """Two pictures are near-duplicates when the two dHashes of their content boxes differ in at most
    `max_dhash_bits` bits together AND their pHashes in at most `max_phash_bits` (no false pair among 2,000 distinct
    Fashion-MNIST train-set products) AND, pixel for pixel, their normalised 16x16 grey content boxes
    (`core.catalog.imaging.content_pixels`) differ by at most `max_pixel_difference` on average (`pixel_difference`):
    hashes of two lookalike products (a V-neck and a crew-neck pullover) can fall inside the rule where their pixels do
    not. Chosen by measurement (benchmarks/near_duplicates.py --parts pixels, on train-set products): the pixel check
    keeps
    99.5% of every kind of copy the hashes match and turns away about two thirds of the distinct lookalikes."""

    max_dhash_bits: int = 16
    max_phash_bits: int = 8
    max_pixel_difference: float = 0.26


DEFAULT_RULE = MatchRule()


def as_unsigned(values: Sequence[int | None] | np.ndarray) -> np.ndarray:
    """Signed 64-bit hashes as stored (None allowed, becomes 0) -> a uint64 array for XOR and popcount."""
    return np.array([0 if v is None else int(v) & _MASK for v in values], dtype=np.uint64)


@dataclass
class HashArrays:
    """Hashes of many images as aligned uint64 arrays (`ids` gives each row's image id)."""

    ids: np.ndarray
    dhash_h: np.ndarray
    dhash_v: np.ndarray
    phash: np.ndarray

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[int, int | None, int | None, int | None]]) -> HashArrays:
        """From (image id, dhash_h, dhash_v, phash) rows with the signed values the database holds (None -> 0)."""
        columns = list(zip(*rows, strict=True)) if rows else [(), (), (), ()]
        return cls(np.array(columns[0], dtype=np.int64), *(as_unsigned(c) for c in columns[1:]))

    def __len__(self) -> int:
        return len(self.ids)


def pixel_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute difference of normalised content pixels (`core.catalog.imaging.content_pixels`), row by row (the
    last axis): 0 for the same picture, about 0.01 after JPEG q=60, 0.05 after halving, up to 0.25 for a 5% corner crop;
    distinct products are usually far above 0.3. NaN where a row is NaN (pixels that could not be read)."""
    return np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean(axis=-1)


def match_mask(stored: HashArrays, query: ContentHashes, *, rule: MatchRule = DEFAULT_RULE) -> np.ndarray:
    """Which stored rows are near-duplicates of `query` (a bool array aligned with `stored`)."""
    h, v, p = as_unsigned([query.dhash_h, query.dhash_v, query.phash])
    dhash = np.bitwise_count(stored.dhash_h ^ h).astype(np.int16) + np.bitwise_count(stored.dhash_v ^ v)
    return (dhash <= rule.max_dhash_bits) & (np.bitwise_count(stored.phash ^ p) <= rule.max_phash_bits)


PairCheck = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Given two aligned arrays of row numbers (pairs whose hashes match), which pairs are near-duplicates (bool)."""


def hash_pairs(hashes: HashArrays, *, rule: MatchRule = DEFAULT_RULE) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of rows (a < b) whose hashes are within the rule's distances, as two aligned arrays of row numbers.

    Brute force in blocks: O(N^2) popcounts, about a second at 10k images on one core.
    """
    firsts, seconds = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for start in range(0, len(hashes), _BLOCK):
        rows = slice(start, start + _BLOCK)
        dhash = np.bitwise_count(hashes.dhash_h[rows, None] ^ hashes.dhash_h[None, :]).astype(np.int16)
        dhash += np.bitwise_count(hashes.dhash_v[rows, None] ^ hashes.dhash_v[None, :])
        close = (dhash <= rule.max_dhash_bits) & (
            np.bitwise_count(hashes.phash[rows, None] ^ hashes.phash[None, :]) <= rule.max_phash_bits
        )
        a, b = np.nonzero(close)
        a += start
        firsts.append(a[a < b])
        seconds.append(b[a < b])
    return np.concatenate(firsts), np.concatenate(seconds)


def group_labels(hashes: HashArrays, *, rule: MatchRule = DEFAULT_RULE, check: PairCheck | None = None) -> np.ndarray:
    """A group number per row (union-find over every matching pair, transitively); singletons get their own.

    Pairs whose hashes match (`hash_pairs`) and that `check` confirms (the pixel check, `PixelCheck.pair_check`;
    every hash match without it).
    """
    parent = np.arange(len(hashes))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    firsts, seconds = hash_pairs(hashes, rule=rule)
    if check is not None and firsts.size:
        confirmed = check(firsts, seconds)
        firsts, seconds = firsts[confirmed], seconds[confirmed]
    for a, b in zip(firsts.tolist(), seconds.tolist(), strict=True):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(i) for i in range(len(hashes))], dtype=np.int64)


@dataclass(frozen=True)
class IndexMatch:
    """The stored near-duplicates of a new image (ids ascending) and their splits; it joins the earliest's split."""

    image_ids: tuple[int, ...]
    splits: tuple[str, ...]

    @property
    def earliest(self) -> int:
        return self.image_ids[0]

    @property
    def split(self) -> str:
        return self.splits[0]

    def only(self, keep: Sequence[bool]) -> IndexMatch | None:
        """The match narrowed to the images `keep` says (aligned with `image_ids`); None when none is kept."""
        kept = [(i, s) for i, s, k in zip(self.image_ids, self.splits, keep, strict=True) if k]
        return IndexMatch(tuple(i for i, _ in kept), tuple(s for _, s in kept)) if kept else None


class HashIndex:
    """The stored hashes an import batch matches against: loaded once, appended to as rows are inserted. With a
    `pixels` check, the pixels of the rows appended are kept there, so a later copy in the same import needs no
    thumbnail read (a new index, after a rolled-back batch, starts a new check)."""

    def __init__(
        self,
        stored: HashArrays,
        splits: Sequence[str],
        *,
        rule: MatchRule = DEFAULT_RULE,
        pixels: PixelCheck | None = None,
    ) -> None:
        self.rule = rule
        self.pixels = pixels
        self._size = len(stored)
        capacity = max(1024, 2 * self._size)
        self._ids = np.zeros(capacity, dtype=np.int64)
        self._columns = [np.zeros(capacity, dtype=np.uint64) for _ in range(3)]
        self._ids[: self._size] = stored.ids
        for column, values in zip(self._columns, (stored.dhash_h, stored.dhash_v, stored.phash), strict=True):
            column[: self._size] = values
        self._splits = list(splits)

    def __len__(self) -> int:
        return self._size

    def near_duplicates(self, session: Session, query: ContentHashes) -> IndexMatch | None:
        """The stored near-duplicates of `query`: the hash matches (`matches`) whose pixels agree too, when the index
        has a pixel check (`session`, the insert's transaction, finds the thumbnails of rows written in it)."""
        match = self.matches(query)
        return self.pixels.confirmed(session, match, query) if match is not None and self.pixels else match

    def matches(self, query: ContentHashes) -> IndexMatch | None:
        """Every stored image whose hashes match `query`'s, with its split, or None."""
        n = self._size
        view = HashArrays(self._ids[:n], *(c[:n] for c in self._columns))
        found = np.flatnonzero(match_mask(view, query, rule=self.rule))
        if found.size == 0:
            return None
        found = found[np.argsort(view.ids[found], kind="stable")]
        return IndexMatch(tuple(int(i) for i in view.ids[found]), tuple(self._splits[int(r)] for r in found))

    def add(self, image_id: int, query: ContentHashes, split: str) -> None:
        """Remember a newly inserted image, so later files of the same batch match it too."""
        if self._size == len(self._ids):
            self._ids = np.concatenate([self._ids, np.zeros_like(self._ids)])
            self._columns = [np.concatenate([c, np.zeros_like(c)]) for c in self._columns]
        self._ids[self._size] = image_id
        for column, value in zip(self._columns, as_unsigned([query.dhash_h, query.dhash_v, query.phash]), strict=True):
            column[self._size] = value
        self._splits.append(split)
        self._size += 1
        if self.pixels is not None:
            self.pixels.remember(image_id, query.pixels)


@dataclass
class ThumbnailRow:
    """What the pixel check needs of a stored image: its id and stored files (`core.catalog.store.thumbnail_path`)."""

    id: int
    stored_path: str
    thumb_path: str


_PIXELS = CONTENT_PIXELS_SIDE**2
_UNKNOWN = np.full(_PIXELS, np.nan, dtype=np.float32)  # pixels that could not be read: the hash match stands


class PixelCheck:
    """The second test of a hash match: do the two content boxes look alike pixel for pixel (`MatchRule`)? A new
    image's pixels come with its hashes; a stored image's are made again from its thumbnail file (about 1 ms, only
    for images whose hashes matched). The last `cache_size` are kept by image id, so one object serves one import or
    one scan: 1 KiB each, in one anonymous memory map whose pages become resident as slots fill (small arrays kept
    for a whole import pinned the heap that decoding grows and frees, +9 MiB peak RSS over 300 photos; a numpy block
    this size is backed by huge pages, +4 MiB). A thumbnail that cannot be read leaves the hash match standing, as
    before this check existed (logged)."""

    def __init__(self, settings: Settings, *, rule: MatchRule = DEFAULT_RULE, cache_size: int = 4096) -> None:
        self.settings = settings
        self.rule = rule
        self._cache_size = cache_size
        block = mmap.mmap(-1, cache_size * _PIXELS * np.dtype(np.float32).itemsize)
        self._slots = np.frombuffer(block, dtype=np.float32).reshape(cache_size, _PIXELS)
        self._owners = [0] * cache_size  # the image id in each slot (0: none; ids start at 1)
        self._slot_of: dict[int, int] = {}
        self._filled = 0

    def remember(self, image_id: int, pixels: np.ndarray) -> None:
        """Keep an image's pixels (the oldest kept are forgotten first)."""
        slot = self._slot_of.get(image_id)
        if slot is None:
            slot = self._filled % self._cache_size
            self._filled += 1
            self._slot_of.pop(self._owners[slot], None)
            self._owners[slot] = image_id
            self._slot_of[image_id] = slot
        self._slots[slot] = pixels

    def _kept(self, image_id: int) -> np.ndarray | None:
        slot = self._slot_of.get(image_id)
        return None if slot is None else self._slots[slot].copy()

    def pixels(self, session: Session, image_ids: Sequence[int]) -> np.ndarray:
        """The `content_pixels` of these images (one row each), those not kept read from their thumbnails (one
        SELECT); NaN rows for thumbnails that cannot be read and for images deleted meanwhile."""
        known = {i: kept for i in image_ids if (kept := self._kept(i)) is not None}
        if missing := [i for i in dict.fromkeys(image_ids) if i not in known]:
            found: dict[int, ThumbnailRow] = {}
            for chunk in in_chunks(missing):
                query = select(Image.id, Image.stored_path, Image.thumb_path).where(Image.id.in_(chunk))
                found.update((r.id, ThumbnailRow(r.id, r.stored_path, r.thumb_path)) for r in session.execute(query))
            for image_id in missing:
                known[image_id] = self._read(found[image_id]) if image_id in found else _UNKNOWN
                self.remember(image_id, known[image_id])
        return np.stack([known[i] for i in image_ids])

    def _read(self, row: ThumbnailRow) -> np.ndarray:
        try:
            return content_pixels(open_normalised(thumbnail_path(self.settings, row)))
        except (OSError, ValueError) as exc:
            log.warning("image %d: thumbnail %r unreadable (%s): its hash match stands", row.id, row.thumb_path, exc)
            return _UNKNOWN

    def confirmed(self, session: Session, match: IndexMatch, query: ContentHashes) -> IndexMatch | None:
        """The images of a hash match whose pixels agree with `query`'s (read in `session`, which sees rows written
        in its transaction); None when none does."""
        return match.only(self.agree(self.pixels(session, match.image_ids), query.pixels).tolist())

    def agree(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Which rows of `a` and `b` pass the pixel test (NaN rows, pixels that could not be read, pass)."""
        difference = pixel_difference(a, b)
        return np.isnan(difference) | (difference <= self.rule.max_pixel_difference)

    def pair_check(self, db: Database, ids: np.ndarray) -> PairCheck:
        """A `group_labels` check for rows whose image ids are `ids`: reads the thumbnails of the images in
        hash-matched pairs (once each, in chunks of `cache_size`) and keeps the pairs whose pixels agree."""

        def check(firsts: np.ndarray, seconds: np.ndarray) -> np.ndarray:
            rows = np.unique(np.concatenate([firsts, seconds]))
            pixels = np.empty((len(rows), _PIXELS), dtype=np.float32)
            with db.read() as session:
                for start in range(0, len(rows), self._cache_size):
                    chunk = rows[start : start + self._cache_size]
                    pixels[start : start + len(chunk)] = self.pixels(session, ids[chunk].tolist())
            return self.agree(pixels[np.searchsorted(rows, firsts)], pixels[np.searchsorted(rows, seconds)])

        return check


def load_hash_index(db: Database, *, rule: MatchRule = DEFAULT_RULE) -> HashIndex:
    """Every stored image with content hashes, for matching new imports (one query per batch), with a pixel check."""
    with db.read() as session:
        rows = session.execute(
            select(Image.id, Image.box_dhash_h, Image.box_dhash_v, Image.box_phash, Image.split)
            .where(Image.box_phash.is_not(None))
            .order_by(Image.id)
        ).all()
    stored = HashArrays.from_rows([(r[0], r[1], r[2], r[3]) for r in rows])
    return HashIndex(stored, [r[4] for r in rows], rule=rule, pixels=PixelCheck(db.settings, rule=rule))


@dataclass(frozen=True)
class BackfillResult:
    """What `backfill_hashes` did: images hashed, and (image id, reason) for originals it could not read."""

    hashed: int
    unreadable: list[tuple[int, str]]


def backfill_hashes(db: Database, *, batch: int = 500) -> BackfillResult:
    """Content hashes for images imported before they existed, from their stored originals (decoded as ingest
    decodes them). Only the hash columns are written: an image's split never changes here. Images already checked
    without hashes (plain pictures, whose content has no structure to hash) are not decoded again."""
    with db.read() as session:
        todo = session.execute(
            select(Image.id, Image.stored_path, Image.thumb_path)
            .where(Image.box_phash.is_(None), Image.duplicates_checked.is_(False))  # a checked one is a plain picture
            .order_by(Image.id)
        ).all()
    hashed, unreadable = 0, []
    for chunk in in_chunks(todo, batch):
        values: list[tuple[int, ContentHashes]] = []
        for row in chunk:
            try:
                img = open_normalised(original_path(db.settings, row), target_size=db.settings.thumbnail_size)
            except (OSError, ValueError) as exc:
                unreadable.append((row.id, str(exc)))
                continue
            if (hashes := content_hashes(img)) is not None:
                values.append((row.id, hashes))
        _write_hashes(db, values)
        hashed += len(values)
    return BackfillResult(hashed, unreadable)


def _write_hashes(db: Database, values: Sequence[tuple[int, ContentHashes]]) -> None:
    with db.write() as session:
        for image_id, h in values:
            session.execute(
                update(Image)
                .where(Image.id == image_id)
                .values(box_dhash_h=h.dhash_h, box_dhash_v=h.dhash_v, box_phash=h.phash)
            )


# --- stored groups -------------------------------------------------------------------------------------------------


def join_group(session: Session, matched_ids: Sequence[int]) -> int | None:
    """The group id for a new image that matches these stored images, inside the write transaction that inserts it.

    The group is the union of the matched images and every group they belong to; its id is the earliest image's id
    (so a new image bridging two groups merges them into the older id). Matched images in no group yet join it, and
    the members of any other group are re-pointed. None when every matched image has been deleted meanwhile.
    """
    found: list[tuple[int, int | None]] = []
    for chunk in in_chunks(list(matched_ids)):
        found += [
            (r[0], r[1]) for r in session.execute(select(Image.id, Image.duplicate_group_id).where(Image.id.in_(chunk)))
        ]
    if not found:
        return None
    group_id = min(g if g is not None else i for i, g in found)
    loners = [i for i, g in found if g is None]
    others = sorted({g for _, g in found if g is not None and g != group_id})
    # Usually nothing to write: a later copy matches images already in one group. No loaded objects to keep in step.
    regroup = update(Image).values(duplicate_group_id=group_id).execution_options(synchronize_session=False)
    for chunk in in_chunks(loners):
        session.execute(regroup.where(Image.id.in_(chunk)))
    for chunk in in_chunks(others):
        session.execute(regroup.where(Image.duplicate_group_id.in_(chunk)))
    return group_id


@dataclass(frozen=True)
class ScanResult:
    """What `scan_duplicates` did: hashes filled, originals it could not read, and the groups it stored."""

    hashed: int
    unreadable: list[tuple[int, str]]
    images_compared: int
    counts: DuplicateCounts


def scan_duplicates(db: Database, *, rule: MatchRule = DEFAULT_RULE) -> ScanResult:
    """Fill missing content hashes (`backfill_hashes`), then group the whole catalogue by comparing every pair and
    store each image's group id: the one all-pairs computation (about a second at 10k images, minutes at 100k),
    for databases from before the stored groups or the pixel check, and after changing the match rule. Hash matches
    are confirmed by their pixels (`PixelCheck`: the thumbnails of the images in them are read once each). Splits are
    never changed.

    Images imported while it runs (ids above the last one read) keep the group ingest gave them.
    """
    filled = backfill_hashes(db)
    with db.read() as session:
        last_id = session.scalar(select(func.max(Image.id))) or 0
        rows = session.execute(
            select(Image.id, Image.box_dhash_h, Image.box_dhash_v, Image.box_phash)
            .where(Image.box_phash.is_not(None), Image.id <= last_id)
            .order_by(Image.id)
        ).all()
    hashes = HashArrays.from_rows([(r[0], r[1], r[2], r[3]) for r in rows])
    labels = group_labels(hashes, rule=rule, check=PixelCheck(db.settings, rule=rule).pair_check(db, hashes.ids))
    sizes = np.bincount(labels, minlength=len(labels))
    grouped = np.flatnonzero(sizes[labels] > 1)
    assignments = [{"id": int(hashes.ids[i]), "duplicate_group_id": int(hashes.ids[labels[i]])} for i in grouped]
    unreadable_ids = [image_id for image_id, _ in filled.unreadable]
    with db.write() as session:
        session.execute(
            update(Image).where(Image.id <= last_id).values(duplicate_group_id=None, duplicates_checked=True)
        )
        for chunk in in_chunks(unreadable_ids):
            session.execute(update(Image).where(Image.id.in_(chunk)).values(duplicates_checked=False))
        if assignments:
            session.execute(update(Image), assignments)  # ORM bulk UPDATE by primary key (executemany)
    return ScanResult(filled.hashed, filled.unreadable, len(hashes), duplicate_counts(db))


# --- groups for people --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DuplicateCounts:
    """How many near-duplicate groups the catalogue holds, how many images are in them, how many span splits."""

    groups: int
    images: int
    straddling: int


@dataclass(frozen=True)
class GroupMember:
    """One image of a duplicate group, with what a person needs to choose which to keep."""

    image_id: int
    name: str
    split: str
    label: str | None
    thumb_path: Path  # absolute, for display
    width: int
    height: int
    file_size: int


@dataclass(frozen=True)
class DuplicateGroup:
    """Near-duplicate images (oldest first). `group_id` is the oldest member's image id."""

    group_id: int
    members: list[GroupMember] = field(default_factory=list)

    @property
    def splits(self) -> list[str]:
        return sorted({m.split for m in self.members})

    @property
    def straddles_splits(self) -> bool:
        """True for groups imported before the hashes existed: splits are fixed, so they stay as they are."""
        return len(self.splits) > 1


@dataclass(frozen=True)
class DuplicateReport:
    """One page of the stored groups (groups spanning splits first, then the biggest, then the newest), the
    catalogue's counts, and how many images have not been checked yet (`duplicates scan` checks them)."""

    groups: list[DuplicateGroup]
    counts: DuplicateCounts
    unchecked: int
    page: int
    page_size: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.counts.groups // self.page_size))


def _group_stats() -> Subquery:
    """One row per stored group: its id, size, whether it spans splits and its newest image (an index-only scan)."""
    return (
        select(
            Image.duplicate_group_id.label("group_id"),
            func.count().label("size"),
            case((func.count(Image.split.distinct()) > 1, 1), else_=0).label("straddles"),
            func.max(Image.id).label("newest"),
        )
        .where(Image.duplicate_group_id.is_not(None))
        .group_by(Image.duplicate_group_id)
        .subquery()
    )


def duplicate_counts(db: Database) -> DuplicateCounts:
    """Groups, grouped images and groups spanning splits, from the stored group ids (one SQL query)."""
    stats = _group_stats()
    query = select(
        func.count(), func.coalesce(func.sum(stats.c.size), 0), func.coalesce(func.sum(stats.c.straddles), 0)
    )
    with db.read() as session:
        totals: tuple[int, int, int] = session.execute(query.select_from(stats)).one()
        groups, images, straddling = totals
    return DuplicateCounts(groups=int(groups), images=int(images), straddling=int(straddling))


def unchecked_images(db: Database) -> int:
    """Images whose group has not been worked out (from before the stored groups, or unreadable at the last scan)."""
    with db.read() as session:
        return session.scalar(select(func.count()).select_from(Image).where(Image.duplicates_checked.is_(False))) or 0


def duplicate_groups(db: Database, *, page: int = 1, page_size: int = 10) -> DuplicateReport:
    """One page of the stored near-duplicate groups, members oldest first: groups that span splits first, then
    the biggest, then the newest. Paginated in SQL, so a page costs the same at 100k images as at 1k. A page past
    the end (groups resolved since it was chosen) gives the last page; `report.page` says which was given."""
    if page < 1 or page_size < 1:
        raise ValueError(f"page and page_size start at 1 (got page {page}, page_size {page_size})")
    counts = duplicate_counts(db)
    page = min(page, max(1, -(-counts.groups // page_size)))
    stats = _group_stats()
    query: Select[int] = (
        select(stats.c.group_id)
        .order_by(stats.c.straddles.desc(), stats.c.size.desc(), stats.c.newest.desc())
        .limit(page_size)
        .offset((page - 1) * page_size)
    )
    with db.read() as session:
        group_ids = [int(g) for g in session.scalars(query)]
        rows = session.execute(
            select(Image, Category.name)
            .outerjoin(Label, Label.image_id == Image.id)
            .outerjoin(Category, Category.id == Label.category_id)
            .where(Image.duplicate_group_id.in_(group_ids))
            .order_by(Image.id)
        ).all()
        by_group: dict[int, list[GroupMember]] = {g: [] for g in group_ids}
        for image, label in rows:
            member = GroupMember(
                image.id, image.original_name, image.split, label, thumbnail_path(db.settings, image),
                image.width, image.height, image.file_size,
            )  # fmt: skip
            assert image.duplicate_group_id is not None  # the query selects members of `group_ids` only
            by_group[image.duplicate_group_id].append(member)
    groups = [DuplicateGroup(g, by_group[g]) for g in group_ids]
    return DuplicateReport(groups, counts, unchecked_images(db), page, page_size)


def keep_one(db: Database, group_image_ids: Sequence[int], keep_id: int, *, actor: str) -> list[DeletedImage]:
    """Keep `keep_id` and delete the other images of its group, each with an audit row naming the kept image; the
    kept image leaves the stored group when it is the only one left (`delete_images` regroups).

    Refuses a keep id outside the group, a group of fewer than two images, and ids that no longer exist (someone
    else resolved the group first): nothing is deleted then.
    """
    ids = list(dict.fromkeys(int(i) for i in group_image_ids))
    if keep_id not in ids:
        raise DuplicateRefused(f"image {keep_id} is not in this group ({', '.join(map(str, ids))}): nothing deleted")
    if len(ids) < 2:
        raise DuplicateRefused("a group needs at least two images to keep one: nothing deleted")
    with db.read() as session:
        present = set(session.scalars(select(Image.id).where(Image.id.in_(ids))))
    if missing := [i for i in ids if i not in present]:
        raise NotFound(f"image(s) {', '.join(map(str, missing))} no longer exist: reload the duplicates and try again")
    others = [i for i in ids if i != keep_id]
    return delete_images(db, others, actor=actor, reason=f"duplicate of image {keep_id} (kept)")
