"""Fixtures for the pure ML library: tiny resnet18 networks and learnable synthetic pixels, no network access."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.factory import PreprocessConfig, create_network, preprocessing_config, timm_api

CLASSES = ["Shoes", "Bags", "Hats"]
COLOURS = np.array([[200, 40, 40], [40, 160, 60], [40, 60, 200]], dtype=np.float32)


def linear_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The classifier of a timm network these tests build: a Linear layer (resnet18's `fc`, a stage-pooled head)."""
    head = timm_api(model).get_classifier()
    assert isinstance(head, torch.nn.Linear), type(head)
    return head


def synthetic_pixels(per_class: int, size: int = 32, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, S, S, 3) images: one colour and one bright band position per class, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    pixels = COLOURS[labels][:, None, None, :] + rng.normal(0, 20, size=(len(labels), size, size, 3))
    band = size // 3
    for i, label in enumerate(labels):
        pixels[i, label * band : (label + 1) * band] = 255 - pixels[i, label * band : (label + 1) * band]
    return np.clip(pixels, 0, 255).astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_net() -> torch.nn.Module:
    model, _ = create_network("resnet18", len(CLASSES), pretrained="none")
    return model


@pytest.fixture
def tiny_cfg(tiny_net: torch.nn.Module) -> PreprocessConfig:
    return preprocessing_config(tiny_net, 32)
