"""Validation by content and normalisation: every refusal names the file and the reason; odd images come out right."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from core.catalog.imaging import inspect_and_decode, normalise, open_normalised
from core.errors import ImageRefused
from core.settings import Settings
from tests.core import badfiles


@pytest.fixture
def cfg(settings: Settings) -> Settings:
    return settings


@pytest.mark.parametrize(
    ("name", "make", "reason_part"),
    [
        ("notes.jpg", lambda: badfiles.TEXT, "not an image: looks like text"),
        ("page.jpg", lambda: badfiles.HTML, "not an image: looks like HTML"),
        ("logo.png", lambda: badfiles.SVG, "unsupported format SVG"),
        ("catalogue.jpg", lambda: badfiles.PDF, "not an image: looks like a PDF"),
        ("empty.jpg", lambda: b"", "empty file (0 bytes)"),
        ("half.jpg", badfiles.truncated_jpeg, "truncated or corrupt JPEG"),
        ("crc.png", badfiles.png_bad_crc, "PNG checksum error"),
        ("bomb.png", badfiles.png_huge_header, "60000x60000 pixels exceeds the limit of"),
        ("archive.jpg", lambda: badfiles.make_zip([("a.txt", b"x")]), "looks like a zip archive"),
    ],
)
def test_bad_input_is_refused_naming_file_and_reason(cfg: Settings, name: str, make: object, reason_part: str) -> None:
    data = make()  # type: ignore[operator]
    with pytest.raises(ImageRefused) as caught:
        inspect_and_decode(name, data, cfg)
    assert caught.value.name == name
    assert reason_part in caught.value.reason
    assert str(caught.value).startswith(f"{name}: ")


def test_bomb_header_is_refused_from_the_header_before_decoding(cfg: Settings) -> None:
    data = badfiles.png_huge_header(60000, 60000)
    assert len(data) < 100  # a few bytes claim 3.6 billion pixels
    with pytest.raises(ImageRefused, match=f"exceeds the limit of {cfg.max_image_pixels:,} pixels"):
        inspect_and_decode("bomb.png", data, cfg)
    # Below Pillow's own limit but above ours: our settings decide, still from the header only.
    small_cap = cfg.model_copy(update={"max_image_pixels": 1000})
    with pytest.raises(ImageRefused, match="40x40 pixels exceeds the limit of 1,000 pixels"):
        inspect_and_decode("a.png", badfiles.encode(Image.new("RGB", (40, 40)), "PNG"), small_cap)
    with pytest.raises(ImageRefused, match="exceeds the limit of 1,000 pixels"):
        inspect_and_decode("a.jpg", badfiles.encode(Image.new("RGB", (40, 40)), "JPEG"), small_cap)
    long_side = cfg.model_copy(update={"max_image_side": 30})
    with pytest.raises(ImageRefused, match="longer side exceeds the limit of 30"):
        inspect_and_decode("wide.gif", badfiles.encode(Image.new("RGB", (40, 2)), "GIF"), long_side)


def test_file_over_the_byte_limit_is_refused(cfg: Settings) -> None:
    tiny = cfg.model_copy(update={"max_file_bytes": 100})
    with pytest.raises(ImageRefused, match="larger than the limit of 100 bytes") as caught:
        inspect_and_decode("big.jpg", badfiles.jpeg(), tiny)
    assert caught.value.name == "big.jpg"


def test_pillow_safety_switches_stay_on() -> None:
    import core.catalog.imaging  # noqa: F401 (importing must not relax Pillow's guards)

    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > 0
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("fmt", "ext", "params"),
    [
        ("JPEG", "jpg", {}),
        ("PNG", "png", {}),
        ("WEBP", "webp", {"lossless": True}),
        ("GIF", "gif", {}),
        ("TIFF", "tif", {}),
        ("BMP", "bmp", {}),
    ],
)
def test_accepted_formats_are_detected_by_content_not_name(cfg: Settings, fmt: str, ext: str, params: dict) -> None:
    data = badfiles.encode(badfiles.quadrants(40, 30), fmt, **params)
    decoded = inspect_and_decode("misnamed.txt", data, cfg)
    assert (decoded.format, decoded.ext) == (fmt, ext)
    assert (decoded.width, decoded.height) == (40, 30)
    assert decoded.image.mode == "RGB" and decoded.image.size == (40, 30)
    # The top-left block is red in every lossless format and near-red in JPEG/GIF.
    pixel = decoded.image.getpixel((2, 2))
    assert isinstance(pixel, tuple), pixel
    r, g, b = pixel
    assert r > 200 and g < 70 and b < 70


def test_cmyk_jpeg_becomes_rgb_with_sane_colours(cfg: Settings) -> None:
    decoded = inspect_and_decode("print.jpg", badfiles.cmyk_jpeg((220, 30, 30)), cfg)
    assert decoded.mode == "CMYK" and decoded.image.mode == "RGB"
    mean = np.asarray(decoded.image).reshape(-1, 3).mean(axis=0)
    assert np.allclose(mean, (220, 30, 30), atol=12), mean


def test_a_lab_tiff_is_refused_naming_its_colour_space_not_stored_with_wrong_colours(cfg: Settings) -> None:
    # Pillow's LAB -> RGB "conversion" only relabels channels: this mid grey would come out bright blue.
    with pytest.raises(ImageRefused) as caught:
        inspect_and_decode("scan.tif", badfiles.lab_tiff(), cfg)
    assert caught.value.name == "scan.tif"
    assert caught.value.reason == "colour space LAB is not supported: save it as RGB"


def test_16_bit_png_is_scaled_not_clipped(cfg: Settings) -> None:
    decoded = inspect_and_decode("depth.png", badfiles.png16([65535, 32768, 0, 257, 1000]), cfg)
    row = np.asarray(decoded.image)[0, :, 0]
    assert row.tolist() == [255, 128, 0, 1, 4]  # 1000/65535*255 = 3.9; clipping would have given 255 for all but 0


def test_palette_png_transparency_is_composited_on_white(cfg: Settings) -> None:
    decoded = inspect_and_decode("cut-out.png", badfiles.palette_png_with_transparency(), cfg)
    assert decoded.image.getpixel((0, 0)) == (255, 255, 255)  # transparent: white, not black
    assert decoded.image.getpixel((6, 2)) == (255, 0, 0)


def test_half_transparent_rgba_blends_with_white() -> None:
    img = Image.new("RGBA", (2, 2), (255, 0, 0, 128))
    pixel = normalise(img).getpixel((0, 0))
    assert isinstance(pixel, tuple), pixel
    r, g, b = pixel
    assert r == 255 and 125 <= g <= 129 and 125 <= b <= 129


@pytest.mark.parametrize("mode", ["L", "LA", "1", "P", "I", "F", "I;16"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    img = Image.new(mode, (4, 3))
    out = normalise(img)
    assert out.mode == "RGB" and out.size == (4, 3)


def test_animated_gif_uses_its_first_frame(cfg: Settings) -> None:
    decoded = inspect_and_decode("spin.gif", badfiles.animated_gif(), cfg)
    assert decoded.format == "GIF"
    assert decoded.image.getpixel((8, 8)) == (255, 0, 0)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_is_applied(cfg: Settings, orientation: int) -> None:
    upright = badfiles.quadrants(96, 64)
    # A camera stores the sensor image plus a tag; viewers apply the tag's fix. Build the stored image by
    # undoing the fix, so the expected result is the upright picture itself.
    undo = {
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }.get(orientation, badfiles.ORIENTATION_FIX[orientation])
    stored = upright.transpose(undo)
    assert stored.transpose(badfiles.ORIENTATION_FIX[orientation]).tobytes() == upright.tobytes()
    decoded = inspect_and_decode("phone.jpg", badfiles.jpeg_with_orientation(stored, orientation), cfg)
    assert (decoded.width, decoded.height) == (96, 64)
    got = np.asarray(decoded.image, dtype=np.int16)
    assert np.abs(got - np.asarray(upright, dtype=np.int16)).mean() < 4
    # Any other same-sized orientation would be far off (the sideways ones already fail the size check).
    for wrong in (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180):
        assert np.abs(got - np.asarray(upright.transpose(wrong), dtype=np.int16)).mean() > 30


def test_open_normalised_uses_jpeg_draft_for_a_target_size(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(badfiles.encode(badfiles.quadrants(1024, 768), "JPEG", quality=90))
    full = open_normalised(path)
    small = open_normalised(path, target_size=200)
    assert full.size == (1024, 768)
    # DCT scaling by 1/2 is the largest that keeps both sides >= 200 (768 // 200 = 3 -> scale 2).
    assert small.size == (512, 384) and small.mode == "RGB"
    png_path = tmp_path / "big.png"
    png_path.write_bytes(badfiles.encode(badfiles.quadrants(300, 200), "PNG"))
    assert open_normalised(png_path, target_size=50).size == (300, 200)  # no draft outside JPEG


def test_draft_decoding_keeps_full_size_metadata_and_still_refuses_truncation(cfg: Settings) -> None:
    data = badfiles.encode(badfiles.noisy_rgb(800, 600), "JPEG", quality=90)
    decoded = inspect_and_decode("photo.jpg", data, cfg, draft_size=256)
    assert (decoded.width, decoded.height) == (800, 600)
    assert decoded.image.size[0] < 800 and min(decoded.image.size) >= 256
    with pytest.raises(ImageRefused, match="truncated or corrupt JPEG"):
        inspect_and_decode("cut.jpg", data[: len(data) * 2 // 3], cfg, draft_size=256)


def test_sha256_is_of_the_exact_bytes(cfg: Settings) -> None:
    import hashlib

    data = badfiles.png()
    assert inspect_and_decode("a.png", data, cfg).sha256 == hashlib.sha256(data).hexdigest()


def _appended(fmt: str, tail: bytes, **params: object) -> bytes:
    return badfiles.encode(badfiles.noisy_rgb(28, 28), fmt, **params) + tail


JUNK = bytes(range(256)) * 8192  # 2 MiB that is no part of any image


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("GIF", {}), ("WEBP", {"lossless": True})],
)
def test_data_appended_after_the_image_end_is_refused_naming_the_byte_count(
    cfg: Settings, fmt: str, params: dict[str, object]
) -> None:
    with pytest.raises(ImageRefused) as caught:
        inspect_and_decode(f"photo.{fmt.lower()}", _appended(fmt, JUNK, **params), cfg)
    assert f"{len(JUNK):,} bytes of other data follow the end of the {fmt} image" in caught.value.reason
    # A little padding, as some encoders and transfers leave, is no reason to refuse a photo.
    padded = _appended(fmt, b"\x00" * cfg.max_trailing_bytes, **params)
    assert inspect_and_decode("padded", padded, cfg).format == fmt


@pytest.mark.parametrize(
    "tail",
    [
        b"<html><body><script>" + b"alert(1);" * 200 + b"</script></body></html>",  # PNG+HTML polyglot
        badfiles.make_zip([("payload.bin", np.random.default_rng(0).bytes(4096))]),  # PNG+zip polyglot
    ],
)
def test_polyglots_are_refused(cfg: Settings, tail: bytes) -> None:
    data = _appended("PNG", tail)
    with pytest.raises(ImageRefused, match=f"{len(tail):,} bytes of other data follow the end of the PNG image"):
        inspect_and_decode("polyglot.png", data, cfg)


def test_jpeg_end_is_found_past_restart_markers_and_exif_thumbnails(cfg: Settings) -> None:
    photo = badfiles.noisy_rgb(64, 48)
    thumb_jpeg = badfiles.encode(badfiles.noisy_rgb(16, 12, seed=1), "JPEG")
    exif = Image.Exif()
    exif[0x010F] = "Camera"
    # An EXIF block holding a whole JPEG (its own SOI..EOI) inside APP1, and restart markers in the scan.
    app1 = b"Exif\x00\x00" + exif.tobytes() + thumb_jpeg
    data = badfiles.encode(photo, "JPEG", exif=app1, restart_marker_blocks=1)
    assert data.count(b"\xff\xd9") >= 2 and b"\xff\xd0" in data
    assert inspect_and_decode("camera.jpg", data, cfg).width == 64
    with pytest.raises(ImageRefused, match=f"{len(JUNK):,} bytes of other data"):
        inspect_and_decode("camera.jpg", data + JUNK, cfg)


def test_multi_picture_jpegs_keep_their_further_pictures_but_not_junk(cfg: Settings) -> None:
    frames = [badfiles.noisy_rgb(40, 30, seed=s) for s in (1, 2)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="MPO", save_all=True, append_images=frames[1:])
    mpo = buffer.getvalue()
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    assert inspect_and_decode("stereo.jpg", mpo, cfg).format == "JPEG"
    with pytest.raises(ImageRefused, match=f"{len(JUNK):,} bytes of other data"):
        inspect_and_decode("stereo.jpg", mpo + JUNK, cfg)


def test_animated_gifs_end_after_their_last_frame(cfg: Settings) -> None:
    frames = [badfiles.noisy_rgb(20, 20, seed=s).convert("P") for s in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], comment=b"made by hand")
    assert inspect_and_decode("spin.gif", buffer.getvalue(), cfg).format == "GIF"
    with pytest.raises(ImageRefused, match=f"{len(JUNK):,} bytes of other data"):
        inspect_and_decode("spin.gif", buffer.getvalue() + JUNK, cfg)


def test_the_phash_dct_is_scipys_orthonormal_dct_so_hashes_stored_before_still_match() -> None:
    # content_hashes takes the pHash's 8x8 lowest frequencies as two matrix products; the hashes stored before it
    # came from scipy.fft.dctn(norm="ortho"), and near-duplicate matching compares the two.
    fft = pytest.importorskip("scipy.fft")  # installed with scikit-learn; the app itself no longer imports it
    from core.catalog.imaging import _PHASH_DCT

    rng = np.random.default_rng(0)
    for _ in range(20):
        grey = rng.integers(0, 256, (32, 32)).astype(np.float64)
        np.testing.assert_allclose(
            _PHASH_DCT @ grey @ _PHASH_DCT.T, fft.dctn(grey, norm="ortho")[:8, :8], rtol=0, atol=1e-9
        )
