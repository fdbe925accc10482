"""A full-mode job given two devices (PRODCAT_TRAIN_DEVICES=cpu,cpu) trains under DDP and registers its version like
any other; a worker told to use GPUs it does not have refuses the job naming the setting."""

from __future__ import annotations

import pytest
import torch

from core.db import Database
from core.errors import DeviceUnavailable
from core.jobs.queue import get_job
from core.jobs.worker import JobRun
from core.ml.contract import ProgressReport
from core.ml.training import run_training
from core.ml.versions import checkpoint_path, get_version
from core.schema import VersionStatus
from models.checkpoint import load_checkpoint
from models.stages import STAGE_LAYOUTS, StagePooledNet
from tests.core.training_helpers import add_job, dataset, save_random_version, store_images

pytestmark = pytest.mark.usefixtures("plain_main")  # ranks start by forkserver

CLASSES = ["Shoes", "Bags", "Hats"]
# timm's 0.4M-parameter test network keeps the two processes' gradient exchange cheap on a shared 2-core machine.
PARAMS = {"arch": "test_resnet", "image_size": 32, "epochs": 2, "batch_size": 6, "lr": 1e-2, "freeze_bn": False,
          "patience": 0}  # fmt: skip


def test_a_full_job_on_two_cpu_processes_registers_its_version_with_one_checkpoint(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db.settings, "train_devices", "cpu,cpu")
    store_images(db, dataset(CLASSES, train=4, val=1, test=1))
    seen: list[ProgressReport] = []
    job = add_job(db, "full", PARAMS)
    run = JobRun(db, job, extra_progress=seen.append)  # the worker's own progress path
    version_id = run_training(db, job, on_progress=run.on_progress, should_stop=run.should_stop)
    run.flush()
    version = get_version(db, version_id)
    assert version.mode == "full" and version.status == "active" and version.class_names == CLASSES
    assert version.metrics["device"] == "2 x cpu (DDP)"
    assert version.metrics["train"]["devices"] == ["cpu", "cpu"] and version.metrics["train"]["epochs_run"] == 2
    assert [p["epoch"] for p in get_job(db, job).history] == [1, 2]
    assert any(p.phase == "training (train)" and p.device == "2 x cpu (DDP)" for p in seen)
    # The ranks' folder (starting weights, rank 0's checkpoint, error files) is gone; one checkpoint is registered.
    checkpoints = db.settings.checkpoints_dir
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"v{version_id}.json", f"v{version_id}.safetensors"]


def test_a_full_job_on_two_processes_continues_a_stage_pooled_lineage_and_keeps_its_layout(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A catalogue whose first models were quick heads on the bundled backbone's stage-pooled features, fine-tuned in
    # full on a server with several devices: each rank rebuilds the wrapper, and the new version keeps its layout.
    monkeypatch.setattr(db.settings, "train_devices", "cpu,cpu")
    parent = save_random_version(
        db, CLASSES, arch="efficientnet_lite0", layout=STAGE_LAYOUTS["efficientnet_lite0"], status=VersionStatus.ACTIVE
    )
    store_images(db, dataset(CLASSES, train=4, val=1, test=1))
    job = add_job(db, "full", {**PARAMS, "arch": "efficientnet_lite0", "epochs": 1})
    version_id = run_training(db, job, on_progress=lambda _: None, should_stop=lambda: False)
    version = get_version(db, version_id)
    assert version.parent_id == parent and version.metrics["device"] == "2 x cpu (DDP)"
    model, meta = load_checkpoint(checkpoint_path(db, version), device="cpu")
    assert isinstance(model, StagePooledNet) and meta.stage_layout == STAGE_LAYOUTS["efficientnet_lite0"]
    parent_model, _ = load_checkpoint(checkpoint_path(db, get_version(db, parent)), device="cpu")
    assert isinstance(model.classifier, torch.nn.Linear) and isinstance(parent_model.classifier, torch.nn.Linear)
    assert not torch.equal(model.classifier.weight, parent_model.classifier.weight)  # trained, not copied


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_worker_without_the_gpus_it_is_told_to_train_on_refuses_the_full_job(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db.settings, "train_devices", "2")
    store_images(db, dataset(CLASSES[:2], train=2, val=1, test=0))
    with pytest.raises(
        DeviceUnavailable, match=r"train devices '2': this machine has no CUDA GPU.*PRODCAT_TRAIN_DEVICES"
    ):
        run_training(db, add_job(db, "full", PARAMS), on_progress=lambda _: None, should_stop=lambda: False)
