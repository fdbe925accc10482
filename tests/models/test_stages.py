"""Stage-pooled features: a network whose features include its inner blocks, saved and loaded like any other, and a
head that gives each block of features the same weight."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from models.checkpoint import CheckpointMeta, load_checkpoint, read_meta, save_checkpoint, sidecar_path
from models.errors import CheckpointInvalid
from models.factory import preprocessing_config
from models.stages import STAGE_BLOCKS, StagePooledNet, stage_blocks, with_stage_features
from models.training import TrainConfig, extract_features, fit_linear_head, set_head

CLASSES = ["Shoes", "Bags", "Hats"]


@pytest.fixture(scope="module")
def pooled() -> StagePooledNet:
    torch.manual_seed(0)
    net = with_stage_features(timm.create_model("efficientnet_lite0", num_classes=len(CLASSES)), "efficientnet_lite0")
    assert isinstance(net, StagePooledNet)
    return net.eval()


def test_the_lite0_features_are_its_pooled_blocks_3_to_6_and_its_final_features(pooled: StagePooledNet) -> None:
    assert pooled.block_dims == (80, 112, 192, 320, 1280)  # blocks[3..6] and the 1,280 final features
    assert pooled.num_features == 1984 and stage_blocks(pooled) == list(STAGE_BLOCKS["efficientnet_lite0"])
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = pooled.forward_features(x)
        plain = pooled.net.forward_head(pooled.net.forward_features(x), pre_logits=True)
        assert features.shape == (2, 1984)
        assert torch.allclose(features[:, -1280:], plain)  # the final features are the plain network's own
        assert torch.allclose(pooled(x), pooled.classifier(features))
    assert not any(p.abs().sum() for p in pooled.classifier.parameters())  # a new head starts at zero


def test_a_stage_pooled_checkpoint_loads_back_as_one_with_the_same_outputs(
    tmp_path: Path, pooled: StagePooledNet
) -> None:
    cfg = preprocessing_config(pooled, 64)
    pixels = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    features = extract_features(pooled, pixels, cfg)
    labels = np.array([0, 1, 2, 0, 1, 2])
    fit = fit_linear_head(features, labels, None, None, num_classes=3, blocks=pooled.block_dims)
    set_head(pooled, fit.weight, fit.bias)
    meta = CheckpointMeta.from_preprocess("efficientnet_lite0", CLASSES, cfg, feature_blocks=stage_blocks(pooled))
    path = save_checkpoint(tmp_path / "v1.safetensors", pooled, meta)

    loaded, loaded_meta = load_checkpoint(path)
    assert isinstance(loaded, StagePooledNet) and loaded_meta.feature_blocks == [4, 5, 6, 7]
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), pooled(x), atol=1e-5)
    assert np.allclose(extract_features(loaded, pixels, cfg), features, atol=1e-5)


@pytest.mark.parametrize("blocks", [[999], ["4"], [True], list(range(70))])
def test_a_sidecar_naming_impossible_blocks_is_refused_before_anything_is_built(
    tmp_path: Path, pooled: StagePooledNet, blocks: list[object]
) -> None:
    cfg = preprocessing_config(pooled, 64)
    meta = CheckpointMeta.from_preprocess("efficientnet_lite0", CLASSES, cfg, feature_blocks=stage_blocks(pooled))
    path = save_checkpoint(tmp_path / "v1.safetensors", pooled, meta)
    document = json.loads(sidecar_path(path).read_text())
    document["feature_blocks"] = blocks
    sidecar_path(path).write_text(json.dumps(document))
    with pytest.raises(CheckpointInvalid, match="feature_blocks"):
        read_meta(path)


def test_stage_pooled_weights_under_a_plain_sidecar_are_refused(tmp_path: Path, pooled: StagePooledNet) -> None:
    cfg = preprocessing_config(pooled, 64)
    path = save_checkpoint(
        tmp_path / "v1.safetensors", pooled, CheckpointMeta.from_preprocess("efficientnet_lite0", CLASSES, cfg)
    )
    with pytest.raises(CheckpointInvalid, match="do not fit efficientnet_lite0"):
        load_checkpoint(path)


def test_a_network_without_those_blocks_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="cannot be taken from ResNet"):
        StagePooledNet(timm.create_model("resnet18", num_classes=2), [4, 5], 2)


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
