"""The pixel cache: grown incrementally, one cache per preprocessing config, identical to the normal pixel path."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from core.db import Database
from core.errors import NotFound
from core.ml.pixel_cache import CachedRows, PixelCache, RowStore
from core.schema import Image
from tests.core.training_helpers import store_images


@pytest.fixture
def images(db: Database) -> list[int]:
    return store_images(db, [("Shoes", 0, "train"), ("Bags", 1, "train"), ("Hats", 2, "val"), (None, 3, "test")])


def _reference_pixels(db: Database, image_id: int, size: int, crop: float, interp: str) -> np.ndarray:
    """The normal preprocessing path: open the stored original normalised, then the model's pixel transform."""
    from core.catalog.imaging import open_normalised
    from models.factory import PreprocessConfig
    from models.preprocess import to_model_pixels

    with db.read() as session:
        image = session.get(Image, image_id)
        assert image is not None
        path = db.settings.data_dir / image.stored_path
    cfg = PreprocessConfig(image_size=size, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=crop, interpolation=interp)
    return to_model_pixels(open_normalised(path), cfg)


def test_grows_incrementally_decoding_only_new_images(db: Database, images: list[int]) -> None:
    first = PixelCache(db.settings, 32, 0.875, "bicubic")
    pixels = first.ensure(db, images[:2])
    assert pixels.shape == (2, 32, 32, 3) and pixels.dtype == np.uint8
    assert first.decodes == 2

    # A new instance (another process, a later job) reuses the rows on disk and decodes only the new images.
    second = PixelCache(db.settings, 32, 0.875, "bicubic")
    asked = [images[3], images[0], images[2], images[1]]
    again = second.ensure(db, asked)
    assert second.decodes == 2
    assert np.array_equal(again[1], pixels[0]) and np.array_equal(again[3], pixels[1])
    assert PixelCache(db.settings, 32, 0.875, "bicubic").ensure(db, images).shape == (4, 32, 32, 3)


def test_pixels_match_the_normal_preprocessing_path(db: Database, images: list[int]) -> None:
    cache = PixelCache(db.settings, 32, 0.875, "bicubic")
    got = cache.ensure(db, images)
    for row, image_id in zip(got, images, strict=True):
        assert np.array_equal(row, _reference_pixels(db, image_id, 32, 0.875, "bicubic"))


def test_other_size_or_crop_is_a_separate_cache(db: Database, images: list[int]) -> None:
    small = PixelCache(db.settings, 32, 0.875, "bicubic")
    small.ensure(db, images)
    bigger = PixelCache(db.settings, 48, 0.875, "bicubic")
    assert bigger.ensure(db, images).shape == (4, 48, 48, 3)
    assert bigger.decodes == 4
    uncropped = PixelCache(db.settings, 32, 1.0, "bicubic")
    assert uncropped.ensure(db, images[:1]).shape == (1, 32, 32, 3) and uncropped.decodes == 1
    assert np.array_equal(uncropped.ensure(db, images[:1])[0], _reference_pixels(db, images[0], 32, 1.0, "bicubic"))
    assert len({small.folder, bigger.folder, uncropped.folder}) == 3
    # The first cache is still intact and complete.
    reread = PixelCache(db.settings, 32, 0.875, "bicubic")
    reread.ensure(db, images)
    assert reread.decodes == 0


@pytest.mark.parametrize("damage", ["garbage", "missing", "wrong_rows", "short_data"])
def test_damaged_index_or_data_is_rebuilt(db: Database, images: list[int], damage: str) -> None:
    cache = PixelCache(db.settings, 32, 0.875, "bicubic")
    expected = np.array(cache.ensure(db, images))
    index = cache.store.index_path
    if damage == "garbage":
        index.write_bytes(b"\x80\x04not json")
    elif damage == "missing":
        index.unlink()
    elif damage == "wrong_rows":
        doc = json.loads(index.read_text())
        doc["rows"] = {k: v + 10 for k, v in doc["rows"].items()}
        index.write_text(json.dumps(doc))
    else:
        with open(cache.store.data_path, "r+b") as handle:
            handle.truncate(100)
    again = PixelCache(db.settings, 32, 0.875, "bicubic")
    assert np.array_equal(again.ensure(db, images), expected)
    assert again.decodes == len(images)


def test_unknown_image_id_is_named(db: Database, images: list[int]) -> None:
    with pytest.raises(NotFound, match="9999"):
        PixelCache(db.settings, 32, 0.875, "bicubic").ensure(db, [images[0], 9999])


def test_rows_of_a_reordered_cache_are_a_lazy_view_identical_to_the_gather(db: Database, images: list[int]) -> None:
    cache = PixelCache(db.settings, 32, 0.875, "bicubic")
    # Cached in another order than asked (as after uploads and prediction refreshes): rows are not contiguous.
    cache.fill(db, images[::-1])
    eager = np.array(cache.ensure(db, images))
    lazy = cache.rows(db, images)
    assert isinstance(lazy, CachedRows) and isinstance(lazy.mapped, np.memmap)
    assert lazy.mapped.filename is not None and Path(lazy.mapped.filename) == cache.store.data_path
    assert list(lazy.positions) == [3, 2, 1, 0]  # the view holds positions only, no pixels
    assert len(lazy) == 4 and lazy.shape == (4, 32, 32, 3) and lazy.ndim == 4 and lazy.dtype == np.uint8
    batch = np.array([3, 0, 2])
    assert type(lazy[batch]) is np.ndarray and np.array_equal(lazy[batch], eager[batch])
    assert np.array_equal(lazy[1:3], eager[1:3]) and np.array_equal(lazy[2], eager[2])
    assert np.array_equal(np.asarray(lazy), eager)
    assert np.array_equal(lazy.subset([2, 1])[:], eager[[2, 1]])
    assert cache.decodes == 4  # rows() and ensure() decoded nothing more


def _slow_rows(calls: list[float], delay: float) -> Callable[[Sequence[str]], np.ndarray]:
    """A compute callback for a (2,) int64 row store: row = (int(key), len(key)), after `delay` seconds."""

    def compute(keys: Sequence[str]) -> np.ndarray:
        calls.append(time.monotonic())
        time.sleep(delay)
        return np.array([[int(k), len(k)] for k in keys], dtype=np.int64)

    return compute


def test_a_one_row_lookup_is_not_blocked_by_a_long_growth(tmp_path: Path) -> None:
    """The UI predicting one new upload must not wait for a training job caching thousands of images."""
    store = RowStore(tmp_path / "cache", dtype="int64", row_shape=(2,), meta={"test": 1})
    started = threading.Event()
    finished: dict[str, float] = {}
    growth_calls: list[float] = []
    slow = _slow_rows(growth_calls, 0.15)

    def grow() -> None:
        def signalling(keys: Sequence[str]) -> np.ndarray:
            started.set()
            return slow(keys)

        store.get_or_compute([str(i) for i in range(100, 112)], signalling, chunk=2)  # 6 chunks, about 0.9 s
        finished["growth"] = time.monotonic()

    worker = threading.Thread(target=grow)
    worker.start()
    assert started.wait(5)
    time.sleep(0.2)  # well inside the growth: at least one chunk appended, more to come
    got = store.get_or_compute(["7"], _slow_rows([], 0.0))
    finished["lookup"] = time.monotonic()
    worker.join(10)
    assert got.tolist() == [[7, 1]]
    assert finished["lookup"] < growth_calls[-1] < finished["growth"]
    index = store.read_index()
    assert len(index) == 13 and sorted(index.values()) == list(range(13))


def test_two_writers_growing_overlapping_keys_keep_one_correct_row_per_key(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    keys_a = [str(i) for i in range(0, 40)]
    keys_b = [str(i) for i in range(20, 60)]
    results: dict[str, np.ndarray] = {}

    def writer(name: str, keys: list[str]) -> None:
        # Each writer has its own store object (as another process would): the flock is what serialises appends.
        store = RowStore(folder, dtype="int64", row_shape=(2,), meta={"test": 1})
        results[name] = store.get_or_compute(keys, _slow_rows([], 0.01), chunk=3)

    threads = [threading.Thread(target=writer, args=("a", keys_a)), threading.Thread(target=writer, args=("b", keys_b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert results["a"][:, 0].tolist() == list(range(0, 40)) and results["b"][:, 0].tolist() == list(range(20, 60))
    store = RowStore(folder, dtype="int64", row_shape=(2,), meta={"test": 1})
    index = store.read_index()
    assert sorted(index, key=int) == [str(i) for i in range(60)]  # every key once, none lost, none duplicated
    assert sorted(index.values()) == list(range(60))
    on_disk = store.view(len(index))
    assert all(on_disk[row, 0] == int(key) for key, row in index.items())
