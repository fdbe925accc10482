"""The one pixel path shared by training and inference, tensor conversion, and batched GPU-friendly augmentation."""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from models.factory import PreprocessConfig


class PixelRows(Protocol):
    """uint8 (N, S, S, 3) pixels that give an ordinary array per slice or index array: an ndarray, a memmap, or a
    lazy view over a pixel cache file, so a loop reads a whole split batch by batch without holding it in memory."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def ndim(self) -> int: ...

    @property
    def dtype(self) -> np.dtype: ...

    def __len__(self) -> int: ...

    def __getitem__(self, key: Any) -> np.ndarray: ...


_INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
}


def to_model_pixels(rgb: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Model-sized pixels of one photo: shorter side to round(S / crop_pct), centre crop S -> (S, S, 3) uint8.

    This is timm's eval transform without normalisation; the training pixel cache and inference both call it, so a
    photo looks exactly the same to the model in both places.
    """
    if rgb.mode != "RGB":
        rgb = rgb.convert("RGB")
    mode = _INTERPOLATIONS.get(cfg.interpolation, InterpolationMode.BILINEAR)
    resized = TF.resize(rgb, [cfg.resize_size], interpolation=mode, antialias=True)
    cropped = TF.center_crop(resized, [cfg.image_size, cfg.image_size])
    return np.asarray(cropped, dtype=np.uint8).copy()


def pixels_to_tensor(
    pixels: np.ndarray | torch.Tensor,
    cfg: PreprocessConfig,
    device: torch.device | str,
    *,
    channels_last: bool = True,
) -> torch.Tensor:
    """uint8 NHWC pixels (numpy, memmap or tensor) -> normalised float32 NCHW on `device`.

    The uint8 batch is copied to the device first (4x fewer bytes than float; pinned + non_blocking on CUDA) and
    converted there. Permuting NHWC to NCHW yields channels_last strides for free.
    """
    batch = _as_uint8_tensor(pixels)
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected uint8 pixels shaped (N, H, W, 3), got {tuple(batch.shape)}")
    batch = _to_device(batch, torch.device(device))
    return normalize_nchw(batch.permute(0, 3, 1, 2), cfg, channels_last=channels_last)


def normalize_nchw(batch: torch.Tensor, cfg: PreprocessConfig, *, channels_last: bool = True) -> torch.Tensor:
    """uint8 (or 0-255 float) NCHW on any device -> float32 (x/255 - mean) / std, optionally channels_last."""
    mean = torch.tensor(cfg.mean, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(cfg.std, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    out = (batch.float() - mean) / std
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return out.contiguous(memory_format=memory_format)


def _as_uint8_tensor(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = pixels if isinstance(pixels, torch.Tensor) else numpy_to_tensor(pixels)
    if tensor.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels, got {tensor.dtype}")
    return tensor


def numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor over `array`'s data, copying only when needed (read-only memmaps, non-contiguous slices)."""
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # torch cannot share read-only memory (e.g. a memmap opened with mode "r")
        array = array.copy()
    return torch.from_numpy(array)


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    if batch.device == device:
        return batch
    if device.type == "cuda" and batch.device.type == "cpu":
        # Pinned memory lets the copy overlap with compute on the GPU.
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def augment_batch(
    batch: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.6, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    jitter: float = 0.2,
) -> torch.Tensor:
    """Random resized crop, horizontal flip and colour jitter of a uint8 NCHW batch, all on the batch's device.

    Vectorised: one affine grid per sample (crop + flip) through `grid_sample`, then per-sample brightness,
    contrast and saturation factors in [1 - jitter, 1 + jitter]. Random parameters come from `generator` (on the
    CPU, so a seeded run augments identically on any device). Returns uint8 NCHW of the same shape.
    """
    if batch.ndim != 4 or batch.shape[1] != 3 or batch.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 (N, 3, H, W) batch, got {batch.dtype} {tuple(batch.shape)}")
    n = batch.shape[0]
    if n == 0:
        return batch
    device = batch.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    # Crop box as a fraction of the image side, with area in `scale` and aspect in `ratio` (log-uniform).
    area = uniform(*scale)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    # Centre anywhere that keeps the box inside the image (normalised coordinates in [-1, 1]).
    centre_x = (1.0 - width) * uniform(-1.0, 1.0)
    centre_y = (1.0 - height) * uniform(-1.0, 1.0)
    flip = torch.where(torch.rand(n, generator=generator) < flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y

    brightness = uniform(1 - jitter, 1 + jitter).view(n, 1, 1, 1).to(device)
    contrast = uniform(1 - jitter, 1 + jitter).view(n, 1, 1, 1).to(device)
    saturation = uniform(1 - jitter, 1 + jitter).view(n, 1, 1, 1).to(device)

    images = batch.float()
    grid = F.affine_grid(theta.to(device), list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    images = images * brightness
    grey_weights = torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)
    grey = (images * grey_weights).sum(dim=1, keepdim=True)
    images = (images - grey.mean(dim=(2, 3), keepdim=True)) * contrast + grey.mean(dim=(2, 3), keepdim=True)
    grey = (images * grey_weights).sum(dim=1, keepdim=True)
    images = (images - grey) * saturation + grey
    return images.clamp_(0, 255).round_().to(torch.uint8)
