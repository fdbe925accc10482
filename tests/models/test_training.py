"""Training: full fine-tuning on tiny separable data, cancellation, quick head fitting, head resizing, settings."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from models.errors import NotEnoughData, TrainingStopped
from models.factory import PreprocessConfig, timm_api
from models.training import (
    Progress,
    TrainConfig,
    TrainData,
    TrainMode,
    extract_features,
    fit_head,
    fit_linear_head,
    head_logits,
    refit_head,
    resize_head,
    set_head,
    train_full,
    train_quick,
)
from tests.models.conftest import CLASSES, linear_head, synthetic_pixels


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
    assert [h.epoch for h in result.history] == [1, 2]
    first_loss, last_loss = result.history[0].train_loss, result.history[-1].train_loss
    assert first_loss is not None and last_loss is not None and last_loss < first_loss
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
    assert result.val_logits is not None
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
    assert config.mode is TrainMode.FULL
    assert TrainConfig.from_dict(config.to_dict()) == config
    tuned = TrainConfig.from_dict({"backbone_lr_scale": "0.5", "head_warmup_epochs": 1, "freeze_bn": "true"})
    assert (tuned.backbone_lr_scale, tuned.head_warmup_epochs, tuned.freeze_bn) == (0.5, 1.0, True)
    assert json.loads(json.dumps(tuned.to_dict()))["freeze_bn"] is True  # the sidecar is JSON
    assert TrainConfig.from_dict(json.loads(json.dumps(tuned.to_dict()))) == tuned
    assert TrainConfig.from_dict({"freeze_bn": None}).freeze_bn is None


def test_config_refuses_bad_fine_tuning_settings() -> None:
    with pytest.raises(ValueError, match="backbone_lr_scale must not be negative"):
        TrainConfig(backbone_lr_scale=-0.1)
    with pytest.raises(ValueError, match="head_warmup_epochs must not be negative"):
        TrainConfig.from_dict({"head_warmup_epochs": -1})
    with pytest.raises(ValueError, match="'freeze_bn' must be bool"):
        TrainConfig.from_dict({"freeze_bn": "sometimes"})


def _fine_tune(model: torch.nn.Module, cfg: PreprocessConfig, **overrides: object) -> dict[str, torch.Tensor]:
    """Train a few steps from a snapshot of the model's state; returns that snapshot (parameters and buffers)."""
    before = {name: value.detach().clone() for name, value in model.state_dict().items()}
    train_full(_config(epochs=1, max_steps=3, patience=0, **overrides), _data(), model=model, cfg=cfg)
    return before


def _head_names(model: torch.nn.Module) -> set[str]:
    head = {id(p) for p in timm_api(model).get_classifier().parameters()}
    return {name for name, p in model.named_parameters() if id(p) in head}


def _mean_move(model: torch.nn.Module, before: dict[str, torch.Tensor], names: set[str]) -> float:
    moved = [(p.detach() - before[n]).abs().mean().item() for n, p in model.named_parameters() if n in names]
    return float(np.mean(moved))


def test_the_backbone_learns_at_a_fraction_of_the_heads_rate(tiny_cfg: PreprocessConfig) -> None:
    from models.factory import create_network

    moves = {}
    for scale in (0.1, 1.0):
        torch.manual_seed(0)
        model, _ = create_network("resnet18", len(CLASSES), pretrained="none")
        before = _fine_tune(model, tiny_cfg, backbone_lr_scale=scale)
        head = _head_names(model)
        backbone = {name for name, _ in model.named_parameters()} - head
        moves[scale] = (_mean_move(model, before, head), _mean_move(model, before, backbone))
    (head_slow, backbone_slow), (head_full, backbone_full) = moves[0.1], moves[1.0]
    assert backbone_slow > 0 and backbone_slow < 0.2 * head_slow  # Adam steps about lr per weight: 0.1 lr, 0.1 move
    assert backbone_slow < 0.3 * backbone_full and head_slow > 0.5 * head_full


def test_head_warmup_over_the_whole_run_leaves_the_backbone_bit_identical(
    tiny_net: torch.nn.Module, tiny_cfg: PreprocessConfig
) -> None:
    before = _fine_tune(tiny_net, tiny_cfg, head_warmup_epochs=1, freeze_bn=False, backbone_lr_scale=1.0)
    head = _head_names(tiny_net)
    after = tiny_net.state_dict()
    changed = {name for name, value in after.items() if not torch.equal(value, before[name])}
    assert changed == head  # BatchNorm statistics included: a backbone that is not learning is not re-estimated


@pytest.mark.parametrize(("freeze_bn", "batch_size", "kept"), [(True, 12, True), (False, 12, False), (None, 12, True),
                                                                (None, 18, False)])  # fmt: skip
def test_frozen_batch_norm_keeps_its_running_statistics(
    tiny_net: torch.nn.Module, tiny_cfg: PreprocessConfig, freeze_bn: bool | None, batch_size: int, kept: bool
) -> None:
    before = _fine_tune(tiny_net, tiny_cfg, freeze_bn=freeze_bn, batch_size=batch_size)
    stats = [name for name in before if name.endswith("running_mean")]
    assert stats
    unchanged = [torch.equal(tiny_net.state_dict()[name], before[name]) for name in stats]
    assert all(unchanged) if kept else not any(unchanged)
    backbone = {name for name, _ in tiny_net.named_parameters()} - _head_names(tiny_net)
    assert _mean_move(tiny_net, before, backbone) > 0  # frozen statistics, learning weights


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

        logits = tiny_net(pixels_to_tensor(np.asarray(data.train_pixels), tiny_cfg, "cpu"))
    torch.testing.assert_close(logits, torch.from_numpy(feats) @ weight.T + bias, rtol=1e-3, atol=1e-3)


def test_train_quick_extracts_features_and_refits_the_head(
    tiny_net: torch.nn.Module, tiny_cfg: PreprocessConfig
) -> None:
    data = _data(per_class=8)
    reports: list[Progress] = []
    result = train_quick(_config(mode="quick"), data, model=tiny_net, cfg=tiny_cfg, on_progress=reports.append)
    assert result.best_val_acc is not None and result.best_val_acc > 0.6
    train_acc = result.history[0].train_acc
    assert train_acc is not None and train_acc >= 0.9
    assert 0.05 <= result.temperature <= 20
    assert [r.phase for r in reports if r.phase != "features"] == ["head", "val", "done"]
    assert reports[-2].epoch == 1 and reports[-2].val_acc == result.best_val_acc
    # The Train page shows where the fit runs: every report of it names the same device (the val report said "cpu").
    assert len({r.device for r in reports if r.phase != "features"}) == 1


def test_train_quick_reuses_given_features(
    tiny_net: torch.nn.Module, tiny_cfg: PreprocessConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.training

    data = _data(per_class=8)
    train = extract_features(tiny_net, data.train_pixels, tiny_cfg, device="cpu")
    val = extract_features(tiny_net, data.val_pixels, tiny_cfg, device="cpu")
    monkeypatch.setattr(models.training, "extract_features", None)  # given features: no backbone pass at all
    result = train_quick(_config(mode="quick", head_refit=False), data, model=tiny_net, cfg=tiny_cfg,
                         train_features=train, val_features=val)  # fmt: skip
    assert result.best_val_acc is not None and result.best_val_acc > 0.6
    assert result.val_logits is not None
    np.testing.assert_allclose(result.val_logits, head_logits(tiny_net, val))
    with torch.inference_mode():
        from models.preprocess import pixels_to_tensor

        logits = tiny_net(pixels_to_tensor(np.asarray(data.val_pixels), tiny_cfg, "cpu"))
    np.testing.assert_allclose(logits.numpy(), result.val_logits, rtol=1e-3, atol=1e-3)  # the head is in the model


def test_train_quick_refits_on_validation_but_measures_the_head_that_had_not_seen_it(
    tiny_net: torch.nn.Module, tiny_cfg: PreprocessConfig
) -> None:
    data = _data(per_class=8)
    train = extract_features(tiny_net, data.train_pixels, tiny_cfg, device="cpu")
    val = extract_features(tiny_net, data.val_pixels, tiny_cfg, device="cpu")
    kept = train_quick(_config(mode="quick", head_refit=False, head_l2=0.1), data, model=copy.deepcopy(tiny_net),
                       cfg=tiny_cfg, train_features=train, val_features=val)  # fmt: skip
    refit = train_quick(_config(mode="quick", head_l2=0.1), data, model=tiny_net, cfg=tiny_cfg,
                        train_features=train, val_features=val)  # fmt: skip
    # Calibration and the validation numbers a person reads come from the head fitted on train alone ...
    assert refit.val_logits is not None and kept.val_logits is not None
    np.testing.assert_allclose(refit.val_logits, kept.val_logits, rtol=1e-5, atol=1e-5)
    assert refit.temperature == pytest.approx(kept.temperature)
    assert refit.best_val_acc == kept.best_val_acc
    # ... while the head that serves has learnt from validation too: the fit on train + validation at the same L2
    # (a fixed, moderate one: a nearly separable problem at a tiny L2 has no sharp optimum to compare against).
    served = linear_head(refit.model)
    assert not torch.allclose(served.weight, linear_head(kept.model).weight, atol=1e-4)
    both, labels = np.concatenate([train, val]), np.concatenate([data.train_labels, data.val_labels])
    fresh = fit_linear_head(both, labels, None, None, num_classes=3,
                            config=TrainConfig(head_l2=0.1, head_max_iter=500))  # fmt: skip
    np.testing.assert_allclose(
        head_logits(refit.model, val), val @ fresh.weight.numpy().T + fresh.bias.numpy(), rtol=0.02, atol=0.02
    )


def test_refit_head_starts_where_the_earlier_fit_ended() -> None:
    x, y = _separable_features(30, seed=0)
    xv, yv = _separable_features(10, seed=1)
    fit = fit_linear_head(x, y, xv, yv, num_classes=4, config=TrainConfig(head_max_iter=500))
    # Refitted on the same rows, one LBFGS iteration from the earlier optimum stays there: the start is carried
    # into the refit's own standardisation exactly (from zero, one iteration lands far from it).
    config = TrainConfig(head_max_iter=1)
    again = refit_head(fit, x, y, num_classes=4, config=config)
    assert again.l2 == fit.l2
    torch.testing.assert_close(again.weight, fit.weight, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(again.bias, fit.bias, rtol=1e-3, atol=1e-3)
    from_zero = fit_linear_head(x, y, None, None, num_classes=4, config=dataclasses.replace(config, head_l2=fit.l2))
    assert not torch.allclose(from_zero.weight, fit.weight, rtol=1e-3, atol=1e-3)


def test_resize_head_keeps_rows_of_persisting_classes(tiny_net: torch.nn.Module) -> None:
    old = linear_head(tiny_net)
    old_weight, old_bias = old.weight.detach().clone(), old.bias.detach().clone()
    resize_head(tiny_net, ["Shoes", "Bags", "Hats"], ["Hats", "Socks", "Shoes"])
    new = linear_head(tiny_net)
    assert new.out_features == 3
    torch.testing.assert_close(new.weight[0], old_weight[2])
    torch.testing.assert_close(new.weight[2], old_weight[0])
    torch.testing.assert_close(new.bias[2], old_bias[0])
    assert new.weight[1].abs().max() < 0.1  # a new class starts small
    with pytest.raises(ValueError, match="not the 2 old classes"):
        resize_head(tiny_net, ["a", "b"], ["a"])
