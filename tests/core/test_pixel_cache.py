"""The pixel cache: grown incrementally, one cache per preprocessing config, identical to the normal pixel path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.db import Database
from core.errors import NotFound
from core.pixel_cache import PixelCache
from core.schema import Image
from tests.core.training_helpers import store_images


@pytest.fixture
def images(db: Database) -> list[int]:
    return store_images(db, [("Shoes", 0, "train"), ("Bags", 1, "train"), ("Hats", 2, "val"), (None, 3, "test")])


def _reference_pixels(db: Database, image_id: int, size: int, crop: float, interp: str) -> np.ndarray:
    """The normal preprocessing path: open the stored original normalised, then the model's pixel transform."""
    from core.imaging import open_normalised
    from models.factory import PreprocessConfig
    from models.preprocess import to_model_pixels

    with db.read() as session:
        path = db.settings.data_dir / session.get(Image, image_id).stored_path
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
