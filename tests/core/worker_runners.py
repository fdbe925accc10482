"""Small training functions a real worker process runs in tests (PRODCAT_WORKER_RUNNER=tests.core.worker_runners:NAME).

They keep the contract of `core.ml.training.run_training` (db, job_id, *, on_progress, should_stop) -> model version id,
without torch, so worker tests take a second. The real training is tested end to end in the training tests.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from core.db import Database
from core.errors import JobCancelled, TrainingRefused
from core.ml.contract import ProgressReport
from tests.core.training_helpers import add_version_row

ProgressFn = Callable[[ProgressReport], None]
StopFn = Callable[[], bool]


def marks_dir(db: Database) -> Path:
    """Where runners leave one file per run (`<job>-<pid>`), so tests can count who ran what."""
    path = db.settings.data_dir / "runner-marks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _mark(db: Database, job_id: int) -> None:
    (marks_dir(db) / f"{job_id}-{os.getpid()}").write_text(str(time.time()))


def _register_version(db: Database, job_id: int) -> int:
    return add_version_row(db, image_size=32, class_names=["Bags", "Hats"], job_id=job_id, test_hash="")


def succeed(db: Database, job_id: int, *, on_progress: ProgressFn, should_stop: StopFn) -> int:
    """Three quick epochs with falling loss, then a registered model version."""
    _mark(db, job_id)
    time.sleep(0.3)  # long enough for a second racing worker to be looking for the same job
    for epoch in (1, 2, 3):
        on_progress(
            ProgressReport(
                phase="training",
                epoch=epoch,
                epochs=3,
                step=epoch * 10 - 5,
                steps=30,
                loss=2.0 / epoch,
                train_acc=0.2 * epoch,
                val_acc=None,
            )
        )
        on_progress(
            ProgressReport(
                phase="training",
                epoch=epoch,
                epochs=3,
                step=epoch * 10,
                steps=30,
                loss=1.0 / epoch,
                train_acc=0.25 * epoch,
                val_acc=0.3 * epoch,
            )
        )
    on_progress(ProgressReport(phase="saving"))
    return _register_version(db, job_id)


def fail(db: Database, job_id: int, *, on_progress: ProgressFn, should_stop: StopFn) -> int:
    """A bug in the middle of training."""
    on_progress(ProgressReport(phase="training", epoch=1, epochs=2, loss=1.5))
    raise RuntimeError("synthetic failure: the loss became NaN at step 7")


def refuse(db: Database, job_id: int, *, on_progress: ProgressFn, should_stop: StopFn) -> int:
    """A refusal the user can act on."""
    raise TrainingRefused("training refused: 'Hats' has 1 labelled training image: label at least 2")


def oom(db: Database, job_id: int, *, on_progress: ProgressFn, should_stop: StopFn) -> int:
    """What torch raises when the batch does not fit on the GPU."""
    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)")


def slow(db: Database, job_id: int, *, on_progress: ProgressFn, should_stop: StopFn) -> int:
    """Steps with progress until told to stop (then JobCancelled, as run_training does)."""
    _mark(db, job_id)
    deadline = time.monotonic() + 30
    step = 0
    while time.monotonic() < deadline:
        if should_stop():
            raise JobCancelled("training cancelled by request")
        step += 1
        on_progress(ProgressReport(phase="training", epoch=1, epochs=1, step=step, steps=10_000, loss=1.0))
        time.sleep(0.05)
    raise RuntimeError("slow runner was never told to stop")


def hang(db: Database, job_id: int, *, on_progress: ProgressFn, should_stop: StopFn) -> int:
    """One very long step with no progress and no stop checks: only the heartbeat thread shows it is alive."""
    _mark(db, job_id)
    on_progress(ProgressReport(phase="training", epoch=1, epochs=1, step=0, steps=1))
    time.sleep(60)
    raise RuntimeError("hang runner woke up: the test should have stopped this worker")


def cuda_oom(db: Database, job_id: int, *, on_progress: ProgressFn, should_stop: StopFn) -> int:
    """A real CUDA out-of-memory error: asks the GPU for far more than it has."""
    import torch

    torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # a petabyte
    raise RuntimeError("the GPU allocated a petabyte")


SAVING_STALL_BYTES = 4 << 20  # what a stalled checkpoint write has put on disk when the test kills the worker


def die_while_saving(db: Database, job_id: int, *, on_progress: ProgressFn, should_stop: StopFn) -> int:
    """Writes a real checkpoint through core.ml.staging and models.checkpoint, but the weights file stalls half-way
    (SAVING_STALL_BYTES on disk under its temporary name): the test kills the worker then."""
    import torch

    from core.ml.staging import staged_checkpoint
    from models import checkpoint

    def stall_half_way(
        tensors: dict[str, torch.Tensor], filename: str | os.PathLike[str], metadata: dict[str, str] | None = None
    ) -> None:
        with open(filename, "wb") as handle:
            handle.write(b"\0" * SAVING_STALL_BYTES)
            handle.flush()
        _mark(db, job_id)
        time.sleep(60)

    checkpoint.save_file = stall_half_way  # the safetensors writer as imported by models.checkpoint
    on_progress(ProgressReport(phase="saving"))
    meta = checkpoint.CheckpointMeta(
        arch="resnet18",
        class_names=["Bags", "Hats"],
        image_size=32,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        crop_pct=1.0,
        interpolation="bilinear",
    )
    with staged_checkpoint(db.settings, job_id) as staging:
        checkpoint.save_checkpoint(staging / "model.safetensors", torch.nn.Linear(4, 2), meta)
    raise RuntimeError("die_while_saving woke up: the test should have killed this worker")
