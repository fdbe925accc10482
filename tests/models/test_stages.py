"""Stage-pooled features: a network whose features include its inner blocks, saved and loaded like any other, and a
head that gives each block of features the same weight."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch

from models.checkpoint import CheckpointMeta, load_checkpoint, read_meta, save_checkpoint, sidecar_path
from models.errors import CheckpointInvalid
from models.factory import preprocessing_config, timm_api
from models.stages import (
    STAGE_LAYOUTS,
    BlockPooling,
    StageLayout,
    StagePooledNet,
    pool_block,
    stage_layout,
    with_stage_features,
)
from models.training import TrainConfig, extract_features, fit_linear_head, set_head

CLASSES = ["Shoes", "Bags", "Hats"]


@pytest.fixture(scope="module")
def pooled() -> StagePooledNet:
    torch.manual_seed(0)
    net = with_stage_features(timm.create_model("efficientnet_lite0", num_classes=len(CLASSES)), "efficientnet_lite0")
    assert isinstance(net, StagePooledNet)
    return net.eval()


def test_the_lite0_features_are_where_things_are_in_blocks_3_to_6_and_its_final_features(
    pooled: StagePooledNet,
) -> None:
    # Per block: top and bottom half means (2C), left-right differences of each (2C), spreads (C); then the final 1,280.
    assert pooled.block_dims == (160, 160, 80, 224, 224, 112, 384, 384, 192, 640, 640, 320, 1280)
    assert pooled.num_features == 4800 and stage_layout(pooled) == STAGE_LAYOUTS["efficientnet_lite0"]
    assert stage_layout(pooled) == StageLayout((4, 5, 6, 7), BlockPooling.HALVES_MIRROR_STD)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = pooled.forward_features(x)
        net = timm_api(pooled.net)
        plain = net.forward_head(net.forward_features(x), pre_logits=True)
        assert features.shape == (2, 4800) and features.dtype == torch.float32
        assert torch.allclose(features[:, -1280:], plain)  # the final features are the plain network's own
        assert torch.allclose(pooled(x), pooled.classifier(features))
    assert not any(p.abs().sum() for p in pooled.classifier.parameters())  # a new head starts at zero


def test_block_means_still_build_the_first_stage_pooled_lineages_features() -> None:
    torch.manual_seed(0)
    net = StagePooledNet(timm.create_model("efficientnet_lite0"), StageLayout((4, 5, 6, 7)), len(CLASSES)).eval()
    assert net.block_dims == (80, 112, 192, 320, 1280) and net.num_features == 1984


def test_pooled_halves_tell_top_from_bottom_and_ignore_a_mirror_image() -> None:
    # A garment's collar at the top and its hem at the bottom are told apart; a shoe pointing left or right is not.
    fmap = torch.zeros(1, 1, 8, 8)
    fmap[..., :4, :3] = 1.0  # something in the top-left corner
    halves, mirror, spread = pool_block(fmap, BlockPooling.HALVES_MIRROR_STD)
    assert halves.tolist() == [[0.375, 0.0]]  # top half 12 of 32 cells, bottom half empty
    assert mirror.tolist() == [[0.75, 0.0]]  # the top half is lopsided, the bottom is not
    upside_down = pool_block(fmap.flip(2), BlockPooling.HALVES_MIRROR_STD)
    assert upside_down[0].tolist() == [[0.0, 0.375]]
    for a, b in zip(pool_block(fmap.flip(3), BlockPooling.HALVES_MIRROR_STD), (halves, mirror, spread), strict=True):
        assert torch.equal(a, b)
    assert pool_block(fmap, BlockPooling.MEAN)[0].tolist() == pool_block(fmap.flip(2), BlockPooling.MEAN)[0].tolist()


def test_a_one_pixel_map_pools_to_finite_features_with_finite_gradients() -> None:
    # A tiny image (or a late block at 32 px) leaves 1x1 maps: a spread of zero must not become NaN when trained.
    fmap = torch.rand(3, 5, 1, 1, requires_grad=True)
    parts = pool_block(fmap, BlockPooling.HALVES_MIRROR_STD)
    total = sum(p.sum() for p in parts)
    assert isinstance(total, torch.Tensor)
    total.backward()
    assert all(torch.isfinite(p).all() for p in parts) and fmap.grad is not None and torch.isfinite(fmap.grad).all()


def test_a_stage_pooled_checkpoint_loads_back_as_one_with_the_same_outputs(
    tmp_path: Path, pooled: StagePooledNet
) -> None:
    cfg = preprocessing_config(pooled, 64)
    pixels = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    features = extract_features(pooled, pixels, cfg)
    labels = np.array([0, 1, 2, 0, 1, 2])
    fit = fit_linear_head(features, labels, None, None, num_classes=3, blocks=pooled.block_dims)
    set_head(pooled, fit.weight, fit.bias)
    meta = CheckpointMeta.from_preprocess(
        "efficientnet_lite0", CLASSES, cfg, **CheckpointMeta.layout_fields(stage_layout(pooled))
    )
    path = save_checkpoint(tmp_path / "v1.safetensors", pooled, meta)
    assert json.loads(sidecar_path(path).read_text())["feature_pooling"] == "halves-mirror-std"

    loaded, loaded_meta = load_checkpoint(path)
    assert isinstance(loaded, StagePooledNet) and loaded_meta.stage_layout == stage_layout(pooled)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), pooled(x), atol=1e-5)
    assert np.allclose(extract_features(loaded, pixels, cfg), features, atol=1e-5)


def _saved_with_sidecar_edit(tmp_path: Path, net: StagePooledNet, edit: Callable[[dict[str, Any]], object]) -> Path:
    """`net` saved as a checkpoint with its layout in the sidecar, then the sidecar's JSON changed by `edit`."""
    cfg = preprocessing_config(net, 64)
    meta = CheckpointMeta.from_preprocess(
        "efficientnet_lite0", CLASSES, cfg, **CheckpointMeta.layout_fields(stage_layout(net))
    )
    path = save_checkpoint(tmp_path / "v1.safetensors", net, meta)
    document = json.loads(sidecar_path(path).read_text())
    edit(document)
    sidecar_path(path).write_text(json.dumps(document))
    return path


@pytest.mark.parametrize("blocks", [[999], ["4"], [True], list(range(70))])
def test_a_sidecar_naming_impossible_blocks_is_refused_before_anything_is_built(
    tmp_path: Path, pooled: StagePooledNet, blocks: list[object]
) -> None:
    path = _saved_with_sidecar_edit(tmp_path, pooled, lambda document: document.update(feature_blocks=blocks))
    with pytest.raises(CheckpointInvalid, match="feature_blocks"):
        read_meta(path)


def test_a_sidecar_from_before_pooling_could_be_chosen_loads_as_block_means(tmp_path: Path) -> None:
    torch.manual_seed(0)
    old = StagePooledNet(timm.create_model("efficientnet_lite0"), StageLayout((4, 5, 6, 7)), len(CLASSES)).eval()
    # The first stage-pooled versions wrote no feature_pooling.
    path = _saved_with_sidecar_edit(tmp_path, old, lambda document: document.pop("feature_pooling"))
    loaded, loaded_meta = load_checkpoint(path)
    assert isinstance(loaded, StagePooledNet) and loaded.block_dims == (80, 112, 192, 320, 1280)
    assert loaded_meta.stage_layout == StageLayout((4, 5, 6, 7), BlockPooling.MEAN)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), old(x), atol=1e-5)


@pytest.mark.parametrize(
    ("pooling", "blocks", "reason"),
    [("max", [4, 5], "feature_pooling 'max' is not one this version knows"), ("mean", [5, 4], "distinct increasing")],
)
def test_a_sidecar_with_a_pooling_or_block_order_this_version_cannot_build_is_refused(
    tmp_path: Path, pooled: StagePooledNet, pooling: str, blocks: list[int], reason: str
) -> None:
    path = _saved_with_sidecar_edit(
        tmp_path, pooled, lambda document: document.update(feature_pooling=pooling, feature_blocks=blocks)
    )
    with pytest.raises(CheckpointInvalid, match=reason):
        load_checkpoint(path)


def test_stage_pooled_weights_under_a_plain_sidecar_are_refused(tmp_path: Path, pooled: StagePooledNet) -> None:
    cfg = preprocessing_config(pooled, 64)
    path = save_checkpoint(
        tmp_path / "v1.safetensors", pooled, CheckpointMeta.from_preprocess("efficientnet_lite0", CLASSES, cfg)
    )
    with pytest.raises(CheckpointInvalid, match="do not fit efficientnet_lite0"):
        load_checkpoint(path)


def test_a_network_without_those_blocks_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="cannot be taken from ResNet"):
        StagePooledNet(timm.create_model("resnet18", num_classes=2), StageLayout((4, 5)), 2)


def test_equal_variance_blocks_keep_a_narrow_informative_block_from_drowning_in_a_wide_one() -> None:
    """Four features carry the class; 2,000 others are noise. Standardised feature by feature, the wide block takes
    the L2 budget and the head overfits its noise; scaled to equal total variance per block, the narrow block speaks."""
    rng = np.random.default_rng(0)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 3, n)
        informative = np.eye(3)[labels][:, [0, 1, 2, 0]] * 1.0 + rng.normal(0, 1.0, (n, 4))
        return np.hstack([informative, rng.normal(0, 1.0, (n, 2000))]).astype(np.float32), labels

    (x, y), (val_x, val_y), (test_x, test_y) = sample(60), sample(30), sample(600)
    config = TrainConfig(head_l2=1.0)

    def accuracy(blocks: tuple[int, ...] | None) -> float:
        fit = fit_linear_head(x, y, val_x, val_y, num_classes=3, config=config, blocks=blocks)
        logits = test_x @ fit.weight.numpy().T + fit.bias.numpy()
        return float((logits.argmax(1) == test_y).mean())

    plain, blocked = accuracy(None), accuracy((4, 2000))
    assert blocked >= plain + 0.1, (plain, blocked)
    assert accuracy((2004,)) == pytest.approx(plain)  # one block: exactly the plain standardisation
    with pytest.raises(ValueError, match="do not add up"):
        fit_linear_head(x, y, None, None, num_classes=3, blocks=(4, 10))


def test_cached_features_are_kept_apart_by_pooling_and_block_means_keep_their_old_cache(
    pooled: StagePooledNet,
) -> None:
    from core.ml.features import backbone_id
    from models.factory import backbone_fingerprint

    means = StagePooledNet(pooled.net, StageLayout((4, 5, 6, 7)), len(CLASSES))  # the same weights, pooled by means
    cfg = preprocessing_config(pooled, 64)
    assert backbone_fingerprint(means) == backbone_fingerprint(pooled)
    # Rows of 4,800 features must never be read as rows of 1,984 (or served as another layout's features).
    assert backbone_id(means, cfg) != backbone_id(pooled, cfg)
    # The id a block-means lineage had before pooling could be chosen: its cached features stay usable.
    pixel = f"{cfg.image_size}|{cfg.crop_pct}|{cfg.interpolation}|{cfg.mean}|{cfg.std}"
    assert backbone_id(means, cfg) == f"{backbone_fingerprint(means)}-{hashlib.sha256(pixel.encode()).hexdigest()[:8]}"
