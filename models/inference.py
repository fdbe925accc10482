"""Batched, calibrated inference over model-sized pixels, tuned per device (see benchmarks/bench_inference.py)."""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from models.checkpoint import CheckpointMeta
from models.devices import pick_device
from models.preprocess import PixelRows, pixels_to_tensor


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm that directly follows a Conv2d into the conv (same outputs, fewer passes).

    Works on the module tree without tracing: for timm ResNets each `convN` is followed by its `bnN`, and
    `downsample` is Sequential(conv, bn). Anything that does not fit the pattern is left untouched.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for parent in model.modules():
        children = list(parent.named_children())
        for (name_a, a), (name_b, b) in itertools.pairwise(children):
            # Exact type: timm's BatchNormAct2d subclasses BatchNorm2d but also applies an activation.
            if isinstance(a, nn.Conv2d) and type(b) is nn.BatchNorm2d and _is_conv_bn_pair(parent, name_a, name_b):
                setattr(parent, name_a, fuse_conv_bn_eval(a, b))
                setattr(parent, name_b, nn.Identity())
    return model


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX); without it bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            flags = handle.read(1 << 16)
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _is_conv_bn_pair(parent: nn.Module, conv_name: str, bn_name: str) -> bool:
    """True when `bn` consumes `conv`'s output directly: a Sequential, or timm's convN/bnN naming."""
    if isinstance(parent, nn.Sequential):
        return True
    conv_suffix = conv_name.removeprefix("conv")
    return conv_name.startswith("conv") and bn_name == f"bn{conv_suffix}"


class Classifier:
    """A loaded model ready to score images: eval mode, inference_mode, channels_last, conv-bn folded, bf16.

    bf16 autocast is used on CUDA, and on CPUs with native bf16 (`cpu_bf16=None` decides by the CPU flags; pass
    False for bit-for-bit fp32). Measured in benchmarks/bench_inference.py. `predict_pixels` returns calibrated
    probabilities softmax(logits / meta.temperature).
    """

    def __init__(
        self,
        model: nn.Module,
        meta: CheckpointMeta,
        device: torch.device | str | None = None,
        *,
        fuse: bool = True,
        channels_last: bool = True,
        cpu_bf16: bool | None = None,
    ) -> None:
        self.device = pick_device(device or "auto") if not isinstance(device, torch.device) else device
        self.meta = meta
        self.cfg = meta.preprocess
        self.class_names = list(meta.class_names)
        self.temperature = float(meta.temperature)
        self.channels_last = channels_last
        if self.device.type == "cuda":
            self.autocast_dtype: torch.dtype | None = torch.bfloat16
        elif self.device.type == "cpu" and (cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16):
            self.autocast_dtype = torch.bfloat16
        else:
            self.autocast_dtype = None
        model = model.eval()
        if fuse:
            # Conv-BN folding is exact in eval mode and measured faster on CPU; it also helps a little on GPU.
            # Fused on a copy: the caller's model keeps its state-dict keys (it may still be saved or trained).
            with torch.no_grad():
                model = fuse_conv_bn(copy.deepcopy(model))
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=memory_format)  # type: ignore[call-overload]  # torch stub lacks this

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with torch.inference_mode():
            if self.autocast_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    yield
            else:
                yield

    def _batches(self, pixels: PixelRows | torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        if len(pixels) == 0:
            return
        for start in range(0, len(pixels), batch_size):
            yield pixels_to_tensor(
                pixels[start : start + batch_size], self.cfg, self.device, channels_last=self.channels_last
            )

    def logits_pixels(self, pixels: PixelRows | torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        """Raw float32 logits (N, C) for uint8 NHWC pixels made by `to_model_pixels`."""
        out = [np.zeros((0, len(self.class_names)), dtype=np.float32)]
        with self._context():
            for batch in self._batches(pixels, batch_size):
                out.append(self.model(batch).float().cpu().numpy())
        return np.concatenate(out)

    def predict_pixels(self, pixels: PixelRows | torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        """Calibrated probabilities (N, C), float32, rows summing to 1."""
        logits = torch.from_numpy(self.logits_pixels(pixels, batch_size=batch_size))
        return torch.softmax(logits / self.temperature, dim=1).numpy()

    def probs_from_features(self, features: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, C) from pooled backbone features (`features_pixels`): the classifier head
        alone, so cached features give predictions without another pass through the backbone."""
        head = self.model.get_classifier()
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(self.device)
            logits = head(x).float()
            return torch.softmax(logits / self.temperature, dim=1).cpu().numpy()

    def features_pixels(self, pixels: PixelRows | torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        """Pooled backbone features (N, D) float32, the input of the classifier head (quick retraining reuses them)."""
        chunks: list[np.ndarray] = []
        with self._context():
            for batch in self._batches(pixels, batch_size):
                feats = self.model.forward_head(self.model.forward_features(batch), pre_logits=True)
                chunks.append(feats.float().cpu().numpy())
        if not chunks:
            return np.zeros((0, int(self.model.num_features)), dtype=np.float32)
        return np.concatenate(chunks)


def top_k(probs: np.ndarray, class_names: list[str], k: int = 3) -> list[list[tuple[str, float]]]:
    """Per row, the k most probable (class name, probability) pairs, most probable first."""
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] != len(class_names):
        raise ValueError(f"probs shaped {probs.shape} do not match {len(class_names)} class names")
    k = max(0, min(k, len(class_names)))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(class_names[j], float(row[j])) for j in idx] for row, idx in zip(probs, order, strict=True)]
