"""Features from several depths of a network: the pooled outputs of some inner blocks next to its final features.

A linear head on the final pooled features of an ImageNet network sees only what ImageNet's last layers learned to
keep; catalogue photos that look unlike ImageNet (28-pixel grey Fashion-MNIST, flat-lay product shots) are told apart
better by mid-level features too (Evci et al., "Head2Toe: Utilizing Intermediate Representations for Better Transfer
Learning", ICML 2022). `StagePooledNet` wraps a timm network so that its features are the global-average-pooled
outputs of `blocks` concatenated with the final pooled features, one forward pass, and its classifier is a linear
layer over all of them; everything that handles a timm network (feature caches, quick heads, full fine-tuning,
inference) handles it the same way. `fit_linear_head` gives each block the same total variance (`block_dims`).

Measured (docs/benchmarks.md, "The CPU retrain default from pretrained weights"): with the bundled EfficientNet-Lite0
at 224 px and 1,000 Fashion-MNIST labels, blocks 3-6 plus the final features, each block scaled to equal variance,
took the quick head from 80.2 % to 82.8 % on 2,000 official test images (paired standard error 0.6 points), at no
extra forward cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.factory import timm_api

# Architectures whose new lineages use stage-pooled features, and which blocks: indices of
# `forward_intermediates(..., extra_blocks=True)` (0 is the stem, i the output of `blocks[i - 1]`). Only what was
# measured: EfficientNet-Lite0's blocks[3] to blocks[6] (80, 112, 192 and 320 channels).
STAGE_BLOCKS: dict[str, tuple[int, ...]] = {"efficientnet_lite0": (4, 5, 6, 7)}
MAX_BLOCK_INDEX = 64  # a sidecar naming more blocks than any network has is refused before anything is built


class StagePooledNet(nn.Module):
    """A timm network whose features are the pooled outputs of `blocks` plus its final pooled features.

    Offers the timm methods the library calls (`forward_features` returns the pooled, concatenated features,
    `forward_head(x, pre_logits=True)` passes them through), so a stage-pooled network is used exactly like a plain
    one. State-dict keys: `net.*` (the timm network, its own classifier removed) and `classifier.*`.
    """

    def __init__(self, net: nn.Module, blocks: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if not blocks or any(not 0 <= b <= MAX_BLOCK_INDEX for b in blocks) or list(blocks) != sorted(set(blocks)):
            raise ValueError(f"stage blocks must be distinct increasing indices 0-{MAX_BLOCK_INDEX}, got {blocks}")
        if not hasattr(net, "forward_intermediates"):
            raise ValueError(f"{type(net).__name__} has no forward_intermediates: its inner blocks cannot be pooled")
        self.net = net
        self.blocks = tuple(int(b) for b in blocks)
        timm_api(net).reset_classifier(0)
        self.block_dims = self._probe_dims()
        self.num_features = sum(self.block_dims)
        self.classifier: nn.Module = nn.Linear(self.num_features, num_classes)
        self.pretrained_cfg: dict[str, Any] = {**timm_api(net).pretrained_cfg, "classifier": "classifier"}

    def _probe_dims(self) -> tuple[int, ...]:
        """Channels of each pooled block and of the final features, from one tiny forward pass."""
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                pooled = self._pooled(torch.zeros(1, 3, 64, 64))
        except (IndexError, RuntimeError, TypeError, AssertionError) as exc:
            raise ValueError(f"blocks {self.blocks} cannot be taken from {type(self.net).__name__}: {exc}") from exc
        finally:
            self.net.train(was_training)
        return tuple(int(p.shape[1]) for p in pooled)

    def _pooled(self, x: torch.Tensor) -> list[torch.Tensor]:
        final, inner = self.net.forward_intermediates(x, indices=list(self.blocks), extra_blocks=True)  # type: ignore[operator]  # a timm method
        if len(inner) != len(self.blocks):
            raise IndexError(f"the network returned {len(inner)} of the {len(self.blocks)} blocks asked for")
        return [t.mean(dim=(2, 3)) for t in inner] + [timm_api(self.net).forward_head(final, pre_logits=True)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._pooled(x), dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def stage_blocks(model: nn.Module) -> list[int]:
    """The pooled blocks of a stage-pooled network (what its checkpoint records), [] for a plain one."""
    return list(model.blocks) if isinstance(model, StagePooledNet) else []


def block_dims(model: nn.Module) -> tuple[int, ...] | None:
    """The widths of a stage-pooled network's feature blocks (for `fit_linear_head`), None for a plain one."""
    return model.block_dims if isinstance(model, StagePooledNet) else None


def with_stage_features(model: nn.Module, arch: str) -> nn.Module:
    """`model` wrapped as a `StagePooledNet` when `arch` has measured stage blocks (STAGE_BLOCKS), else unchanged."""
    blocks = STAGE_BLOCKS.get(arch)
    if not blocks:
        return model
    head = timm_api(model).get_classifier()
    num_classes = int(head.out_features) if isinstance(head, nn.Linear) else 1
    wrapped = StagePooledNet(model, blocks, num_classes)
    classifier = wrapped.classifier
    assert isinstance(classifier, nn.Linear)
    nn.init.zeros_(classifier.weight)  # as a new head on pretrained features starts (models.factory)
    nn.init.zeros_(classifier.bias)
    return wrapped
