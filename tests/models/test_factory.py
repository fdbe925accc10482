"""create_network: weights from a local safetensors file (refused clearly when bad), random init, preprocessing."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from models.errors import WeightsInvalid
from models.factory import backbone_fingerprint, create_network, preprocessing_config, timm_api


def _write_backbone_file(path: Path, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    source = timm.create_model("resnet18", pretrained=False, num_classes=num_classes)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path))
    return state


def test_file_weights_load_into_backbone_with_a_fresh_head(tmp_path: Path) -> None:
    weights = tmp_path / "resnet18.safetensors"
    state = _write_backbone_file(weights)
    model, info = create_network("resnet18", 5, pretrained="file", pretrained_file=weights)
    assert info.source == "file"
    assert str(weights) in info.message
    assert timm_api(model).get_classifier().out_features == 5
    # The backbone is the file's, not a random init.
    torch.testing.assert_close(model.state_dict()["conv1.weight"], state["conv1.weight"])
    torch.testing.assert_close(model.state_dict()["layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])


def test_a_file_with_a_matching_head_keeps_it(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    state = _write_backbone_file(weights, num_classes=4)
    model, info = create_network("resnet18", 4, pretrained="file", pretrained_file=weights)
    assert info.source == "file"
    torch.testing.assert_close(model.state_dict()["fc.weight"], state["fc.weight"])


def test_none_gives_random_init_and_says_so() -> None:
    model, info = create_network("resnet18", 3, pretrained="none")
    assert info.source == "none"
    assert "random" in info.message
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_an_unreadable_file_is_refused_never_replaced_by_random_weights(tmp_path: Path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not safetensors at all")
    with pytest.raises(WeightsInvalid, match=r"broken\.safetensors.*not a readable safetensors"):
        create_network("resnet18", 2, pretrained="file", pretrained_file=bad)
    with pytest.raises(WeightsInvalid, match="does not exist"):
        create_network("resnet18", 2, pretrained="file", pretrained_file=tmp_path / "missing.safetensors")


def test_file_for_another_architecture_is_not_silently_accepted(tmp_path: Path) -> None:
    other = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(WeightsInvalid, match=r"other\.safetensors does not match the architecture"):
        create_network("resnet18", 3, pretrained="file", pretrained_file=path)


def test_a_resnet50_file_is_refused_for_a_resnet18_although_the_key_names_match(tmp_path: Path) -> None:
    other = timm.create_model("resnet50", pretrained=False, num_classes=3)
    path = tmp_path / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    # Not "pretrained weights from ..." with a quarter of the backbone random: one clear refusal.
    with pytest.raises(WeightsInvalid, match=r"backbone tensors have other shapes \(e\.g\. layer1\.0\.conv1\.weight"):
        create_network("resnet18", 3, pretrained="file", pretrained_file=path)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'resnet_nope'"):
        create_network("resnet_nope", 3, pretrained="none")
    with pytest.raises(ValueError, match="pretrained source"):
        create_network("resnet18", 3, pretrained="internet")
    with pytest.raises(ValueError, match="num_classes"):
        create_network("resnet18", 0, pretrained="none")


def test_preprocessing_config_comes_from_timm_and_keeps_the_whole_photo(tiny_net: torch.nn.Module) -> None:
    cfg = preprocessing_config(tiny_net, 64)
    assert cfg.image_size == 64
    assert cfg.mean == pytest.approx((0.485, 0.456, 0.406))
    assert cfg.std == pytest.approx((0.229, 0.224, 0.225))
    assert cfg.interpolation == "bicubic"
    assert cfg.crop_pct == 1.0 and cfg.resize_size == 64  # the whole photo, not ImageNet's centre crop (0.875)


def test_backbone_fingerprint_ignores_the_head(tiny_net: torch.nn.Module) -> None:
    before = backbone_fingerprint(tiny_net)
    timm_api(tiny_net).reset_classifier(7)
    assert backbone_fingerprint(tiny_net) == before
    assert isinstance(tiny_net.conv1, torch.nn.Conv2d)
    with torch.no_grad():
        tiny_net.conv1.weight.add_(1.0)
    assert backbone_fingerprint(tiny_net) != before
