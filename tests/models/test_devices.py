"""Device choice: auto, named devices and one GPU by index (cuda:N), refused clearly when the hardware is missing."""

from __future__ import annotations

import pytest
import torch

from models.devices import pick_device


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """This machine as if it had `count` CUDA GPUs (the tests run on CPU machines too)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_cpu_and_auto_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 0)
    monkeypatch.setattr("models.devices._mps_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device(" CPU ") == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_a_gpu_asked_for_on_a_machine_without_cuda_is_refused(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    fake_gpus(monkeypatch, 0)
    with pytest.raises(ValueError, match=f"device '{name}' asked for, but CUDA is not available on this machine"):
        pick_device(name)


def test_a_gpu_index_picks_that_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device("cuda:0") == torch.device("cuda", 0)
    assert pick_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # a torch.device keeps its index
    assert pick_device("cuda") == torch.device("cuda")


@pytest.mark.parametrize(
    ("count", "have"),
    [(1, "this machine has 1 CUDA GPU (cuda:0)"), (2, "this machine has 2 CUDA GPUs (cuda:0 to cuda:1)")],
)
def test_a_gpu_index_past_the_last_gpu_is_refused_naming_the_gpus_there(
    monkeypatch: pytest.MonkeyPatch, count: int, have: str
) -> None:
    fake_gpus(monkeypatch, count)
    with pytest.raises(ValueError) as refused:
        pick_device(f"cuda:{count}")
    assert str(refused.value) == f"device 'cuda:{count}' asked for, but {have}"


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:-1", "cuda:"])
def test_unknown_device_names_are_refused(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    fake_gpus(monkeypatch, 2)
    with pytest.raises(ValueError, match="unknown device"):
        pick_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpus_by_index() -> None:
    count = torch.cuda.device_count()
    assert pick_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)
    with pytest.raises(ValueError, match=f"this machine has {count} CUDA GPU"):
        pick_device(f"cuda:{count}")
