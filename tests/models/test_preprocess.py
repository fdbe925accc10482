"""The shared pixel path and batched augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.factory import PreprocessConfig
from models.preprocess import augment_batch, pixels_to_tensor, to_model_pixels

CFG = PreprocessConfig(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=0.8,
                       interpolation="bilinear")  # fmt: skip


def _photo(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * 1000 + height)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


def test_to_model_pixels_shape_and_determinism() -> None:
    photo = _photo(120, 80)
    first = to_model_pixels(photo, CFG)
    assert first.shape == (32, 32, 3)
    assert first.dtype == np.uint8
    np.testing.assert_array_equal(first, to_model_pixels(photo, CFG))


def test_to_model_pixels_centre_crops_after_resizing_shorter_side() -> None:
    # Left half black, right half white, on a wide photo: the centre crop must show both halves evenly.
    pixels = np.zeros((100, 300, 3), dtype=np.uint8)
    pixels[:, 150:] = 255
    out = to_model_pixels(Image.fromarray(pixels), CFG)
    assert out[:, :14].max() < 10
    assert out[:, 18:].min() > 245
    # Shorter side becomes round(32 / 0.8) = 40, so a 100x100 square photo loses 4 px each side, not more.
    square = np.zeros((100, 100, 3), dtype=np.uint8)
    square[:10] = 255  # a top band of 10% -> 4 px at 40 px, fully cropped away by the 4 px margin
    assert to_model_pixels(Image.fromarray(square), CFG)[0].max() < 128


def test_to_model_pixels_converts_other_modes() -> None:
    grey = Image.new("L", (50, 40), color=200)
    assert to_model_pixels(grey, CFG).shape == (32, 32, 3)


def test_pixels_to_tensor_normalises_to_nchw() -> None:
    pixels = np.full((2, 32, 32, 3), 191, dtype=np.uint8)
    pixels[1, ..., 0] = 64
    out = pixels_to_tensor(pixels, CFG, "cpu", channels_last=True)
    assert out.shape == (2, 3, 32, 32)
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out[0, 0, 0, 0].item() == pytest.approx((191 / 255 - 0.5) / 0.25)
    assert out[1, 0, 5, 5].item() == pytest.approx((64 / 255 - 0.5) / 0.25)
    assert out[1, 1, 5, 5].item() == pytest.approx((191 / 255 - 0.5) / 0.25)


def test_pixels_to_tensor_refuses_wrong_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        pixels_to_tensor(np.zeros((1, 32, 32, 3), dtype=np.float32), CFG, "cpu")
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        pixels_to_tensor(np.zeros((1, 3, 32, 32), dtype=np.uint8), CFG, "cpu")


def test_augment_batch_keeps_shape_and_changes_pixels_reproducibly() -> None:
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.integers(0, 256, size=(8, 3, 32, 32), dtype=np.uint8))
    out = augment_batch(batch, generator=torch.Generator().manual_seed(1))
    assert out.shape == batch.shape
    assert out.dtype == torch.uint8
    assert out.device == batch.device
    changed = (out != batch).flatten(1).any(dim=1)
    assert bool(changed.all()), "every image should be augmented"
    again = augment_batch(batch, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, again)
    other = augment_batch(batch, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(out, other)


def test_augment_batch_keeps_a_flat_image_close_to_its_colour() -> None:
    # Geometry must not invent content: a flat colour stays flat (only jitter moves it, within about 20%).
    batch = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
    batch[:, 0] = 150
    batch[:, 1] = 100
    batch[:, 2] = 50
    out = augment_batch(batch, generator=torch.Generator().manual_seed(0)).float()
    per_image_std = out.flatten(2).std(dim=2)
    assert per_image_std.max() < 1.0
    assert (out[:, 0] > out[:, 2]).all()


def test_augment_batch_refuses_float_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        augment_batch(torch.zeros(1, 3, 8, 8), generator=torch.Generator())


def test_read_only_memmaps_are_accepted_without_warnings(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    path = tmp_path / "pixels.u8"
    np.memmap(path, dtype=np.uint8, mode="w+", shape=(2, 32, 32, 3))[:] = 100
    cache = np.memmap(path, dtype=np.uint8, mode="r", shape=(2, 32, 32, 3))
    out = pixels_to_tensor(cache[:2], CFG, "cpu")
    assert out.shape == (2, 3, 32, 32)
    assert not [w for w in recwarn if "not writable" in str(w.message)]
