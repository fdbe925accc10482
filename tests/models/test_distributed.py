"""Full training on 2 CPU processes under DistributedDataParallel (gloo, the elastic launcher): it learns, rank 0
writes the one checkpoint, the result has the shape of a one-process run, a cancel stops both ranks, and a rank
that raises or is killed ends the run with an error naming it instead of a hang. Plus the device setting."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from core.settings import Settings
from models.checkpoint import load_checkpoint
from models.devices import pick_train_devices
from models.distributed import (
    INITIAL_FILE,
    TRAINED_FILE,
    DistributedTrainingFailed,
    SharedRows,
    shareable,
    train_full_distributed,
)
from models.errors import TrainingStopped
from models.factory import PreprocessConfig, create_network, preprocessing_config, timm_api
from models.training import EpochRecord, Progress, TrainConfig, TrainData, train_full
from tests.models.conftest import CLASSES, synthetic_pixels

pytestmark = pytest.mark.usefixtures("plain_main")  # ranks start by forkserver

TWO_CPUS = ["cpu", "cpu"]
# timm's 0.4M-parameter test network: gradients of resnet18's 11M parameters cost each step ~0.5 s over gloo here.
ARCH = "test_resnet"


def _config(**overrides: object) -> TrainConfig:
    values = {"arch": ARCH, "image_size": 32, "epochs": 3, "batch_size": 10, "lr": 1e-2, "freeze_bn": False,
              "device": "cpu", "progress_every_s": 0.0, "warmup_epochs": 0.5, "patience": 0}  # fmt: skip
    values.update(overrides)
    return TrainConfig.from_dict(values)


@pytest.fixture
def net() -> torch.nn.Module:
    model, _ = create_network(ARCH, len(CLASSES), pretrained="none")
    return model


@pytest.fixture
def cfg(net: torch.nn.Module) -> PreprocessConfig:
    return preprocessing_config(net, 32)


def _data(folder: Path) -> TrainData:
    """39 tiny pictures: 30 to train on (a memory-mapped file, as the pixel cache hands them out), 9 to validate."""
    train_x, train_y = synthetic_pixels(10, seed=0)
    mapped = np.memmap(folder / "train.u8", dtype=np.uint8, mode="w+", shape=train_x.shape)
    mapped[:] = train_x
    mapped.flush()
    val_x, val_y = synthetic_pixels(3, seed=1)
    return TrainData(mapped, train_y, val_x, val_y, CLASSES)


def test_two_cpu_processes_learn_write_one_checkpoint_and_match_a_one_process_run(
    tmp_path: Path, net: torch.nn.Module, cfg: PreprocessConfig
) -> None:
    data, folder = _data(tmp_path), tmp_path / "run"
    start = {k: v.clone() for k, v in net.state_dict().items()}
    reports: list[Progress] = []
    result = train_full_distributed(
        _config(), data, model=net, cfg=cfg, devices=TWO_CPUS, folder=folder, on_progress=reports.append
    )
    first_loss, last_loss = result.history[0].train_loss, result.history[-1].train_loss
    assert first_loss is not None and last_loss is not None and last_loss < first_loss
    assert result.best_val_acc is not None and result.best_val_acc > 0.5  # chance is 1/3
    # Exactly one checkpoint, by rank 0: the best epoch's weights, which the result's model holds.
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == [INITIAL_FILE, "trained.json", TRAINED_FILE]
    saved, meta = load_checkpoint(folder / TRAINED_FILE)
    assert meta.class_names == CLASSES and meta.temperature == pytest.approx(result.temperature)
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(tensor, result.model.state_dict()[name])
    # Rank 0's progress reached this process, for the whole group: 3 epochs of 3 steps of 5 + 5 images.
    phases = [r.phase for r in reports]
    assert phases.count("val") == 3 and phases[-1] == "done"
    assert all(r.steps == 9 and r.device == "2 x cpu (DDP)" for r in reports if r.phase == "train")

    net.load_state_dict(start)
    one = train_full(_config(), data, model=net, cfg=cfg)

    def filled(history: list[EpochRecord]) -> list[set[str]]:  # which numbers each epoch reports
        return [{f.name for f in dataclasses.fields(h) if getattr(h, f.name) is not None} for h in history]

    assert filled(result.history) == filled(one.history) and "images_per_s" in filled(one.history)[0]
    assert [h.epoch for h in result.history] == [h.epoch for h in one.history] == [1, 2, 3]
    assert result.val_logits is not None and one.val_logits is not None
    assert result.val_logits.shape == one.val_logits.shape == (9, len(CLASSES))
    result_head, one_head = timm_api(result.model).get_classifier(), timm_api(one.model).get_classifier()
    assert result_head.out_features == one_head.out_features == len(CLASSES)
    assert not result.model.training and result.best_epoch in (1, 2, 3) and 0.05 <= result.temperature <= 20
    assert result.extra == {"devices": TWO_CPUS, "backend": "gloo", "processes": 2}


def test_a_cancel_stops_both_ranks_at_the_same_step_and_writes_nothing(
    tmp_path: Path, net: torch.nn.Module, cfg: PreprocessConfig
) -> None:
    reports: list[Progress] = []
    with pytest.raises(TrainingStopped, match=r"stopped on request \(epoch 1, step \d\)"):
        train_full_distributed(
            _config(epochs=50),
            _data(tmp_path),
            model=net,
            cfg=cfg,
            devices=TWO_CPUS,
            folder=tmp_path / "run",
            on_progress=reports.append,
            should_stop=lambda: bool(reports),  # as soon as the first step was reported
        )
    assert not (tmp_path / "run" / TRAINED_FILE).exists()


class FailingRows:
    """Training pixels whose reads fail on rank 1 from its second batch on: raising, or killing the process."""

    def __init__(self, pixels: np.ndarray, how: str) -> None:
        self.pixels, self.how, self.reads = pixels, how, 0
        self.shape, self.ndim, self.dtype = pixels.shape, pixels.ndim, pixels.dtype

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, key: Any) -> np.ndarray:
        self.reads += 1
        if os.environ.get("RANK") == "1" and self.reads >= 2:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError("pixel file unreadable (test)")
        return self.pixels[key]


@pytest.mark.parametrize(
    ("how", "error"),
    [
        ("raise", r"rank 1 \(cpu\) failed: OSError: pixel file unreadable \(test\); the other ranks were stopped"),
        ("kill", r"rank 1 \(cpu\) was killed by SIGKILL"),
    ],
)
def test_a_failing_or_killed_rank_fails_the_run_with_an_error_naming_it(
    tmp_path: Path, net: torch.nn.Module, cfg: PreprocessConfig, how: str, error: str
) -> None:
    data = _data(tmp_path)
    data = dataclasses.replace(data, train_pixels=FailingRows(np.asarray(data.train_pixels), how))
    started = time.monotonic()
    with pytest.raises(DistributedTrainingFailed, match=error):
        train_full_distributed(
            _config(), data, model=net, cfg=cfg, devices=TWO_CPUS, folder=tmp_path / "run", timeout_s=60
        )
    assert time.monotonic() - started < 60  # ended by the agent, not by the collective timeout
    assert not (tmp_path / "run" / TRAINED_FILE).exists()


def test_memory_mapped_pixels_travel_by_file_name(tmp_path: Path) -> None:
    import pickle

    data = _data(tmp_path)
    assert isinstance(data.train_pixels, np.memmap)
    rows = shareable(data.train_pixels)
    assert isinstance(rows, SharedRows)
    sent = pickle.dumps(rows)
    assert len(sent) < 2_000 < data.train_pixels.nbytes  # the name and positions, not 92 KB of pixels
    np.testing.assert_array_equal(pickle.loads(sent)[[3, 1]], np.asarray(data.train_pixels)[[3, 1]])
    assert shareable(data.val_pixels) is data.val_pixels  # an ordinary array goes as it is


def test_train_devices_setting_and_what_the_machine_has() -> None:
    assert Settings(train_devices=" CPU, cpu ").train_devices == "cpu,cpu"
    assert Settings(train_devices="").train_devices is None
    with pytest.raises(ValueError, match="unknown train devices 'gpu'"):
        Settings(train_devices="gpu")
    assert pick_train_devices("cpu,cpu") == [torch.device("cpu")] * 2
    with pytest.raises(ValueError, match="'mps' cannot train beside others"):
        pick_train_devices("mps,cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"train devices '2': this machine has no CUDA GPU \(cpu,cpu"):
            pick_train_devices("2")
        with pytest.raises(ValueError, match="train devices 'cuda:0,cuda:1': device 'cuda:0' asked for, but CUDA"):
            pick_train_devices("cuda:0,cuda:1")
