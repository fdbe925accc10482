"""Features from several depths of a network: pooled outputs of some inner blocks next to its final features.

A linear head on the final pooled features of an ImageNet network sees only what ImageNet's last layers learned to
keep; catalogue photos that look unlike ImageNet (28-pixel grey Fashion-MNIST, flat-lay product shots) are told apart
better by mid-level features too (Evci et al., "Head2Toe: Utilizing Intermediate Representations for Better Transfer
Learning", ICML 2022). `StagePooledNet` wraps a timm network so that its features are the pooled outputs of some
blocks concatenated with the final pooled features, one forward pass, and its classifier is a linear layer over all
of them; everything that handles a timm network (feature caches, quick heads, full fine-tuning, inference) handles it
the same way. `fit_linear_head` gives each block of features the same total variance (`block_dims`).

How a block is pooled (`BlockPooling`): its global mean (the first stage-pooled lineages), or where things are and how
they vary (`HALVES_MIRROR_STD`: the mean of the top and of the bottom half of the map, how much the left and right
halves differ in each, and each channel's spread over the map). The second keeps the layout a global mean throws away
(a collar at the top, a hem at the bottom, long or short sleeves) and stays the same for a mirrored photo: a shoe
pointing left or right gives the same features. Measured (docs/benchmarks.md, "Where things are in the photo"):
with the bundled EfficientNet-Lite0 at 224 px and 1,000 Fashion-MNIST labels, over three random samples of labels and
the whole official test set, 83.2 % with global means and 85.5 % with `HALVES_MIRROR_STD`, from the same single
forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.factory import timm_api

MAX_BLOCK_INDEX = 64  # a sidecar naming more blocks than any network has is refused before anything is built
_STD_EPS = 1e-5  # keeps a constant channel's spread (and its gradient) finite


class BlockPooling(StrEnum):
    """How each inner block's feature map becomes features (recorded in the checkpoint sidecar)."""

    MEAN = "mean"  # the global mean of each channel
    HALVES_MIRROR_STD = "halves-mirror-std"  # top/bottom half means, |left - right| of each, spread over the map


@dataclass(frozen=True)
class StageLayout:
    """Which blocks of a network are pooled into its features, and how."""

    blocks: tuple[int, ...]
    pooling: BlockPooling = BlockPooling.MEAN

    def __post_init__(self) -> None:
        b = self.blocks
        if not b or any(not 0 <= i <= MAX_BLOCK_INDEX for i in b) or list(b) != sorted(set(b)):
            raise ValueError(f"stage blocks must be distinct increasing indices 0-{MAX_BLOCK_INDEX}, got {list(b)}")

    def describe(self) -> str:
        """Say, "halves-mirror-std of blocks 4, 5, 6, 7"."""
        return f"{self.pooling.value} of blocks {', '.join(str(b) for b in self.blocks)}"


# Architectures whose new quick-mode lineages use stage-pooled features, and how: only what was measured,
# EfficientNet-Lite0's blocks[3] to blocks[6] (80, 112, 192 and 320 channels; indices of
# `forward_intermediates(..., extra_blocks=True)`, where 0 is the stem and i the output of `blocks[i - 1]`).
STAGE_LAYOUTS: dict[str, StageLayout] = {
    "efficientnet_lite0": StageLayout((4, 5, 6, 7), BlockPooling.HALVES_MIRROR_STD),
}


def pool_block(fmap: torch.Tensor, pooling: BlockPooling) -> list[torch.Tensor]:
    """The feature blocks of one (N, C, H, W) map: [mean] or [top/bottom means, |left - right| per half, spread].

    `HALVES_MIRROR_STD` is unchanged by mirroring the map left to right. Computed in float32 (a spread's squares
    would overflow half precision).
    """
    if pooling is BlockPooling.MEAN:
        return [fmap.mean(dim=(2, 3))]
    x = fmap.float()
    quarters = F.adaptive_avg_pool2d(x, 2)  # (N, C, 2 rows, 2 columns)
    halves = quarters.mean(dim=3).flatten(1)  # [c0 top, c0 bottom, c1 top, ...]
    mirror = (quarters[..., 0] - quarters[..., 1]).abs().flatten(1)
    spread = (x.var(dim=(2, 3), correction=0) + _STD_EPS).sqrt()
    return [halves, mirror, spread]


class StagePooledNet(nn.Module):
    """A timm network whose features are the pooled outputs of `layout.blocks` plus its final pooled features.

    Offers the timm methods the library calls (`forward_features` returns the pooled, concatenated features,
    `forward_head(x, pre_logits=True)` passes them through), so a stage-pooled network is used exactly like a plain
    one. State-dict keys: `net.*` (the timm network, its own classifier removed) and `classifier.*`.
    """

    def __init__(self, net: nn.Module, layout: StageLayout, num_classes: int) -> None:
        super().__init__()
        if not hasattr(net, "forward_intermediates"):
            raise ValueError(f"{type(net).__name__} has no forward_intermediates: its inner blocks cannot be pooled")
        self.net = net
        self.layout = layout
        timm_api(net).reset_classifier(0)
        self.block_dims = self._probe_dims()
        self.num_features = sum(self.block_dims)
        self.classifier: nn.Module = nn.Linear(self.num_features, num_classes)
        self.pretrained_cfg: dict[str, Any] = {**timm_api(net).pretrained_cfg, "classifier": "classifier"}

    def _probe_dims(self) -> tuple[int, ...]:
        """Widths of each block of features (every pooled part of every block, then the final features), from one
        tiny forward pass."""
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                pooled = self._pooled(torch.zeros(1, 3, 64, 64))
        except (IndexError, RuntimeError, TypeError, AssertionError) as exc:
            raise ValueError(
                f"blocks {self.layout.blocks} cannot be taken from {type(self.net).__name__}: {exc}"
            ) from exc
        finally:
            self.net.train(was_training)
        return tuple(int(p.shape[1]) for p in pooled)

    def _pooled(self, x: torch.Tensor) -> list[torch.Tensor]:
        blocks = self.layout.blocks
        final, inner = self.net.forward_intermediates(x, indices=list(blocks), extra_blocks=True)  # type: ignore[operator]  # a timm method
        if len(inner) != len(blocks):
            raise IndexError(f"the network returned {len(inner)} of the {len(blocks)} blocks asked for")
        pooled = [part for fmap in inner for part in pool_block(fmap, self.layout.pooling)]
        return [*pooled, timm_api(self.net).forward_head(final, pre_logits=True).float()]

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


def stage_layout(model: nn.Module) -> StageLayout | None:
    """The layout of a stage-pooled network (what its checkpoint records), None for a plain one."""
    return model.layout if isinstance(model, StagePooledNet) else None


def block_dims(model: nn.Module) -> tuple[int, ...] | None:
    """The widths of a stage-pooled network's feature blocks (for `fit_linear_head`), None for a plain one."""
    return model.block_dims if isinstance(model, StagePooledNet) else None


def with_stage_features(model: nn.Module, arch: str) -> nn.Module:
    """`model` wrapped as a `StagePooledNet` when `arch` has a measured layout (STAGE_LAYOUTS), else unchanged."""
    layout = STAGE_LAYOUTS.get(arch)
    if layout is None:
        return model
    head = timm_api(model).get_classifier()
    return _wrapped(model, layout, int(head.out_features) if isinstance(head, nn.Linear) else 1)


def with_measured_layout(model: nn.Module, arch: str) -> tuple[nn.Module, StageLayout | None]:
    """A stage-pooled `model` whose layout differs from the one measured for `arch`, re-pooled: the same backbone (as
    trained so far) under today's layout with a new zero head, and the layout it had. Anything else comes back
    unchanged, with None.

    For quick heads only, which are fitted from zero on the features anyway. A plain network stays plain: stage
    features are chosen when a lineage starts (`with_stage_features`), and were measured on pretrained backbones
    only, not on ones fine-tuned in full."""
    layout = STAGE_LAYOUTS.get(arch)
    if layout is None or not isinstance(model, StagePooledNet) or model.layout == layout:
        return model, None
    classifier = model.classifier
    num_classes = int(classifier.out_features) if isinstance(classifier, nn.Linear) else 1
    return _wrapped(model.net, layout, num_classes), model.layout


def _wrapped(net: nn.Module, layout: StageLayout, num_classes: int) -> StagePooledNet:
    wrapped = StagePooledNet(net, layout, num_classes)
    classifier = wrapped.classifier
    assert isinstance(classifier, nn.Linear)
    nn.init.zeros_(classifier.weight)  # as a new head on pretrained features starts (models.factory)
    nn.init.zeros_(classifier.bias)
    return wrapped
