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


# --- near-duplicate copies (issue 10): what a catalogue gets when the same product photo arrives twice ------------


def encode(img: Image.Image, fmt: str = "PNG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def half_size(img: Image.Image) -> Image.Image:
    return img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS)


def jpeg_q60(img: Image.Image) -> Image.Image:
    return Image.open(io.BytesIO(encode(img, "JPEG", 60))).convert("RGB")


def crop_5pct(img: Image.Image, *, centred: bool = False) -> Image.Image:
    """5% of the width and height cut off: from the top-left corner (all of it on two sides), or split evenly."""
    w, h = img.size
    dx, dy = round(w * 0.05), round(h * 0.05)
    if centred:
        return img.crop((dx // 2, dy // 2, w - (dx - dx // 2), h - (dy - dy // 2)))
    return img.crop((dx, dy, w, h))


def watermark(img: Image.Image, text: str = "shop.example") -> Image.Image:
    """Half-transparent dark text in the bottom-right corner, 1/18 of the height tall."""
    from PIL import ImageDraw, ImageFont

    base = img.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    font = ImageFont.load_default(size=max(8, base.height // 18))
    ImageDraw.Draw(layer).text((base.width - 6, base.height - 6), text, fill=(60, 60, 60, 128), font=font, anchor="rd")
    return Image.alpha_composite(base, layer).convert("RGB")


# name -> copy maker, in the order the benchmark reports them
COPY_KINDS = {
    "half size": half_size,
    "JPEG q=60": jpeg_q60,
    "5% crop (corner)": crop_5pct,
    "5% crop (centred)": lambda img: crop_5pct(img, centred=True),
    "watermark": watermark,
}
