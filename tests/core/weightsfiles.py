"""Pretrained weights files made in the test: a timm resnet18 state dict as safetensors, with or without metadata."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from core.settings import get_settings

_ARCH = "resnet18"


@functools.cache
def _resnet18_state() -> dict:
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(_ARCH, pretrained=False, num_classes=3)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def write_resnet18_weights(path: Path, *, arch: str | None = _ARCH) -> Path:
    """A resnet18 backbone (3-class head) at `path`, its safetensors metadata naming `arch` (none when None)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_resnet18_state(), str(path), metadata={"arch": arch} if arch else None)
    return path


def write_corrupt_weights(path: Path) -> Path:
    """A `.safetensors` name over bytes that are not safetensors (a file cut short, or the wrong format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return path


def pretrained_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """PRODCAT_PRETRAINED=auto as shipped (the tests default to none), with timm's hub ruled out: never the network,
    and a developer's Hugging Face cache does not decide what a test sees."""
    monkeypatch.setenv("PRODCAT_PRETRAINED", "auto")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("models.pretrained.hub_cached", lambda arch: False)
    get_settings.cache_clear()
