"""Disk caches of per-image arrays (model-sized pixels, backbone features), grown incrementally, keyed by sha256.

Each cache is one folder holding a raw fixed-row-size data file (memory-mapped for reading) and a JSON index
mapping image sha256 -> row. Rows are only ever appended, so an image is decoded (or a feature computed) once
per configuration. Nothing is pickled. Two processes may grow the same cache: rows are computed without any lock,
an `fcntl.flock` on a lock file is held only to re-read the index and append one chunk, and the index is replaced
atomically so readers never see a half-written one. Large reads go through `CachedRows`, a lazy view that copies
rows into memory only when a batch of them is indexed.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from core.db import Database, in_chunks
from core.errors import ImageRefused, NotFound
from core.schema import Image
from core.settings import Settings

# progress(done, total)
CacheProgress = Callable[[int, int], None]

INDEX_NAME = "index.json"
DATA_NAME = "rows.bin"
LOCK_NAME = "lock"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class CachedRows:
    """Cached rows in a chosen order, read from the memory-mapped data file only when indexed.

    `rows[a:b]`, `rows[index_array]` and `rows[i]` return ordinary arrays holding just those rows, so a loop can
    take batches from a whole split without the split being copied into memory; `len`, `shape`, `ndim` and `dtype`
    are the gathered array's. `np.asarray(rows)` does copy everything (for small sets and tests).
    """

    def __init__(self, mapped: np.ndarray, positions: np.ndarray) -> None:
        self.mapped = mapped  # np.memmap of the data file's rows (an empty array when the cache is empty)
        self.positions = np.asarray(positions, dtype=np.int64).reshape(-1)  # row in `mapped` of each item

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.positions), *self.mapped.shape[1:])

    @property
    def ndim(self) -> int:
        return self.mapped.ndim

    @property
    def dtype(self) -> np.dtype:
        return self.mapped.dtype

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """A copy of the rows at these item positions (an int gives one row, anything else a stack of rows)."""
        picked = self.positions[key]
        # Fancy indexing reads just these rows from the map into a new array.
        return np.array(self.mapped[picked]) if np.ndim(picked) == 0 else np.asarray(self.mapped[picked])

    def subset(self, items: Sequence[int] | np.ndarray) -> CachedRows:
        """A lazy view of some of these items (in the order given), still reading nothing."""
        return CachedRows(self.mapped, self.positions[np.asarray(items, dtype=np.int64)])

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("cached rows are read from the file: they cannot be viewed without a copy")
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype, copy=False)


_PARSED_INDEXES: dict[tuple[str, str], tuple[tuple[int, int, int], dict[str, int]]] = {}
_MAX_PARSED_INDEXES = 8


def _remember_index(key: tuple[str, str], stamp: tuple[int, int, int], rows: dict[str, int]) -> None:
    while len(_PARSED_INDEXES) >= _MAX_PARSED_INDEXES:
        _PARSED_INDEXES.pop(next(iter(_PARSED_INDEXES)))
    _PARSED_INDEXES[key] = (stamp, rows)


class RowStore:
    """An append-only table of fixed-shape rows (one per key) on disk: raw data file + JSON index + lock file."""

    def __init__(self, folder: Path, *, dtype: str, row_shape: tuple[int, ...], meta: dict[str, Any]) -> None:
        self.folder = folder
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(int(d) for d in row_shape)
        # Identifies the content: an index written for another shape/dtype/config is treated as corrupt.
        self.meta = {**meta, "dtype": self.dtype.str, "row_shape": list(self.row_shape)}
        self.row_bytes = int(self.dtype.itemsize * math.prod(self.row_shape))
        self.data_path = folder / DATA_NAME
        self.index_path = folder / INDEX_NAME
        self.lock_path = folder / LOCK_NAME

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock across processes for the duration of a growth step."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def read_index(self) -> dict[str, int]:
        """key -> row. A missing, unreadable or inconsistent index (or data file) gives an empty index, so the
        cache is rebuilt rather than serving wrong rows.

        The parsed index is kept per process until the file is replaced (its inode, time and size change with every
        write): a 100k-row index is megabytes of JSON, and prediction reads it once per batch."""
        try:
            stat = self.index_path.stat()
            key = (str(self.index_path), json.dumps(self.meta, sort_keys=True))
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            known = _PARSED_INDEXES.get(key)
            if known is not None and known[0] == stamp:
                rows = known[1]
            else:
                rows = self._parse_index()
                _remember_index(key, stamp, rows)
            if rows and self.data_path.stat().st_size < len(rows) * self.row_bytes:
                return {}
            return dict(rows)
        except OSError:
            return {}

    def _parse_index(self) -> dict[str, int]:
        """The index file's rows, checked; {} when it is unreadable, another cache's, or not rows 0..n-1."""
        try:
            raw = json.loads(self.index_path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict) or raw.get("meta") != self.meta:
                return {}
            rows = raw["rows"]
            if not isinstance(rows, dict) or not all(isinstance(v, int) for v in rows.values()):
                return {}
            # Rows must be exactly 0..count-1 (and, checked on every read, all present in the data file).
            if sorted(rows.values()) != list(range(len(rows))):
                return {}
            return {str(k): int(v) for k, v in rows.items()}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def _write_index(self, rows: dict[str, int]) -> None:
        tmp = self.index_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"meta": self.meta, "rows": rows}), encoding="utf-8")
        os.replace(tmp, self.index_path)

    def append(self, index: dict[str, int], keys: Sequence[str], rows: np.ndarray) -> dict[str, int]:
        """Append rows for new keys (caller holds the lock and passes the index it read under the lock)."""
        if len(keys) == 0:
            return index
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape != (len(keys), *self.row_shape):
            raise ValueError(f"rows of shape {rows.shape} do not fit a cache of rows {self.row_shape}")
        start = len(index)
        mode = "r+b" if self.data_path.exists() else "w+b"
        with open(self.data_path, mode) as handle:
            # Bytes past the indexed rows belong to a growth that died before writing its index: overwrite them.
            handle.truncate(start * self.row_bytes)
            handle.seek(start * self.row_bytes)
            handle.write(rows.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        new_index = dict(index)
        for offset, key in enumerate(keys):
            new_index[key] = start + offset
        self._write_index(new_index)
        return new_index

    def reset(self) -> None:
        """Forget every row (used when the index was found corrupt)."""
        if self.data_path.exists():
            self.data_path.unlink()
        self._write_index({})

    def view(self, count: int) -> np.ndarray:
        """Memory map of the first `count` rows (writes stay in memory)."""
        if count == 0:
            return np.empty((0, *self.row_shape), dtype=self.dtype)
        # Copy-on-write: callers (torch.from_numpy) may need a writable array; the file is never changed by it.
        return np.memmap(self.data_path, dtype=self.dtype, mode="c", shape=(count, *self.row_shape))

    def rows(self, index: dict[str, int], keys: Sequence[str]) -> CachedRows:
        """A lazy view of the rows for `keys` in that order (nothing is read until it is indexed)."""
        positions = np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))
        return CachedRows(self.view(len(index)), positions)

    def gather(self, index: dict[str, int], keys: Sequence[str]) -> np.ndarray:
        """Rows for `keys` in that order (a memory-mapped slice when they are already contiguous, else a copy)."""
        lazy = self.rows(index, keys)
        positions = lazy.positions
        if len(positions) and np.array_equal(positions, np.arange(positions[0], positions[0] + len(positions))):
            return lazy.mapped[positions[0] : positions[0] + len(positions)]
        return lazy[:]

    def fill(
        self,
        keys: Sequence[str],
        compute: Callable[[Sequence[str]], np.ndarray],
        *,
        chunk: int = 256,
        progress: CacheProgress | None = None,
    ) -> dict[str, int]:
        """Cache the rows of the keys not cached yet, `chunk` at a time; returns an index holding every key.

        Each chunk is computed outside the lock; the lock is taken only to re-read the index and append the chunk
        (less any key another process appended meanwhile), so another process asking for one new row waits for at
        most one append, not for the whole growth.
        """
        index = self.read_index()
        missing = _unique([k for k in keys if k not in index])
        for start in range(0, len(missing), chunk):
            part = [k for k in missing[start : start + chunk] if k not in index]
            if part:
                computed = compute(part)
                with self.locked():
                    index = self.read_index()
                    if not index and self.index_path.exists():
                        # Corrupt or foreign index: start over (rows cannot be trusted without it).
                        self.reset()
                    new = [n for n, key in enumerate(part) if key not in index]
                    index = self.append(index, [part[n] for n in new], np.asarray(computed)[new])
            if progress is not None:
                progress(min(start + chunk, len(missing)), len(missing))
        return index

    def get_or_compute(
        self,
        keys: Sequence[str],
        compute: Callable[[Sequence[str]], np.ndarray],
        *,
        chunk: int = 256,
        progress: CacheProgress | None = None,
    ) -> np.ndarray:
        """Rows for `keys` (in order, gathered into memory), computing only the keys not cached yet."""
        return self.gather(self.fill(keys, compute, chunk=chunk, progress=progress), keys)


def _unique(keys: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(keys))


def _slug(value: object) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(value)).strip("-") or "x"


class PixelCache:
    """Model-sized uint8 pixels (N,S,S,3) of stored images for one preprocessing config (size, crop, resampling).

    A different image size, crop or interpolation is a different folder, so a changed config never reuses rows.
    """

    def __init__(self, settings: Settings, image_size: int, crop_pct: float = 0.875, interpolation: str = "bicubic"):
        from models.preprocess import PreprocessConfig

        self.settings = settings
        self.image_size = int(image_size)
        self.crop_pct = float(crop_pct)
        self.interpolation = str(interpolation)
        # Mean/std only matter when pixels become tensors, never for the cached uint8 pixels.
        self.config = PreprocessConfig(
            image_size=self.image_size,
            mean=_IMAGENET_MEAN,
            std=_IMAGENET_STD,
            crop_pct=self.crop_pct,
            interpolation=self.interpolation,
        )
        name = f"{self.image_size}_{_slug(round(self.crop_pct, 4))}_{_slug(self.interpolation)}"
        self.folder = settings.cache_dir / "pixels" / name
        self.store = RowStore(
            self.folder,
            dtype="uint8",
            row_shape=(self.image_size, self.image_size, 3),
            meta={"image_size": self.image_size, "crop_pct": self.crop_pct, "interpolation": self.interpolation},
        )
        self.decodes = 0  # images decoded by this instance (tests count them)

    @classmethod
    def for_config(cls, settings: Settings, cfg: Any) -> PixelCache:
        """The cache for a models.factory.PreprocessConfig."""
        return cls(settings, cfg.image_size, cfg.crop_pct, cfg.interpolation)

    def ensure(self, db: Database, image_ids: Sequence[int], progress: CacheProgress | None = None) -> np.ndarray:
        """Pixels (N,S,S,3) uint8 for these images in the order asked; decodes only images not cached yet.

        A memory-mapped slice when the rows lie in order in the file, else a copy of every row: for more images than
        a batch, use `rows` (a lazy view) or `fill` instead.
        """
        index, shas = self._fill(db, image_ids, progress)
        return self.store.gather(index, shas)

    def fill(self, db: Database, image_ids: Sequence[int], progress: CacheProgress | None = None) -> None:
        """Decode into the cache the images not cached yet, reading no pixels back."""
        self._fill(db, image_ids, progress)

    def rows(self, db: Database, image_ids: Sequence[int], progress: CacheProgress | None = None) -> CachedRows:
        """A lazy (N,S,S,3) uint8 view of these images' pixels in the order asked (filling the cache first):
        indexing it reads only the rows asked for, so whole splits can be used without holding them in memory."""
        index, shas = self._fill(db, image_ids, progress)
        return self.store.rows(index, shas)

    def _fill(
        self, db: Database, image_ids: Sequence[int], progress: CacheProgress | None
    ) -> tuple[dict[str, int], list[str]]:
        """(index holding every image, sha256 of each image in order) after decoding the images not cached yet."""
        ids = [int(i) for i in image_ids]
        found: dict[int, tuple[str, str, str]] = {}
        with db.read() as session:
            for part in in_chunks(ids):
                query = select(Image.id, Image.sha256, Image.stored_path, Image.original_name).where(Image.id.in_(part))
                for row in session.execute(query):
                    found[row.id] = (row.sha256, row.stored_path, row.original_name)
        absent = [i for i in ids if i not in found]
        if absent:
            raise NotFound(f"no image with id {', '.join(map(str, absent[:10]))}")
        by_sha = {sha: (path, name, image_id) for image_id, (sha, path, name) in found.items()}

        def compute(shas: Sequence[str]) -> np.ndarray:
            out = np.empty((len(shas), self.image_size, self.image_size, 3), dtype=np.uint8)
            for i, sha in enumerate(shas):
                path, name, image_id = by_sha[sha]
                out[i] = self.decode(self.settings.data_dir / path, f"image {image_id} ({name})")
            return out

        shas = [found[i][0] for i in ids]
        return self.store.fill(shas, compute, progress=progress), shas

    def decode(self, path: Path, name: str) -> np.ndarray:
        """The model pixels of one stored original: the same path prediction of loose files takes."""
        from core.catalog.imaging import open_normalised
        from models.preprocess import to_model_pixels

        self.decodes += 1
        target = math.ceil(self.image_size / max(self.crop_pct, 1e-6))
        try:
            rgb = open_normalised(path, target_size=target)
        except ImageRefused:
            raise
        except (OSError, ValueError) as exc:
            raise ImageRefused(name, f"the stored original {path} cannot be read ({exc}); re-import it") from exc
        return to_model_pixels(rgb, self.config)
