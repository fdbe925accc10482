"""Training: full fine-tuning on tiny separable data, cancellation, quick head fitting, head resizing, settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.errors import NotEnoughData, TrainingStopped
from models.factory import PreprocessConfig
from models.training import (
    Progress,
    TrainConfig,
    TrainData,
    extract_features,
    fit_head,
    resize_head,
    set_head,
    train_full,
    train_quick,
)
from tests.models.conftest import CLASSES, synthetic_pixels


def _data(per_class: int = 12) -> TrainData:
    train_x, train_y = synthetic_pixels(per_class, seed=0)
    val_x, val_y = synthetic_pixels(4, seed=1)
    return TrainData(train_x, train_y, val_x, val_y, CLASSES)


def _config(**overrides: object) -> TrainConfig:
    values = {"image_size": 32, "epochs": 2, "batch_size": 12, "lr": 3e-3, "device": "cpu", "progress_every_s": 0.0,
              "warmup_epochs": 0.5}  # fmt: skip
    values.update(overrides)
    return TrainConfig.from_dict(values)


def test_train_full_learns_separable_data_and_reports_progress(
    tiny_net: torch.nn.Module, tiny_cfg: PreprocessConfig
) -> None:
    reports: list[Progress] = []
    result = train_full(_config(), _data(), model=tiny_net, cfg=tiny_cfg, on_progress=reports.append)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_val_acc is not None and result.best_val_acc > 0.6  # chance is 1/3
    assert 0.05 <= result.temperature <= 20
    assert result.val_logits is not None and result.val_logits.shape == (12, 3)
    phases = [r.phase for r in reports]
    assert "train" in phases and phases.count("val") == 2 and phases[-1] == "done"
    train_reports = [r for r in reports if r.phase == "train"]
    assert all(r.steps == 6 and r.epochs == 2 and r.loss is not None and r.device.startswith("cpu")
               for r in train_reports)  # fmt: skip
    assert train_reports[-1].step == 6 and train_reports[-1].eta_s == pytest.approx(0.0, abs=1e-6)
    assert not result.model.training


def test_train_full_returns_the_best_epoch_weights(tiny_net: torch.nn.Module, tiny_cfg: PreprocessConfig) -> None:
    data = _data()
    result = train_full(_config(max_steps=3, balance="loss"), data, model=tiny_net, cfg=tiny_cfg)
    assert result.best_epoch == 1 and len(result.history) == 1
    from models.training import predict_logits

    logits = predict_logits(result.model, data.val_pixels, tiny_cfg, device=torch.device("cpu"))
    np.testing.assert_allclose(logits, result.val_logits, rtol=1e-4, atol=1e-4)


def test_should_stop_cancels_within_a_step(tiny_net: torch.nn.Module, tiny_cfg: PreprocessConfig) -> None:
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(TrainingStopped, match="epoch 1, step 3"):
        train_full(_config(), _data(), model=tiny_net, cfg=tiny_cfg, should_stop=stop)


def test_out_of_memory_becomes_a_clear_error(tiny_cfg: PreprocessConfig) -> None:
    class Exploding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(RuntimeError, match=r"ran out of memory .* batch size 12: lower batch_size"):
        train_full(_config(), _data(), model=Exploding(), cfg=tiny_cfg)


def test_too_little_data_is_refused(tiny_net: torch.nn.Module, tiny_cfg: PreprocessConfig) -> None:
    x, y = synthetic_pixels(1)
    with pytest.raises(NotEnoughData, match="at least 2"):
        train_full(_config(), TrainData(x[:1], y[:1], x[:0], y[:0], CLASSES), model=tiny_net, cfg=tiny_cfg)


def test_config_refuses_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown training settings: colour, speed"):
        TrainConfig.from_dict({"speed": 1, "colour": "red", "epochs": 2})
    with pytest.raises(ValueError, match="'epochs' must be int"):
        TrainConfig.from_dict({"epochs": 2.5})
    with pytest.raises(ValueError, match="mode must be one of quick, full"):
        TrainConfig.from_dict({"mode": "medium"})
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        TrainConfig(batch_size=0)


def test_config_round_trips_through_a_dict() -> None:
    config = TrainConfig.from_dict({"mode": "full", "epochs": "3", "lr": 1, "amp": "false", "max_steps": None})
    assert (config.epochs, config.lr, config.amp) == (3, 1.0, False)
    assert TrainConfig.from_dict(config.to_dict()) == config


def _separable_features(n_per_class: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(42).normal(0, 1, size=(4, 64)).astype(np.float32) * 3
    labels = np.repeat(np.arange(4), n_per_class)
    return np.maximum(centres[labels] + rng.normal(0, 1, size=(len(labels), 64)), 0).astype(np.float32), labels


def test_fit_head_learns_separable_features() -> None:
    x, y = _separable_features(50, seed=0)
    xv, yv = _separable_features(20, seed=1)
    weight, bias = fit_head(x, y, xv, yv, num_classes=5)  # class 4 has no examples yet
    assert weight.shape == (5, 64) and bias.shape == (5,)
    predictions = (torch.from_numpy(xv) @ weight.T + bias).argmax(dim=1).numpy()
    assert (predictions == yv).mean() >= 0.95
    assert not (predictions == 4).any()


def test_fit_head_balancing_recovers_a_rare_class() -> None:
    # Overlapping classes, class 3 rare (10 against 200 each): unbalanced, the rare class is mostly swallowed.
    def overlapping(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        centres = np.random.default_rng(42).normal(0, 0.6, size=(4, 16))
        labels = np.repeat(np.arange(4), n)
        noise = np.random.default_rng(seed).normal(0, 1, size=(len(labels), 16))
        return (centres[labels] + noise).astype(np.float32), labels

    x, y = overlapping(200, seed=0)
    keep = (y != 3) | (np.arange(len(y)) % 20 == 0)
    xv, yv = overlapping(100, seed=1)
    recall = {}
    for balance in ("sampler", "none"):
        config = TrainConfig(head_l2=1e-3, balance=balance)
        weight, bias = fit_head(x[keep], y[keep], xv, yv, num_classes=4, config=config)
        predictions = (torch.from_numpy(xv) @ weight.T + bias).argmax(dim=1).numpy()
        recall[balance] = (predictions[yv == 3] == 3).mean()
    assert recall["sampler"] >= 0.5
    assert recall["sampler"] > recall["none"] + 0.2


def test_fit_head_needs_two_classes() -> None:
    with pytest.raises(NotEnoughData, match="2 categories"):
        fit_head(np.ones((5, 3), np.float32), np.zeros(5, np.int64), None, None, num_classes=2)


def test_quick_pieces_fit_together(tiny_net: torch.nn.Module, tiny_cfg: PreprocessConfig) -> None:
    data = _data(per_class=8)
    reports: list[Progress] = []
    feats = extract_features(tiny_net, data.train_pixels, tiny_cfg, device="cpu", batch_size=10,
                             on_progress=reports.append)  # fmt: skip
    assert feats.shape == (24, 512) and feats.dtype == np.float32
    assert reports[-1].phase == "features" and reports[-1].step == 24
    weight, bias = fit_head(feats, data.train_labels, None, None, num_classes=3)
    set_head(tiny_net, weight, bias)
    with torch.inference_mode():
        from models.preprocess import pixels_to_tensor

        logits = tiny_net(pixels_to_tensor(data.train_pixels, tiny_cfg, "cpu"))
    torch.testing.assert_close(logits, torch.from_numpy(feats) @ weight.T + bias, rtol=1e-3, atol=1e-3)


def test_train_quick_reuses_given_features(tiny_net: torch.nn.Module, tiny_cfg: PreprocessConfig) -> None:
    data = _data(per_class=8)
    result = train_quick(_config(mode="quick"), data, model=tiny_net, cfg=tiny_cfg)
    assert result.best_val_acc is not None and result.best_val_acc > 0.6
    assert result.history[0]["train_acc"] >= 0.9
    assert 0.05 <= result.temperature <= 20


def test_resize_head_keeps_rows_of_persisting_classes(tiny_net: torch.nn.Module) -> None:
    old = tiny_net.get_classifier()
    old_weight, old_bias = old.weight.detach().clone(), old.bias.detach().clone()
    resize_head(tiny_net, ["Shoes", "Bags", "Hats"], ["Hats", "Socks", "Shoes"])
    new = tiny_net.get_classifier()
    assert new.out_features == 3
    torch.testing.assert_close(new.weight[0], old_weight[2])
    torch.testing.assert_close(new.weight[2], old_weight[0])
    torch.testing.assert_close(new.bias[2], old_bias[0])
    assert new.weight[1].abs().max() < 0.1  # a new class starts small
    with pytest.raises(ValueError, match="not the 2 old classes"):
        resize_head(tiny_net, ["a", "b"], ["a"])
