"""Image validation by content (never by extension) and the one normalisation every pixel consumer uses."""

from __future__ import annotations

import hashlib
import io
import re
import struct
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError, features

from core.errors import ImageRefused
from core.settings import Settings

# Pillow format name -> (stored format name, file extension). MPO is the multi-picture JPEG some cameras write.
ACCEPTED_FORMATS: dict[str, tuple[str, str]] = {
    "JPEG": ("JPEG", "jpg"),
    "MPO": ("JPEG", "jpg"),
    "PNG": ("PNG", "png"),
    "WEBP": ("WEBP", "webp"),
    "GIF": ("GIF", "gif"),
    "TIFF": ("TIFF", "tif"),
    "BMP": ("BMP", "bmp"),
}
# Only these decoders ever see untrusted bytes: a smaller attack surface than every plugin Pillow has.
# (MPO has no opener of its own: the JPEG opener returns it.)
_PILLOW_FORMATS = tuple(f for f in ACCEPTED_FORMATS if f != "MPO" and (f != "WEBP" or features.check("webp")))
WHITE = (255, 255, 255)
# Colour spaces Pillow decodes but cannot convert to RGB faithfully (its LAB/HSV -> RGB conversion only relabels
# channels): refused with the mode named rather than stored with wrong colours.
_UNCONVERTIBLE_MODES = {"LAB", "HSV"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class DecodedImage:
    """A validated image: what it is (from its content) and its normalised RGB pixels."""

    name: str  # as the user knows it; used in messages only, never to build a path
    sha256: str
    format: str  # JPEG, PNG, WEBP, GIF, TIFF, BMP (detected from the content)
    ext: str  # file extension for the stored original, from `format`
    width: int  # full-resolution size after EXIF orientation, as people see it
    height: int
    mode: str  # Pillow mode of the original (e.g. CMYK, I;16, P)
    file_size: int
    image: Image.Image  # normalised RGB; smaller than width x height when decoded with a draft size


def _describe_unsupported(data: bytes) -> str:
    """A reason naming what the bytes look like, for files that no accepted decoder recognises."""
    head = data[:4096]
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    signatures: list[tuple[bytes, int, str]] = [
        (b"%PDF", 0, "not an image: looks like a PDF document"),
        (b"PK\x03\x04", 0, "not an image: looks like a zip archive"),
        (b"\x1f\x8b", 0, "not an image: looks like a gzip archive"),
        (b"7z\xbc\xaf\x27\x1c", 0, "not an image: looks like a 7-Zip archive"),
        (b"Rar!", 0, "not an image: looks like a RAR archive"),
        (b"8BPS", 0, "unsupported format PSD (Photoshop): export it as PNG or JPEG"),
        (b"\x00\x00\x01\x00", 0, "unsupported format ICO"),
        (b"\x00\x00\x00\x0cjP  ", 0, "unsupported format JPEG 2000"),
        (b"\xff\x4f\xff\x51", 0, "unsupported format JPEG 2000"),
        (b"\xff\x0a", 0, "unsupported format JPEG XL"),
        (b"\x00\x00\x00\x0cJXL ", 0, "unsupported format JPEG XL"),
        (b"%!PS", 0, "unsupported format PostScript/EPS"),
        (b"qoif", 0, "unsupported format QOI"),
        (b"MZ", 0, "not an image: looks like a Windows program"),
        (b"\x7fELF", 0, "not an image: looks like a program (ELF)"),
    ]
    for magic, offset, reason in signatures:
        if head[offset : offset + len(magic)] == magic:
            return reason
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace").strip().lower()
        if brand in ("heic", "heix", "hevc", "heim", "heis", "mif1", "msf1"):
            return "unsupported format HEIC/HEIF: export it as JPEG"
        if brand in ("avif", "avis"):
            return "unsupported format AVIF: export it as JPEG or PNG"
        return f"not an image: looks like a video or media file ({brand or 'ISO media'})"
    if b"<svg" in stripped[:2048]:
        return "unsupported format SVG (vector graphics): export it as PNG"
    if stripped.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in stripped[:1024]:
        return "not an image: looks like HTML (a web page saved instead of the image?)"
    if stripped.startswith(b"<?xml") or stripped.startswith(b"<"):
        return "not an image: looks like XML"
    if stripped.startswith((b"{", b"[")):
        return "not an image: looks like JSON or text"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "not an image: looks like text"
        except UnicodeDecodeError as exc:
            if exc.start >= len(head) - 4:  # a multi-byte character cut by our 4 KiB window
                return "not an image: looks like text"
    return f"not an image: unrecognised content (starts with {data[:8].hex(' ')})"


def _sniff_accepted(data: bytes) -> str | None:
    """The accepted format the signature claims, so decoder errors can name it; None if none matches."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if data[:2] == b"BM":
        return "BMP"
    return None


def _check_png_chunks(data: bytes) -> tuple[tuple[int, int], int]:
    """Walk every PNG chunk verifying its CRC (Pillow skips image-data CRCs); returns the IHDR size and the offset
    just after the IEND chunk (where the image ends).

    Raises ValueError with the reason. The size comes from IHDR so a bomb is refused before any decoding.
    """
    pos = len(_PNG_SIGNATURE)
    size: tuple[int, int] | None = None
    seen_idat = False
    while True:
        if pos + 8 > len(data):
            raise ValueError("truncated or corrupt PNG: the file ends before its IEND chunk")
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 8 + length + 4
        if end > len(data):
            if size is not None:
                # Report the size even for a cut file so a bomb header gets the more useful message.
                raise _TruncatedPng(size, ctype.decode("latin-1"))
            raise ValueError(f"truncated or corrupt PNG: chunk {ctype!r} runs past the end of the file")
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(ctype + body) & 0xFFFFFFFF != crc:
            raise ValueError(f"PNG checksum error in the {ctype.decode('latin-1')} chunk: the file is corrupt")
        if size is None:
            if ctype != b"IHDR" or length < 8:
                raise ValueError("corrupt PNG: the first chunk is not IHDR")
            size = struct.unpack(">II", body[:8])
        if ctype == b"IDAT":
            seen_idat = True
        if ctype == b"IEND":
            if not seen_idat:
                raise ValueError("corrupt PNG: no image data (IDAT) chunk")
            return size, end
        pos = end


def _jpeg_end(data: bytes, start: int = 0) -> int | None:
    """The offset just after the EOI marker of the JPEG stream starting at `start`, or None when it has none.

    Walks the marker segments by their lengths (an EXIF thumbnail's own EOI sits inside APP1 and is skipped) and the
    entropy-coded data after each SOS to the next marker that is neither stuffing (FF00) nor a restart (FFD0-D7).
    """
    if data[start : start + 2] != b"\xff\xd8":
        return None
    pos, size = start + 2, len(data)
    while pos < size:
        if data[pos] != 0xFF:
            return None
        while pos < size and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= size:
            return None
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return pos
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            continue
        if pos + 2 > size:
            return None
        pos += struct.unpack(">H", data[pos : pos + 2])[0]
        if marker != 0xDA:
            continue
        while True:  # entropy-coded data: find the next real marker
            pos = data.find(b"\xff", pos)
            if pos < 0 or pos + 1 >= size:
                return None
            following = data[pos + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                pos += 1 if following == 0xFF else 2
                continue
            break
    return None


def _mp_header_offset(data: bytes) -> int | None:
    """Where a multi-picture JPEG's MP header (APP2 `MPF`) starts: its picture offsets count from there."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] not in (0xDA, 0xD9):
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if data[pos + 1] == 0xE2 and data[pos + 4 : pos + 8] == b"MPF\x00":
            return pos + 8
        pos += 2 + length
    return None


def _gif_end(data: bytes) -> int | None:
    """The offset just after a GIF's trailer (or after its last block when the trailer is missing); None when a
    block is cut short (the decoder reports that)."""

    def colour_table(packed: int) -> int:
        return 3 * 2 ** ((packed & 7) + 1) if packed & 0x80 else 0

    def skip_sub_blocks(pos: int) -> int | None:
        while pos < len(data):
            length = data[pos]
            pos += 1 + length
            if length == 0:
                return pos
        return None

    pos: int | None = 13 + colour_table(data[10]) if len(data) >= 13 else None
    while pos is not None and pos < len(data):
        block = data[pos]
        if block == 0x3B:
            return pos + 1
        if block == 0x21 and pos + 2 <= len(data):
            pos = skip_sub_blocks(pos + 2)
        elif block == 0x2C and pos + 10 <= len(data):
            pos = skip_sub_blocks(pos + 10 + colour_table(data[pos + 9]) + 1)
        else:
            return pos  # not a GIF block: what follows is not part of the image
    return pos


def _image_end(data: bytes, img: Image.Image) -> int | None:
    """Where the image that `img` decoded from `data` ends, for the formats whose end is known without guessing
    (PNG is measured while its chunks are checked); None for the others (TIFF and BMP point at their parts)."""
    if img.format == "JPEG":
        return _jpeg_end(data)
    if img.format == "MPO":
        # A multi-picture JPEG holds its further pictures after the first one's EOI, at offsets its MP header lists.
        base = _mp_header_offset(data)
        if base is None:
            return None
        try:
            entries = img.mpinfo[0xB002]  # type: ignore[attr-defined]  # on MpoImageFile, not typed on Image.Image
            offsets = [0, *(int(e["DataOffset"]) + base for e in entries[1:])]
        except (AttributeError, KeyError, TypeError, ValueError):
            return None
        ends = [_jpeg_end(data, offset) for offset in offsets]
        return None if None in ends else max(e for e in ends if e is not None)
    if img.format == "GIF":
        return _gif_end(data)
    if img.format == "WEBP" and len(data) >= 8:
        riff_size = struct.unpack("<I", data[4:8])[0]
        return 8 + riff_size + (riff_size & 1)  # RIFF chunks are padded to an even length
    return None


def _trailing_reason(fmt: str, size: int, end: int | None, settings: Settings) -> str | None:
    """The reason to refuse a file with more than `settings.max_trailing_bytes` after the image's end, or None.

    Data appended to a picture is no part of it but would be stored and served byte for byte: a 199 MiB tail, or an
    HTML page or zip archive riding along (a polyglot)."""
    if end is None or size - end <= settings.max_trailing_bytes:
        return None
    return (
        f"{size - end:,} bytes of other data follow the end of the {fmt} image (at byte {end:,}): a file with "
        f"something appended is refused; save the picture again as a plain {fmt}"
    )


class _TruncatedPng(ValueError):
    def __init__(self, size: tuple[int, int], chunk: str) -> None:
        super().__init__(f"truncated or corrupt PNG: the file ends inside its {chunk} chunk")
        self.size = size


def _check_dimensions(width: int, height: int, settings: Settings) -> str | None:
    """The reason to refuse an image of this size before decoding it, or None."""
    pixels = width * height
    if width <= 0 or height <= 0:
        return f"invalid image size {width}x{height}"
    if pixels > settings.max_image_pixels:
        return f"{width}x{height} pixels exceeds the limit of {settings.max_image_pixels:,} pixels"
    if max(width, height) > settings.max_image_side:
        return f"{width}x{height} pixels: the longer side exceeds the limit of {settings.max_image_side:,} pixels"
    return None


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MB" if n >= 1024 * 1024 else f"{n:,} bytes"


def inspect_and_decode(
    name: str,
    data: bytes,
    settings: Settings,
    *,
    sha256: str | None = None,
    draft_size: int | None = None,
    decode_slot: Callable[[int], AbstractContextManager[object]] | None = None,
) -> DecodedImage:
    """Validate `data` by content and decode it fully; raises ImageRefused(name, reason) for anything refused.

    Checks, in order: empty or oversized file, recognised accepted format, dimensions from the header
    against settings (before decoding), then a full decode (truncated or corrupt data is refused), and no more
    than `settings.max_trailing_bytes` after the image's end (PNG, JPEG, GIF, WebP: see `_image_end`).
    `draft_size` is for when only a thumbnail and hashes are needed: JPEGs decode at a reduced scale (still reading
    every byte) and other formats are reduced the same way right after decoding (`reduce_like_draft`), so no
    full-size picture outlives this call; the reported width and height stay the full size. `decode_slot(pixels)`,
    if given, is held around the decode (the memory-heavy part), so a caller decoding in threads can keep large
    pictures from decoding side by side. `sha256` skips re-hashing.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone flipped the global: half images would pass as whole
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False")
    size = len(data)
    if size == 0:
        raise ImageRefused(name, "empty file (0 bytes)")
    if size > settings.max_file_bytes:
        raise ImageRefused(name, f"file is {_mb(size)}, larger than the limit of {_mb(settings.max_file_bytes)}")
    claimed = _sniff_accepted(data)
    if claimed is None:
        raise ImageRefused(name, _describe_unsupported(data))
    if claimed == "PNG":
        try:
            png_size, png_end = _check_png_chunks(data)
        except _TruncatedPng as exc:
            reason = _check_dimensions(*exc.size, settings)
            raise ImageRefused(name, reason or str(exc)) from exc
        except ValueError as exc:
            raise ImageRefused(name, str(exc)) from exc
        reason = _check_dimensions(*png_size, settings) or _trailing_reason("PNG", size, png_end, settings)
        if reason:
            raise ImageRefused(name, reason)
    if claimed == "WEBP" and "WEBP" not in _PILLOW_FORMATS:
        raise ImageRefused(name, "unsupported format WebP (this installation's Pillow lacks WebP support)")

    try:
        img = Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS)
    except Image.DecompressionBombError as exc:
        match = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(match.group(1)):,} pixels" if match else "the image"
        raise ImageRefused(name, f"{pixels} exceeds the limit of {settings.max_image_pixels:,} pixels") from exc
    except UnidentifiedImageError as exc:
        raise ImageRefused(name, f"truncated or corrupt {claimed}: the header cannot be read") from exc
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as exc:
        raise ImageRefused(name, f"truncated or corrupt {claimed}: {exc}") from exc

    with img:
        fmt, ext = ACCEPTED_FORMATS.get(img.format or "", (img.format or "?", ""))
        if not ext:
            raise ImageRefused(name, f"unsupported format {img.format}")
        full_w, full_h = img.size
        reason = _check_dimensions(full_w, full_h, settings)
        if reason:
            raise ImageRefused(name, reason)
        mode = img.mode
        if mode in _UNCONVERTIBLE_MODES:
            raise ImageRefused(name, f"colour space {mode} is not supported: save it as RGB")
        if draft_size and fmt == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        try:
            with (decode_slot or nullcontext)(img.width * img.height):
                img.load()  # the full decode: truncated or corrupt data fails here
                orientation = _orientation(img)  # after load: a PNG's EXIF may follow its pixels, so this decodes
                rgb = normalise(img)
                if draft_size and fmt != "JPEG":  # a JPEG was drafted before decoding
                    rgb = reduce_like_draft(rgb, draft_size)
                if rgb is not img:
                    img.close()  # the full-size pixels go before the slot lets another decode start
        except Image.DecompressionBombError as exc:
            raise ImageRefused(name, f"{exc}") from exc
        except (OSError, ValueError, SyntaxError, struct.error, EOFError, MemoryError) as exc:
            raise ImageRefused(name, f"truncated or corrupt {fmt}: {exc}") from exc
        # After the decode, so a cut or corrupt file is reported as that; PNG was measured with its chunks.
        reason = None if fmt == "PNG" else _trailing_reason(fmt, size, _image_end(data, img), settings)
        if reason:
            raise ImageRefused(name, reason)
    if orientation in (5, 6, 7, 8):
        full_w, full_h = full_h, full_w
    return DecodedImage(
        name=name,
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        format=fmt,
        ext=ext,
        width=full_w,
        height=full_h,
        mode=mode,
        file_size=size,
        image=rgb,
    )


def reduce_like_draft(img: Image.Image, size: int) -> Image.Image:
    """`img` shrunk by the factor `Image.draft` picks for a JPEG (8, 4 or 2: the largest that keeps both sides at least
    `size`), averaging boxes: thumbnails and content hashes of an 80-megapixel PNG are then made from a picture of the
    scale a JPEG's would be, at a fraction of the memory."""
    fits = min(img.width // size, img.height // size)
    factor = next((f for f in (8, 4, 2) if fits >= f), 1)
    return img.reduce(factor) if factor > 1 else img


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8), 1 when absent or unreadable: a broken EXIF block must not refuse a photo."""
    try:
        value = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float greyscale image to 8-bit (scaled, never clipped at 255)."""
    arr = np.asarray(img)
    if img.mode == "F":
        top = 1.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 255.0
        out = np.clip(np.nan_to_num(arr) / top * 255.0 + 0.5, 0, 255)
    else:
        # 16-bit sources (PNG, TIFF) arrive as I;16* or I with values 0..65535: map 65535 -> 255, rounding.
        wide = np.clip(arr.astype(np.int64), 0, 65535)
        out = (wide * 255 + 32767) // 65535
    return Image.fromarray(out.astype(np.uint8), "L")


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def normalise(img: Image.Image) -> Image.Image:
    """The RGB image people and models see: EXIF orientation applied, alpha and palettes composited on white,
    16-bit scaled to 8-bit, CMYK converted. Returns a new image or `img` itself when already plain RGB.
    """
    img.load()
    if _orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    has_transparency = "transparency" in img.info
    if mode == "RGB" and not has_transparency:
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (has_transparency and mode in ("P", "L", "RGB", "1")):
        return _composite_on_white(img.convert("RGBA"))
    if mode.startswith("I") or mode == "F":
        return _to_8bit(img).convert("RGB")
    # L, 1, P (opaque), CMYK (JPEG Adobe inversion is handled by Pillow's decoder), YCbCr. LAB and HSV are refused
    # at import (inspect_and_decode), as this conversion would give them wrong colours.
    return img.convert("RGB")


def open_normalised(path: Path, *, target_size: int | None = None) -> Image.Image:
    """Open a stored original and return its normalised RGB image.

    With `target_size`, JPEGs decode through libjpeg's DCT scaling (`draft`) at the smallest scale whose
    both sides are still at least `target_size`: big photos decode several times faster for model inputs.
    """
    with Image.open(path, formats=_PILLOW_FORMATS) as img:
        if target_size and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (target_size, target_size))
        # Leaving `with` only closes the file; the loaded pixels stay valid even when normalise returns `img`.
        return normalise(img)


def _grey(img: Image.Image) -> Image.Image:
    """The picture in grey levels; a grey one as it is (the importer converts a thumbnail once for all its hashes)."""
    return img if img.mode == "L" else img.convert("L")


def difference_hash(img: Image.Image) -> int | None:
    """A 64-bit perceptual hash (dHash): equal for the same picture resized, re-encoded or lightly retouched.

    Grey levels of a 9x8 reduction, one bit per horizontally adjacent pair that gets brighter. Returned as a
    signed 64-bit integer (what SQLite stores); None for a picture without structure (flat, or a plain gradient),
    whose hash would match every other such picture.
    """
    small = np.asarray(_grey(img).resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    value = _signed(small[:, 1:] > small[:, :-1])
    return None if value in (0, -1) else value


# Content box: pixels at least this far (grey levels) from the border's median count as the product, and this share
# of their weight is trimmed from each side, so a small watermark or a 5% crop moves the box little.
_BOX_MIN_CONTRAST = 24
_BOX_TRIM_SHARE = 0.04


# The pixel check's thumbnail of the content box: this many grey levels a side, normalised
# (core.catalog.duplicates.MatchRule).
CONTENT_PIXELS_SIDE = 16


@dataclass(frozen=True)
class ContentHashes:
    """Three 64-bit hashes of a picture's content box, signed as SQLite stores them: dHash across rows (`dhash_h`),
    dHash down columns (`dhash_v`) and the DCT pHash (`phash`), compared by Hamming distance (core.catalog.duplicates);
    and the box's normalised grey thumbnail (`pixels`, see `content_pixels`), which confirms a hash match. Only the
    hashes are
    stored: a stored image's pixels are made again from its thumbnail file when a new image's hashes match it."""

    dhash_h: int
    dhash_v: int
    phash: int
    pixels: np.ndarray = field(compare=False, repr=False)


def _median(values: np.ndarray) -> float:
    """np.median of a flat array, the same value (the middle one, or the mean of the middle two), without np.median's
    overhead: a few microseconds instead of about 25, which counts at hundreds of imports a second."""
    middle = len(values) // 2
    if len(values) % 2:
        return float(np.partition(values, middle)[middle])
    low, high = np.partition(values, (middle - 1, middle))[middle - 1 : middle + 1]
    return float((low + high) / 2)


def _dct_rows(size: int, keep: int) -> np.ndarray:
    """The first `keep` rows of the orthonormal DCT-II matrix of `size` points (scipy.fft.dct(norm="ortho"))."""
    k = np.arange(keep)[:, None]
    n = np.arange(size)[None, :]
    rows = np.sqrt(2.0 / size) * np.cos(np.pi * (2 * n + 1) * k / (2 * size))
    rows[0] /= np.sqrt(2.0)
    return rows


# pHash: the 8x8 lowest frequencies of the 32x32 reduction's 2-D DCT, as two matrix products (no scipy import).
_PHASH_DCT = _dct_rows(32, 8)


def _signed(bits: np.ndarray) -> int:
    value = int.from_bytes(np.packbits(bits.astype(bool).ravel()).tobytes(), "big")
    return value - 2**64 if value >= 2**63 else value


def _content_box(grey: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the product: the mass-weighted quantile box of pixels unlike the border."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    weight = np.abs(grey - _median(border))
    weight[weight < _BOX_MIN_CONTRAST] = 0
    total = float(weight.sum())
    if total == 0:
        return 0, 0, grey.shape[1], grey.shape[0]

    def span(profile: np.ndarray) -> tuple[int, int]:
        cumulative = np.cumsum(profile) / total
        low = int(np.searchsorted(cumulative, _BOX_TRIM_SHARE))
        return low, max(low + 1, int(np.searchsorted(cumulative, 1 - _BOX_TRIM_SHARE)) + 1)

    (left, right), (top, bottom) = span(weight.sum(axis=0)), span(weight.sum(axis=1))
    return left, top, right, bottom


def _content_grey(img: Image.Image) -> Image.Image:
    """The picture's content box (`_content_box`) in grey levels."""
    grey_img = _grey(img)
    return grey_img.crop(_content_box(np.asarray(grey_img, dtype=np.float32)))


def _normalised_pixels(box: Image.Image) -> np.ndarray:
    small = np.array(box.resize((CONTENT_PIXELS_SIDE,) * 2, Image.Resampling.BOX), dtype=np.float32).ravel()
    small -= small.mean()
    small /= max(float(small.std()), 1e-3)  # a flat box (no structure) stays all zeros
    return small


def content_pixels(img: Image.Image) -> np.ndarray:
    """The content box in grey, 16x16 box-averaged, normalised to mean 0 and deviation 1 (256 float32): what the
    pixel check of a hash match compares (mean absolute difference), unmoved by brightness and contrast."""
    return _normalised_pixels(_content_grey(img))


def content_hashes(img: Image.Image) -> ContentHashes | None:
    """Perceptual hashes of the product in `img`, robust to resizing, re-encoding, a 5% crop and a small watermark
    (measured in benchmarks/near_duplicates.py), with its `content_pixels`. None for a picture without structure
    (flat or a plain gradient), whose hashes would match every other such picture."""
    box = _content_grey(img)
    across = np.asarray(box.resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    down = np.asarray(box.resize((8, 9), Image.Resampling.BOX), dtype=np.int16)
    reduced = np.asarray(box.resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    # Rounded: a flat or symmetric picture has coefficients that are zero but for float noise, whose signs would
    # otherwise differ between BLAS builds (and between this and scipy's FFT, which made the hashes stored before).
    dct = np.round(_PHASH_DCT @ reduced @ _PHASH_DCT.T, 6)
    hashes = ContentHashes(
        dhash_h=_signed(across[:, 1:] > across[:, :-1]),
        dhash_v=_signed(down[1:, :] > down[:-1, :]),
        phash=_signed(dct > _median(dct.ravel())),
        pixels=_normalised_pixels(box),
    )
    if hashes.dhash_h in (0, -1) and hashes.dhash_v in (0, -1):
        return None
    return hashes
