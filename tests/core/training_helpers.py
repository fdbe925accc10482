"""Helpers for the training/versions/predict tests: real stored images with chosen splits, jobs, saved versions."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from core.catalog.labels import apply_label, get_or_create_category
from core.db import Database
from core.schema import Image, ModelVersion, TrainingJob, VersionStatus
from models.stages import StageLayout
from tests.imagegen import image_bytes

# (category or None for unlabelled, index, split): which synthetic picture, and where it goes.
Spec = tuple[str | None, int, str]


def store_images(db: Database, specs: Sequence[Spec], *, size: int = 40) -> list[int]:
    """Write real PNG originals into the data dir and insert their rows (split as given) and labels."""
    ids = []
    settings = db.settings
    for category, index, split in specs:
        data = image_bytes(category or "Shoes", index, size=size)
        sha = hashlib.sha256(data + f"{category}-{index}-{split}".encode()).hexdigest()
        rel = Path("images") / sha[:2] / f"{sha}.png"
        (settings.data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings.data_dir / rel).write_bytes(data)
        with db.write() as session:
            image = Image(
                sha256=sha,
                stored_path=rel.as_posix(),
                thumb_path=rel.as_posix(),
                width=size,
                height=size,
                format="PNG",
                file_size=len(data),
                original_name=f"{(category or 'x').lower()}_{index}.png",
                split=split,
                uploaded_by="test",
            )
            session.add(image)
            session.flush()
            if category is not None:
                cat = get_or_create_category(session, category)
                apply_label(session, image.id, cat.id, actor="test", action="set")
            ids.append(image.id)
    return ids


def dataset(
    categories: Sequence[str] = ("Shoes", "Bags", "Hats"),
    *,
    train: int = 4,
    val: int = 2,
    test: int = 2,
    start: int = 0,
) -> list[Spec]:
    """Specs for `train`/`val`/`test` labelled images per category."""
    specs: list[Spec] = []
    for cat in categories:
        k = start
        for split, n in (("train", train), ("val", val), ("test", test)):
            for _ in range(n):
                specs.append((cat, k, split))
                k += 1
    return specs


def add_job(db: Database, mode: str = "quick", params: dict | None = None) -> int:
    """A running training job row, as the worker would have claimed it."""
    with db.write() as session:
        job = TrainingJob(
            mode=mode,
            # A fixed head L2 skips the strength search: one LBFGS fit instead of three keeps tests fast.
            params=params or {"image_size": 32, "arch": "resnet18", "head_l2": 1e-3},
            status="running",
            requested_by="test",
        )
        session.add(job)
        session.flush()
        # Several jobs run one after another in a test; the one-live-job slot is the queue's business, not ours.
        job.active_slot = None
        session.flush()
        return job.id


def save_random_version(
    db: Database,
    class_names: Sequence[str],
    *,
    status: str = VersionStatus.CANDIDATE,
    seed: int = 0,
    test_accuracy: float | None = None,
    arch: str = "resnet18",
    layout: StageLayout | None = None,
) -> int:
    """A registered version with a real (randomly initialised) checkpoint at 32 px: a resnet18, or `arch`, optionally
    as a stage-pooled network of `layout` (models/stages.py, what a quick-mode lineage of the bundled backbone
    starts)."""
    import torch
    from sqlalchemy import select

    from core.schema import Category
    from models.checkpoint import CheckpointMeta, save_checkpoint
    from models.factory import create_network, preprocessing_config
    from models.stages import StagePooledNet, stage_layout

    torch.manual_seed(seed)
    model, _ = create_network(arch, len(class_names), pretrained="none")
    cfg = preprocessing_config(model, 32)
    if layout is not None:
        model = StagePooledNet(model, layout, len(class_names))
    with db.write() as session:
        ids = []
        for name in class_names:
            ids.append(get_or_create_category(session, name).id)
        row = ModelVersion(
            arch=arch,
            image_size=32,
            mode="quick",
            class_names=list(class_names),
            class_category_ids=ids,
            weights_path="",
            pretrained_source="none",
            status=status,
            metrics={},
            test_accuracy=test_accuracy,
        )
        session.add(row)
        session.flush()
        rel = Path("checkpoints") / f"v{row.id}.safetensors"
        save_checkpoint(
            db.settings.data_dir / rel,
            model,
            CheckpointMeta.from_preprocess(
                arch, list(class_names), cfg, **CheckpointMeta.layout_fields(stage_layout(model))
            ),
        )
        row.weights_path = rel.as_posix()
        assert session.scalars(select(Category)).first() is not None
        return row.id


def add_version_row(
    db: Database,
    *,
    status: str = VersionStatus.CANDIDATE,
    accuracy: float | None = None,
    metrics: dict | None = None,
    test_hash: str = "same-images",
    **columns: object,
) -> int:
    """A version row with metrics only (no checkpoint file): for pages, figures and fake training runs that only
    read the table. `columns` override the defaults (a resnet18 at 224 px over Shoes and Bags)."""
    values: dict[str, object] = {
        "arch": "resnet18",
        "image_size": 224,
        "mode": "quick",
        "class_names": ["Shoes", "Bags"],
        "class_category_ids": [1, 2],
        "weights_path": "checkpoints/none.safetensors",
        "pretrained_source": "none",
        "status": status,
        "metrics": metrics or {},
        "test_accuracy": accuracy,
        "test_image_ids_hash": test_hash,
        **columns,
    }
    with db.write() as session:
        row = ModelVersion(**values)
        session.add(row)
        session.flush()
        return row.id
