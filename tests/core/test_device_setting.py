"""PRODCAT_DEVICE: a GPU by index (cuda:1) is a valid setting; a GPU this machine lacks fails the job with a clear
message (no traceback) instead of training elsewhere."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from core.db import Database
from core.errors import DeviceUnavailable
from core.jobs import queue as jobs
from core.jobs.worker import run_job_in_foreground
from core.ml.versions import _inference_device
from core.settings import Settings, get_settings


@pytest.mark.parametrize(
    ("given", "kept"),
    [("cuda:1", "cuda:1"), (" CUDA:0 ", "cuda:0"), ("cuda", "cuda"), ("auto", "auto"), ("cpu", "cpu"), ("mps", "mps")],
)
def test_device_setting_accepts_a_gpu_index(monkeypatch: pytest.MonkeyPatch, given: str, kept: str) -> None:
    monkeypatch.setenv("PRODCAT_DEVICE", given)
    assert Settings().device == kept


@pytest.mark.parametrize("given", ["gpu", "cuda:one", "cuda:-1", "cuda1", ""])
def test_device_setting_refuses_what_is_no_device(monkeypatch: pytest.MonkeyPatch, given: str) -> None:
    monkeypatch.setenv("PRODCAT_DEVICE", given)
    with pytest.raises(ValidationError, match=r"unknown device .*cuda:N"):
        Settings()


def test_a_job_for_a_gpu_this_machine_lacks_fails_saying_so(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU, asked for the second
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("PRODCAT_DEVICE", "cuda:1")
    get_settings.cache_clear()
    db.settings = get_settings()
    job_id = jobs.enqueue_training(db, "quick", {}, "ana")
    assert run_job_in_foreground(db, job_id) is None
    job = jobs.get_job(db, job_id)
    assert job.status == "failed"
    assert job.error == (
        "device 'cuda:1' asked for, but this machine has 1 CUDA GPU (cuda:0): set PRODCAT_DEVICE for this worker to "
        "a device it has"
    )
    with pytest.raises(DeviceUnavailable, match="this machine has 1 CUDA GPU"):
        _inference_device(db)
