"""Classifier: calibrated probabilities, identical results to the plain model, top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.checkpoint import CheckpointMeta
from models.factory import PreprocessConfig
from models.inference import Classifier, top_k
from models.preprocess import pixels_to_tensor
from tests.models.conftest import CLASSES, synthetic_pixels


def _meta(cfg: PreprocessConfig, temperature: float = 2.0) -> CheckpointMeta:
    return CheckpointMeta.from_preprocess("resnet18", CLASSES, cfg, temperature=temperature)


def test_classifier_matches_the_plain_model_and_leaves_it_untouched(
    tiny_net: torch.nn.Module, tiny_cfg: PreprocessConfig
) -> None:
    pixels, _ = synthetic_pixels(3)
    keys = set(tiny_net.state_dict())
    with torch.no_grad():
        expected = tiny_net.eval()(pixels_to_tensor(pixels, tiny_cfg, "cpu", channels_last=False)).numpy()
    classifier = Classifier(tiny_net, _meta(tiny_cfg), torch.device("cpu"), cpu_bf16=False)
    logits = classifier.logits_pixels(pixels, batch_size=4)
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-3)
    assert set(tiny_net.state_dict()) == keys  # fusing BatchNorm happened on a copy


def test_bf16_path_agrees_with_fp32(tiny_net: torch.nn.Module, tiny_cfg: PreprocessConfig) -> None:
    pixels, _ = synthetic_pixels(3)
    fp32 = Classifier(tiny_net, _meta(tiny_cfg), torch.device("cpu"), cpu_bf16=False).predict_pixels(pixels)
    bf16 = Classifier(tiny_net, _meta(tiny_cfg), torch.device("cpu"), cpu_bf16=True).predict_pixels(pixels)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, fp32, atol=0.03)


def test_predict_pixels_is_calibrated(tiny_net: torch.nn.Module, tiny_cfg: PreprocessConfig) -> None:
    pixels, _ = synthetic_pixels(2)
    classifier = Classifier(tiny_net, _meta(tiny_cfg, temperature=2.0), torch.device("cpu"))
    probs = classifier.predict_pixels(pixels)
    logits = classifier.logits_pixels(pixels)
    assert probs.shape == (6, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits) / 2.0, dim=1).numpy(), rtol=1e-5)
    assert classifier.predict_pixels(pixels[:0]).shape == (0, 3)


def test_features_pixels_have_backbone_width(tiny_net: torch.nn.Module, tiny_cfg: PreprocessConfig) -> None:
    pixels, _ = synthetic_pixels(1)
    feats = Classifier(tiny_net, _meta(tiny_cfg), torch.device("cpu")).features_pixels(pixels)
    assert feats.shape == (3, 512)


def test_top_k_orders_by_probability() -> None:
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    assert top_k(probs, CLASSES, 2) == [[("Bags", pytest.approx(0.7)), ("Hats", pytest.approx(0.2))],
                                        [("Shoes", pytest.approx(0.5)), ("Hats", pytest.approx(0.3))]]  # fmt: skip
    assert len(top_k(probs, CLASSES, 10)[0]) == 3
    with pytest.raises(ValueError, match="3 class names"):
        top_k(np.zeros((1, 2)), CLASSES, 1)
