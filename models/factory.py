"""Building timm networks from resolved starting weights (file, hub, bundled, none), and their preprocessing."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import timm
import timm.data
import torch
from safetensors.torch import load_file
from torch import nn

from models.errors import WeightsInvalid, WeightsUnavailable
from models.pretrained import StartingWeights, WeightsSource

log = logging.getLogger(__name__)

# The square input sizes a model may be trained at or loaded with: at 1024 px one batch of 64 photos is already 800 MB
# of input; a checkpoint claiming 20,000 would allocate tens of gigabytes per photo.
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 1024


class TimmNetwork(Protocol):
    """The timm model methods this library calls. torch types a module's unknown attributes as `Tensor | Module`
    (`nn.Module.__getattr__`), so these are reached through `timm_api`."""

    pretrained_cfg: dict[str, Any]
    num_features: int

    def get_classifier(self) -> nn.Module: ...

    def reset_classifier(self, num_classes: int) -> None: ...

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...


def timm_api(model: nn.Module) -> TimmNetwork:
    """`model` as a timm network, for the type checker only (no check at run time: a non-timm module fails on use)."""
    return cast(TimmNetwork, model)


@dataclass(frozen=True)
class PretrainedInfo:
    """Where the starting weights came from (a `WeightsSource` value) and a sentence for people."""

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
    pretrained: str = "none",
    pretrained_file: str | os.PathLike[str] | None = None,
) -> tuple[nn.Module, PretrainedInfo]:
    """A timm network with a fresh `num_classes` head, started from the weights source named by `pretrained`.

    "none": random init. "file" and "bundled": the safetensors `pretrained_file` (head tensors whose shape differs
    are dropped; backbone tensors must all match). "hub": timm's normal download path. Which source to use is
    decided beforehand by `models.pretrained.resolve_starting_weights`; here a source that fails raises
    (WeightsInvalid, WeightsUnavailable) instead of silently starting from random weights.
    Raises ValueError for an unknown architecture, source or a non-positive class count.
    """
    try:
        source = WeightsSource(pretrained)
    except ValueError:
        options = ", ".join(s.value for s in WeightsSource)
        raise ValueError(f"unknown pretrained source {pretrained!r}: use one of {options}") from None
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if not timm.is_model(arch):
        raise ValueError(f"unknown architecture {arch!r}: not a timm model name (see timm.list_models())")

    if source is WeightsSource.HUB:
        try:
            model = timm.create_model(arch, pretrained=True, num_classes=num_classes)
        except Exception as exc:  # offline, proxy, missing weights: say so, never hand back random weights
            raise WeightsUnavailable(f"timm hub weights for {arch} could not be loaded: {exc}") from exc
        hub_classes = timm_api(model).pretrained_cfg.get("num_classes")
        if num_classes != hub_classes:  # timm kept the hub's head when the sizes match
            _zero_head(model)
        return model, PretrainedInfo(source.value, f"{arch}: pretrained weights from the timm hub")
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    if source is WeightsSource.NONE:
        return model, PretrainedInfo(
            source.value, f"{arch}: random initial weights; accuracy will be much lower than with pretrained weights"
        )
    if pretrained_file is None:
        raise WeightsUnavailable(f"pretrained source {source.value!r} needs a weights file, and none was given")
    path = Path(pretrained_file)
    skipped = _load_backbone_file(model, path)
    if skipped:
        _zero_head(model)
    extra = f" (new {len(skipped)}-tensor classifier head)" if skipped else ""
    what = "the bundled ImageNet weights" if source is WeightsSource.BUNDLED else f"pretrained weights from {path}"
    return model, PretrainedInfo(source.value, f"{arch}: {what}{extra}")


def _zero_head(model: nn.Module) -> None:
    """Start a new head on pretrained features at zero: the first loss is log(classes) and the first gradients reach
    the head only, so fine-tuning does not push large random-head errors into the pretrained backbone."""
    head = timm_api(model).get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)


def build_network(weights: StartingWeights, num_classes: int) -> nn.Module:
    """The network a resolved `StartingWeights` describes, with a fresh `num_classes` head."""
    model, _ = create_network(weights.arch, num_classes, pretrained=weights.source.value, pretrained_file=weights.path)
    return model


def _load_backbone_file(model: nn.Module, path: Path) -> list[str]:
    """Load safetensors weights into `model`, dropping keys whose shape differs (the classifier head).

    Returns the dropped keys. Raises WeightsInvalid when the file is missing, not safetensors, or does not match.
    """
    if not path.is_file():
        raise WeightsInvalid(f"pretrained weights file {path} does not exist")
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise WeightsInvalid(f"pretrained weights file {path} is not a readable safetensors file ({exc})") from exc
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
        raise WeightsInvalid(
            f"{path} does not match the architecture: {len(wrong_shape)} backbone tensors have other shapes "
            f"(e.g. {k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model)"
        )
    state = {k: v for k, v in state.items() if k not in mismatched}
    result = model.load_state_dict(state, strict=False)
    backbone_missing = [k for k in result.missing_keys if k not in mismatched and not is_head(k)]
    if backbone_missing:
        raise WeightsInvalid(
            f"{path} does not match the architecture: {len(backbone_missing)} backbone tensors missing "
            f"(e.g. {backbone_missing[0]})"
        )
    return mismatched


# The share of the (shorter side of the) photo the model sees: all of it. timm's models carry ImageNet's evaluation
# crop (0.875: the centre, zoomed in, as the objects of ImageNet photos sit there), but a catalogue photo's edges are
# the product's (a sleeve, a shoe's toe, a strap), and the model should see what the person reviewing it sees.
# Measured (docs/benchmarks.md, "And the whole photo"): the bundled Lite0's stage-pooled quick head from 1,000
# Fashion-MNIST labels, 82.8 % at 0.875 and 84.6 % at 1.0 on 2,000 official test images (paired SE 0.64 points).
# A checkpoint records the crop it was trained with (`CheckpointMeta.crop_pct`), so older versions keep theirs.
CROP_PCT = 1.0


def preprocessing_config(model: nn.Module, image_size: int) -> PreprocessConfig:
    """The model's normalisation and resampling from `timm.data.resolve_data_config`, at a square `image_size`,
    with the whole photo (`CROP_PCT`) rather than timm's ImageNet evaluation crop."""
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels, got {image_size}")
    data = timm.data.resolve_data_config({"input_size": (3, image_size, image_size)}, model=model)
    return PreprocessConfig(
        image_size=int(image_size),
        mean=tuple(float(x) for x in data["mean"]),  # type: ignore[arg-type]  # timm gives 3 RGB values
        std=tuple(float(x) for x in data["std"]),  # type: ignore[arg-type]  # timm gives 3 RGB values
        crop_pct=CROP_PCT,
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
