"""Generators of awkward and hostile inputs for the image validation and ingest tests (all tiny, all in memory)."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
from PIL import Image

TEXT = b"This is a product description, not a photo.\nPrice: 12.99\n"
HTML = b"<!DOCTYPE html>\n<html><head><title>Shoe</title></head><body><img src='shoe.jpg'></body></html>\n"
SVG = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>\n'
)
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def noisy_rgb(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """Random pixels: no two orientations or crops look alike, and every byte of a JPEG matters."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def quadrants(width: int = 96, height: int = 64) -> Image.Image:
    """Four flat colours in unequal blocks: asymmetric under every flip and rotation, and JPEG-friendly."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[: height // 3, : width // 4] = (230, 30, 30)
    arr[: height // 3, width // 4 :] = (30, 200, 40)
    arr[height // 3 :, : width // 2] = (30, 40, 220)
    arr[height // 3 :, width // 2 :] = (240, 230, 40)
    return Image.fromarray(arr, "RGB")


def jpeg(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    return encode(noisy_rgb(*size, seed=seed), "JPEG", quality=90)


def png(seed: int = 0, size: tuple[int, int] = (32, 24)) -> bytes:
    return encode(noisy_rgb(*size, seed=seed), "PNG")


def truncated_jpeg() -> bytes:
    data = jpeg(seed=7, size=(128, 96))
    return data[: len(data) // 2]


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body) & 0xFFFFFFFF)


def png_bad_crc() -> bytes:
    """A valid PNG whose image-data (IDAT) checksum is flipped: Pillow alone would decode it silently."""
    data = bytearray(png(seed=3))
    at = data.find(b"IDAT")
    (length,) = struct.unpack(">I", data[at - 4 : at])
    data[at + 4 + length] ^= 0xFF
    return bytes(data)


def png_huge_header(width: int = 60000, height: int = 60000) -> bytes:
    """A tiny, well-formed PNG (valid CRCs) whose IHDR claims width x height pixels: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def cmyk_jpeg(rgb: tuple[int, int, int] = (220, 30, 30)) -> bytes:
    return encode(Image.new("RGB", (32, 32), rgb).convert("CMYK"), "JPEG", quality=95)


def lab_tiff(lab: tuple[int, int, int] = (50, 0, 0)) -> bytes:
    """A CIE L*a*b* TIFF (what some scanners and Photoshop exports write); (50, 0, 0) is a mid grey."""
    return encode(Image.new("LAB", (16, 16), lab), "TIFF")


def png16(values: list[int]) -> bytes:
    """A 16-bit greyscale PNG, one row holding `values` (0..65535)."""
    return encode(Image.fromarray(np.array([values], dtype=np.uint16)), "PNG")


def palette_png_with_transparency() -> bytes:
    """A P-mode PNG: left half palette index 0 (transparent), right half index 1 (opaque red)."""
    img = Image.new("P", (8, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    for x in range(4, 8):
        for y in range(4):
            img.putpixel((x, y), 1)
    return encode(img, "PNG", transparency=0)


def animated_gif() -> bytes:
    """Three frames: red, green, blue. The first frame (red) is the image."""
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def jpeg_with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())


# The transpose that displays a stored orientation upright (EXIF spec; what cameras expect viewers to do).
ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def make_zip(entries: list[tuple[str, bytes]], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip with these raw entry names (kept as written: ../, absolute paths and all)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            zf.writestr(info, data)
    return buf.getvalue()


def zip_with_encrypted_entry(good: list[tuple[str, bytes]], secret_name: str, secret: bytes) -> bytes:
    """A zip whose `secret_name` entry has the 'encrypted' flag bit set (in both headers), others plain."""
    data = bytearray(make_zip([*good, (secret_name, secret)], compression=zipfile.ZIP_STORED))
    encoded = secret_name.encode()
    # Local file header: signature, version(2), flags(2) ... name at offset 30.
    pos = 0
    while (pos := data.find(b"PK\x03\x04", pos)) != -1:
        (name_len,) = struct.unpack("<H", data[pos + 26 : pos + 28])
        if data[pos + 30 : pos + 30 + name_len] == encoded:
            data[pos + 6] |= 0x01
        pos += 4
    # Central directory header: flags at offset 8, name at offset 46.
    pos = 0
    while (pos := data.find(b"PK\x01\x02", pos)) != -1:
        (name_len,) = struct.unpack("<H", data[pos + 28 : pos + 30])
        if data[pos + 46 : pos + 46 + name_len] == encoded:
            data[pos + 8] |= 0x01
        pos += 4
    return bytes(data)
