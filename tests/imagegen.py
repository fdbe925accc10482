"""Synthetic product photos for tests: small, deterministic, and learnable per category."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Three visually distinct "categories": a model can tell them apart after a few steps.
CATEGORY_COLOURS: dict[str, tuple[int, int, int]] = {
    "Shoes": (200, 40, 40),
    "Bags": (40, 160, 60),
    "Hats": (40, 60, 200),
}


def make_image(category: str, index: int, size: int = 48) -> Image.Image:
    """An RGB image: the category's colour with a position-dependent pattern and seeded noise."""
    # crc32, not hash(): str hashes change between processes and the images (and so their splits) must not.
    rng = np.random.default_rng(zlib.crc32(f"{category}:{index}".encode()))
    base = np.array(CATEGORY_COLOURS.get(category, (128, 128, 128)), dtype=np.float32)
    pixels = np.tile(base, (size, size, 1))
    pixels += rng.normal(0, 18, size=pixels.shape)
    # A shape per category so colour is not the only cue.
    yy, xx = np.mgrid[0:size, 0:size]
    if category == "Shoes":
        mask = yy > size * 0.6
    elif category == "Bags":
        mask = (abs(xx - size / 2) < size / 4) & (abs(yy - size / 2) < size / 4)
    else:
        mask = yy < size * 0.3
    pixels[mask] = 255 - pixels[mask]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def image_bytes(category: str, index: int, fmt: str = "PNG", size: int = 48) -> bytes:
    buf = io.BytesIO()
    make_image(category, index, size).save(buf, format=fmt)
    return buf.getvalue()


def write_image_folder(root: Path, per_category: int = 10, fmt: str = "PNG", size: int = 48) -> Path:
    """An ImageFolder tree root/<category>/<category>_<i>.png with distinct images."""
    for category in CATEGORY_COLOURS:
        folder = root / category
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_category):
            ext = "png" if fmt == "PNG" else "jpg"
            (folder / f"{category.lower()}_{i}.{ext}").write_bytes(image_bytes(category, i, fmt, size))
    return root
