"""Building timm networks with pretrained weights from a local file, the hub, or none, and their preprocessing."""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import timm
import timm.data
import torch
from safetensors.torch import load_file
from torch import nn

log = logging.getLogger(__name__)

PRETRAINED_CHOICES = ("auto", "hub", "file", "none")
_HUB_HOST = ("huggingface.co", 443)
_HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class PretrainedInfo:
    """Where the starting weights came from: source is "file", "hub" or "none"; message is for the UI."""

    source: str
    message: str


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything needed to turn a photo into model input: square size, normalisation, crop and resampling."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    interpolation: str

    @property
    def resize_size(self) -> int:
        """The shorter side a photo is resized to before the centre crop (timm's eval transform rule)."""
        return round(self.image_size / self.crop_pct)


def create_network(
    arch: str,
    num_classes: int,
    *,
    pretrained: str = "auto",
    pretrained_file: str | os.PathLike[str] | None = None,
) -> tuple[nn.Module, PretrainedInfo]:
    """A timm network with a fresh `num_classes` head, and a note saying which starting weights it got.

    `pretrained`: "file" loads `pretrained_file` (.safetensors; head keys whose shape differs are dropped), "hub"
    uses timm's normal download path, "none" keeps random init, "auto" tries file (if given), then hub, then none.
    "file" and "hub" fall back to random init with a message saying why, so the UI can warn instead of failing.
    Raises ValueError for an unknown architecture, pretrained choice or a non-positive class count.
    """
    if pretrained not in PRETRAINED_CHOICES:
        raise ValueError(f"unknown pretrained source {pretrained!r}: use one of {', '.join(PRETRAINED_CHOICES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if not timm.is_model(arch):
        raise ValueError(f"unknown architecture {arch!r}: not a timm model name (see timm.list_models())")

    notes: list[str] = []
    if pretrained in ("auto", "file"):
        if pretrained_file is not None:
            model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
            try:
                skipped = _load_backbone_file(model, Path(pretrained_file))
            except Exception as exc:  # any unreadable file: fall back, and say so
                notes.append(f"could not load pretrained file {pretrained_file}: {exc}")
            else:
                extra = f" (new {len(skipped)}-tensor classifier head)" if skipped else ""
                return model, PretrainedInfo("file", f"{arch}: pretrained weights from {pretrained_file}{extra}")
        elif pretrained == "file":
            notes.append("pretrained source 'file' chosen but no pretrained file is set")
    if pretrained in ("auto", "hub"):
        try:
            model = _create_from_hub(arch, num_classes)
        except Exception as exc:  # offline, missing weights, proxy errors...: random init is still usable
            notes.append(f"hub weights unavailable: {exc}")
        else:
            return model, PretrainedInfo("hub", f"{arch}: pretrained weights from the timm hub")

    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    reason = "; ".join(notes) if notes else "pretrained weights switched off"
    return model, PretrainedInfo(
        "none", f"{arch}: random initial weights ({reason}); accuracy will be much lower than with pretrained weights"
    )


def _load_backbone_file(model: nn.Module, path: Path) -> list[str]:
    """Load safetensors weights into `model`, dropping keys whose shape differs (the classifier head).

    Returns the dropped keys. Raises when the file is missing, not safetensors, or matches too little of the model.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    state = load_file(str(path))
    own = model.state_dict()
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "")

    def is_head(key: str) -> bool:
        return bool(classifier) and key.startswith(f"{classifier}.")

    mismatched = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    # Only the head may differ (another number of classes) or be missing: anything else means the file is for a
    # different architecture (a resnet50 file for a resnet18 shares key names but not shapes).
    wrong_shape = [k for k in mismatched if not is_head(k)]
    if wrong_shape:
        k = wrong_shape[0]
        raise ValueError(
            f"{path} does not match the architecture: {len(wrong_shape)} backbone tensors have other shapes "
            f"(e.g. {k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model)"
        )
    state = {k: v for k, v in state.items() if k not in mismatched}
    result = model.load_state_dict(state, strict=False)
    backbone_missing = [k for k in result.missing_keys if k not in mismatched and not is_head(k)]
    if backbone_missing:
        raise ValueError(
            f"{path} does not match the architecture: {len(backbone_missing)} backbone tensors missing "
            f"(e.g. {backbone_missing[0]})"
        )
    return mismatched


def _create_from_hub(arch: str, num_classes: int) -> nn.Module:
    """timm's normal pretrained path, after a fast check that the hub is cached or reachable."""
    if not _hub_cached(arch) and not _hub_reachable():
        raise ConnectionError(f"{_HUB_HOST[0]} is not reachable and no cached weights were found")
    return timm.create_model(arch, pretrained=True, num_classes=num_classes)


def _hub_cached(arch: str) -> bool:
    """True when the Hugging Face cache already holds this architecture's default weights."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hub_id = timm.models.get_pretrained_cfg(arch.split(".")[0]).hf_hub_id
        if not hub_id:
            return False
        return isinstance(try_to_load_from_cache(hub_id, "model.safetensors"), str)
    except Exception:
        return False


def _hub_reachable() -> bool:
    """Probe the hub host in a thread so a hanging DNS lookup cannot stall model creation offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False

    def probe() -> bool:
        with socket.create_connection(_HUB_HOST, timeout=_HUB_PROBE_TIMEOUT_S):
            return True

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(probe).result(timeout=_HUB_PROBE_TIMEOUT_S)
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False)


def preprocessing_config(model: nn.Module, image_size: int) -> PreprocessConfig:
    """The model's eval preprocessing from `timm.data.resolve_data_config`, at a square `image_size`."""
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    data = timm.data.resolve_data_config({"input_size": (3, image_size, image_size)}, model=model)
    return PreprocessConfig(
        image_size=int(image_size),
        mean=tuple(float(x) for x in data["mean"]),  # type: ignore[arg-type]
        std=tuple(float(x) for x in data["std"]),  # type: ignore[arg-type]
        crop_pct=float(data.get("crop_pct") or 1.0),
        interpolation=str(data.get("interpolation") or "bilinear"),
    )


def head_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the classifier head (used to fingerprint the backbone without it)."""
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "")
    if not classifier:
        return []
    return [k for k in model.state_dict() if k.startswith(f"{classifier}.")]


def backbone_fingerprint(model: nn.Module) -> str:
    """A short content hash of the backbone weights (head excluded): equal ids mean reusable cached features."""
    skip = set(head_keys(model))
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        if key in skip or not torch.is_floating_point(tensor):
            continue
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
