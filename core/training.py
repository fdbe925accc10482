"""Training orchestration: what a retrain would use (the plan), and one training job from labels to active model.

`run_training` is what the worker calls for a claimed job: it gathers the labelled images of live categories
per fixed split, caches their pixels (and, in quick mode, backbone features), trains, calibrates on the
validation split, measures on the test split, writes the checkpoint (temporary name, then moved), registers
the model version and promotes it according to `settings.promote_policy`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select

from core.corrections import correction_clause
from core.db import Database, in_chunks
from core.errors import CheckpointError, JobCancelled, NotFound, TrainingRefused
from core.pixel_cache import CachedRows, PixelCache, RowStore
from core.schema import Category, Image, Label, LabelEvent, ModelVersion, Split, TrainingJob, VersionStatus
from core.settings import Settings
from core.versions import (
    activate_version,
    active_version,
    checkpoint_path,
    evaluate_version,
    hash_test_set,
    labelled_images,
    merged_targets,
    metrics_for,
    resolve_category,
)

ProgressFn = Callable[[dict[str, Any]], None]
StopFn = Callable[[], bool]

MIN_TRAIN_PER_CATEGORY = 2
MIN_VAL_PER_CATEGORY = 1
MIN_CATEGORIES = 2
# Keys of job params that are not TrainConfig fields.
NETWORK_PARAMS = ("arch", "image_size", "device")
# "phase" is what people read ("training (val)"); "stage" is the models library's own phase ("train", "val",
# "done", "features"; None for core's steps), so the worker can tell the loop's final summary from an epoch.
PROGRESS_KEYS = (
    "phase",
    "stage",
    "epoch",
    "epochs",
    "step",
    "steps",
    "loss",
    "train_acc",
    "val_acc",
    "images_per_s",
    "eta_s",
    "device",
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CategoryPlan:
    """Labelled images of one live category per split."""

    id: int
    name: str
    train: int
    val: int
    test: int

    @property
    def total(self) -> int:
        return self.train + self.val + self.test


@dataclass
class TrainingPlan:
    """What a retrain would use now, and why it would be refused (`problems`, empty when it can run)."""

    categories: list[CategoryPlan]
    corrections_since_active: int  # as defined in core.corrections (bookkeeping and undone changes excluded)
    suggested_mode: str
    mode: str
    active_version_id: int | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def labelled(self) -> int:
        return sum(c.total for c in self.categories)

    @property
    def trainable(self) -> list[CategoryPlan]:
        """Categories that become classes: live ones with at least one labelled image."""
        return [c for c in self.categories if c.total > 0]


def suggested_mode(settings: Settings) -> str:
    """Full fine-tuning where a GPU makes it minutes; head-only ("quick") elsewhere.

    The first call imports torch to look for a GPU (seconds); the answer is kept per device setting.
    """
    return _mode_for_device(str(settings.device))


@functools.cache
def _mode_for_device(device: str) -> str:
    from models.devices import pick_device

    try:
        return "full" if pick_device(device).type == "cuda" else "quick"
    except Exception:
        return "quick"


def training_plan(db: Database, *, mode: str | None = None) -> TrainingPlan:
    """Labelled images per live category and split, corrections since the active version, and any problems."""
    with db.read() as session:
        live = list(session.execute(select(Category.id, Category.name).where(Category.archived_at.is_(None))))
        counts: dict[tuple[int, str], int] = {
            (int(cat), str(split)): int(n)
            for cat, split, n in session.execute(
                select(Label.category_id, Image.split, func.count())
                .join(Image, Image.id == Label.image_id)
                .group_by(Label.category_id, Image.split)
            )
        }
        active = session.scalar(select(ModelVersion).where(ModelVersion.status == VersionStatus.ACTIVE))
        events = select(func.count()).select_from(LabelEvent).where(correction_clause())
        if active is not None:
            events = events.where(LabelEvent.created_at > active.created_at)
        corrections = int(session.scalar(events) or 0)
        active_id = active.id if active is not None else None

    categories = sorted(
        (
            CategoryPlan(
                id=int(cid),
                name=str(name),
                train=counts.get((cid, Split.TRAIN.value), 0),
                val=counts.get((cid, Split.VAL.value), 0),
                test=counts.get((cid, Split.TEST.value), 0),
            )
            for cid, name in live
        ),
        key=lambda c: c.id,
    )
    suggested = suggested_mode(db.settings)
    plan = TrainingPlan(
        categories=categories,
        corrections_since_active=corrections,
        suggested_mode=suggested,
        mode=mode or suggested,
        active_version_id=active_id,
    )
    if plan.mode not in ("quick", "full"):
        plan.problems.append(f"unknown training mode {plan.mode!r}: choose 'quick' or 'full'")
    trainable = plan.trainable
    if len(trainable) < MIN_CATEGORIES:
        if not categories:
            need = f"add at least {MIN_CATEGORIES} categories and label images in each"
        elif not trainable:
            need = f"label images in at least {MIN_CATEGORIES} categories: none has labelled images yet"
        else:
            have = ", ".join(repr(c.name) for c in trainable)
            need = f"label images in at least {MIN_CATEGORIES} categories: only {have} has labelled images so far"
        plan.problems.append(need)
    for cat in trainable:
        if cat.train < MIN_TRAIN_PER_CATEGORY:
            plan.problems.append(
                f"label at least {MIN_TRAIN_PER_CATEGORY} images of {cat.name!r} in the train split ({cat.train} now)"
            )
        if cat.val < MIN_VAL_PER_CATEGORY:
            plan.problems.append(
                f"the validation split has no labelled image of {cat.name!r}: label at least "
                f"{MIN_VAL_PER_CATEGORY - cat.val} more image (splits are fixed per image; about 1 in 10 lands "
                "in validation)"
            )
        if cat.test == 0:
            plan.notes.append(f"the test split has no labelled image of {cat.name!r}: its accuracy cannot be measured")
    for cat in categories:
        if cat.total == 0:
            plan.notes.append(f"{cat.name!r} has no labelled images and will not be a class of the new model")
    return plan


# --- helpers ------------------------------------------------------------------------------------------------


def _emit(on_progress: ProgressFn, **values: Any) -> None:
    """Progress in the shape the worker records: every key present, None where unknown."""
    payload = dict.fromkeys(PROGRESS_KEYS)
    payload.update(values)
    on_progress(payload)


def _check_stop(should_stop: StopFn) -> None:
    if should_stop():
        raise JobCancelled("training cancelled by request")


def data_snapshot(pairs: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """Identity of the labels a model was trained on: count and hash of (image_id, category_id) pairs."""
    digest = hashlib.sha256(json.dumps(sorted(pairs)).encode()).hexdigest()
    return {"labels": len(pairs), "labels_hash": digest}


def build_train_config(settings: Settings, mode: str, params: dict[str, Any]) -> Any:
    """models.training.TrainConfig from settings defaults (arch, image size, device) overridden by job params.

    Raises TrainingRefused naming any unknown or invalid parameter.
    """
    from models.training import TrainConfig

    values: dict[str, Any] = {
        "arch": settings.default_arch,
        "image_size": settings.image_size,
        "device": settings.device,
    }
    values.update({k: v for k, v in dict(params or {}).items() if v is not None})
    values["mode"] = mode
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise TrainingRefused(f"bad training parameters: {exc}") from exc


def backbone_id(model: Any, cfg: Any) -> str:
    """Id of the backbone's exact weights and pixel config: cached features are only reused for identical ones."""
    from models.factory import backbone_fingerprint

    pixel = hashlib.sha256(f"{cfg.image_size}|{cfg.crop_pct}|{cfg.interpolation}|{cfg.mean}|{cfg.std}".encode())
    return f"{backbone_fingerprint(model)}-{pixel.hexdigest()[:8]}"


class FeatureCache:
    """Backbone features (float32 rows) keyed by image sha256 under cache_dir/features/<backbone_id>/."""

    def __init__(self, settings: Settings, backbone_id: str, dim: int) -> None:
        self.store = RowStore(
            settings.cache_dir / "features" / backbone_id,
            dtype="float32",
            row_shape=(int(dim),),
            meta={"backbone_id": backbone_id},
        )
        self.computed = 0

    def ensure(self, shas: Sequence[str], compute: Callable[[Sequence[str]], np.ndarray]) -> np.ndarray:
        def counted(keys: Sequence[str]) -> np.ndarray:
            self.computed += len(keys)
            return compute(keys)

        return np.asarray(self.store.get_or_compute(shas, counted, chunk=4096), dtype=np.float32)


def _shas(db: Database, image_ids: Sequence[int]) -> list[str]:
    ids = list(image_ids)
    found: dict[int, str] = {}
    with db.read() as session:
        for part in in_chunks(ids):
            for image_id, sha in session.execute(select(Image.id, Image.sha256).where(Image.id.in_(part))):
                found[image_id] = sha
    return [found[i] for i in ids]


def _softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / max(float(temperature), 1e-6)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _progress_dict(progress: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(progress) and not isinstance(progress, type):
        return dataclasses.asdict(progress)
    return dict(progress or {})


# --- the training job ---------------------------------------------------------------------------------------


@dataclass
class _Split:
    ids: list[int]
    labels: np.ndarray  # class indices
    category_ids: list[int]


def run_training(db: Database, job_id: int, *, on_progress: ProgressFn, should_stop: StopFn) -> int:
    """Train, calibrate, evaluate, register and (per policy) activate a model version for a claimed job.

    Returns the new model version id. Raises TrainingRefused when the data cannot make a model (the messages say
    what to label), JobCancelled when should_stop() turns true. Nothing is registered unless everything succeeded.
    """
    from models.checkpoint import CheckpointMeta, save_checkpoint
    from models.devices import describe_device, pick_device
    from models.errors import TrainingStopped

    settings = db.settings
    with db.read() as session:
        job = session.get(TrainingJob, int(job_id))
        if job is None:
            raise NotFound(f"no training job {job_id}")
        mode, params = str(job.mode), dict(job.params or {})
    config = build_train_config(settings, mode, params)
    device = pick_device(config.device)
    device_text = describe_device(device)
    started = time.monotonic()
    _emit(on_progress, phase="preparing", device=device_text)

    plan = training_plan(db, mode=mode)
    if plan.problems:
        error = TrainingRefused("training refused: " + "; ".join(plan.problems))
        error.problems = plan.problems  # type: ignore[attr-defined]
        raise error
    class_ids = [c.id for c in plan.trainable]
    class_names = [c.name for c in plan.trainable]
    index_of = {cid: i for i, cid in enumerate(class_ids)}
    splits: dict[str, _Split] = {}
    all_pairs: list[tuple[int, int]] = []
    for split in Split:
        pairs = [(i, c) for i, c in labelled_images(db, split) if c in index_of]
        all_pairs.extend(pairs)
        splits[split.value] = _Split(
            ids=[i for i, _ in pairs],
            labels=np.array([index_of[c] for _, c in pairs], dtype=np.int64),
            category_ids=[c for _, c in pairs],
        )
    snapshot = {
        **data_snapshot(all_pairs),
        **{f"{s}_images": len(d.ids) for s, d in splits.items()},
        "class_category_ids": class_ids,
    }
    _check_stop(should_stop)

    parent = active_version(db)
    model, pretrained_source, notes, parent_used = _starting_network(db, config, parent, class_ids)
    from models.factory import preprocessing_config

    cfg = preprocessing_config(model, config.image_size)

    # Pixels: decoded once per image and preprocessing config, shared with prediction and evaluation.
    cache = PixelCache.for_config(settings, cfg)
    every_id = splits["train"].ids + splits["val"].ids + splits["test"].ids
    cache.fill(
        db,
        every_id,
        progress=lambda done, total: _emit(on_progress, phase="caching", step=done, steps=total, device=device_text),
    )
    _check_stop(should_stop)
    # Lazy views: training reads one batch of rows at a time, never a whole split into memory.
    pixels = {s: cache.rows(db, d.ids) for s, d in splits.items()}

    try:
        if mode == "quick":
            logits, train_metrics = _train_quick(
                db,
                model,
                cfg,
                pixels,
                splits,
                config,
                device,
                len(class_ids),
                on_progress=on_progress,
                should_stop=should_stop,
            )
        else:
            logits, train_metrics = _train_full(
                model,
                cfg,
                pixels,
                splits,
                config,
                device,
                class_names,
                on_progress=on_progress,
                should_stop=should_stop,
            )
    except TrainingStopped as exc:
        raise JobCancelled("training cancelled by request") from exc
    _check_stop(should_stop)

    # Calibrate on validation, then measure calibrated probabilities on validation and test.
    from models.calibration import fit_temperature

    _emit(on_progress, phase="evaluating", device=device_text)
    val, test = splits["val"], splits["test"]
    temperature = float(fit_temperature(logits["val"], val.labels))
    metrics: dict[str, Any] = {"train": train_metrics}
    metrics["val"] = metrics_for(db, _softmax(logits["val"], temperature), class_ids, val.category_ids)
    test_hash = hash_test_set(list(zip(test.ids, test.category_ids, strict=True)))
    test_accuracy: float | None = None
    if test.ids:
        metrics["test"] = metrics_for(db, _softmax(logits["test"], temperature), class_ids, test.category_ids)
        test_accuracy = float(metrics["test"]["accuracy"])
    else:
        metrics["test"] = {"n_images": 0, "note": "the test split has no labelled images: accuracy not measured"}
    metrics["temperature"] = temperature
    metrics["notes"] = notes + plan.notes
    metrics["seconds"] = round(time.monotonic() - started, 2)
    metrics["device"] = device_text
    _check_stop(should_stop)

    # The checkpoint goes to a job-specific staging folder and gets its final name in the registering transaction,
    # so a job killed at any point leaves either nothing registered or a complete version.
    _emit(on_progress, phase="saving", device=device_text)
    model = model.to("cpu").eval()
    meta = CheckpointMeta.from_preprocess(
        config.arch,
        class_names,
        cfg,
        temperature=temperature,
        train_config=config.to_dict(),
        seed=config.seed,
        data_snapshot=snapshot,
        pretrained_source=pretrained_source,
        backbone_id=backbone_id(model, cfg),
    )
    settings.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    staging = settings.checkpoints_dir / f".job{job_id}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_checkpoint(staging / "model.safetensors", model, meta)
        version_id = _register(
            db,
            staging,
            job_id=int(job_id),
            config=config,
            class_names=class_names,
            class_ids=class_ids,
            pretrained_source=pretrained_source,
            temperature=temperature,
            metrics=metrics,
            test_accuracy=test_accuracy,
            test_hash=test_hash,
            parent_id=parent_used,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    test_pairs = list(zip(test.ids, test.category_ids, strict=True))
    if _promote(db, version_id, test_accuracy=test_accuracy, test_hash=test_hash, test_pairs=test_pairs):
        from core.predict import refresh_predictions

        unreadable: list[Any] = []  # one bad stored original must not fail a run whose model is already promoted
        refresh_predictions(
            db,
            version_id,
            progress=lambda done, total: _emit(
                on_progress, phase="predicting", step=done, steps=total, device=device_text
            ),
            unreadable=unreadable,
        )
        for refusal in unreadable[:20]:
            log.warning("no prediction of v%s for %s", version_id, refusal)
    return version_id


def _head_row_names(class_category_ids: Sequence[int], merged: dict[int, int]) -> list[str]:
    """Names matching the parent's head rows to today's categories (by id): a class merged since then answers to
    the category it went into, unless that category has its own row already (which keeps it)."""
    own = {int(c) for c in class_category_ids}
    names: list[str] = []
    for c in class_category_ids:
        target = resolve_category(int(c), merged)
        taken = target != int(c) and (target in own or str(target) in names)
        names.append(f"merged:{c}" if taken else str(target))
    return names


def _starting_network(
    db: Database, config: Any, parent: Any, class_ids: list[int]
) -> tuple[Any, str, list[str], int | None]:
    """(model, pretrained source, notes, parent id): the active version's weights when compatible, else fresh."""
    import torch

    from models.checkpoint import load_checkpoint
    from models.errors import CheckpointInvalid
    from models.factory import create_network
    from models.training import resize_head

    torch.manual_seed(config.seed)  # a fresh network's (or new head rows') initial weights follow the job's seed
    settings = db.settings
    notes: list[str] = []
    if parent is not None and parent.arch == config.arch and parent.image_size == config.image_size:
        try:
            model, _ = load_checkpoint(checkpoint_path(db, parent), device="cpu")
            if list(parent.class_category_ids) != class_ids:
                # Rows follow categories by id, so a renamed category keeps its learned row; new ones start fresh.
                old_rows = _head_row_names(parent.class_category_ids, merged_targets(db))
                resize_head(model, old_rows, [str(c) for c in class_ids], seed=config.seed)
                notes.append(f"head resized from {len(parent.class_category_ids)} to {len(class_ids)} classes")
            notes.append(f"started from v{parent.id}")
            return model, parent.pretrained_source, notes, parent.id
        except (CheckpointInvalid, OSError, ValueError) as exc:
            notes.append(f"could not start from v{parent.id} ({exc}); started from a fresh network")
    model, info = create_network(
        config.arch, len(class_ids), pretrained=settings.pretrained, pretrained_file=settings.pretrained_file
    )
    if info.message:
        notes.append(str(info.message))
    return model, str(info.source), notes, parent.id if parent is not None else None


def _train_quick(
    db: Database,
    model: Any,
    cfg: Any,
    pixels: dict[str, CachedRows],
    splits: dict[str, _Split],
    config: Any,
    device: Any,
    num_classes: int,
    *,
    on_progress: ProgressFn,
    should_stop: StopFn,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Head-only training on cached backbone features; returns logits per split and train metrics."""
    from models.training import extract_features, fit_head, set_head

    bid = backbone_id(model, cfg)
    dim = int(model.num_features)
    features_cache = FeatureCache(db.settings, bid, dim)
    features: dict[str, np.ndarray] = {}
    for split, data in splits.items():
        shas = _shas(db, data.ids)
        position = {sha: pos for pos, sha in enumerate(shas)}

        def compute(
            keys: Sequence[str],
            split_pixels: CachedRows = pixels[split],
            position: dict[str, int] = position,
            phase: str = f"features ({split})",
        ) -> np.ndarray:
            rows = split_pixels.subset([position[k] for k in keys])
            return extract_features(
                model,
                rows,
                cfg,
                device=device,
                batch_size=config.eval_batch_size,
                on_progress=lambda p: _emit(on_progress, **{**_progress_dict(p), "phase": phase, "stage": p.phase}),
                should_stop=should_stop,
                amp=config.amp,
            )

        features[split] = features_cache.ensure(shas, compute) if shas else np.zeros((0, dim), dtype=np.float32)
    _check_stop(should_stop)
    _emit(on_progress, phase="fitting head")
    weight, bias = fit_head(
        features["train"],
        splits["train"].labels,
        features["val"],
        splits["val"].labels,
        num_classes=num_classes,
        config=config,
    )
    set_head(model, weight, bias)
    w = weight.detach().double().numpy()
    b = bias.detach().double().numpy()
    logits = {split: f.astype(np.float64) @ w.T + b for split, f in features.items()}
    train_acc = _accuracy(logits["train"], splits["train"].labels)
    val_acc = _accuracy(logits["val"], splits["val"].labels)
    _emit(on_progress, phase="fitting head", epoch=1, epochs=1, step=1, steps=1, train_acc=train_acc, val_acc=val_acc)
    return logits, {
        "accuracy": train_acc,
        "n_images": len(splits["train"].ids),
        "features_computed": features_cache.computed,
        "backbone_id": bid,
    }


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float | None:
    return float((logits.argmax(axis=1) == labels).mean()) if len(labels) else None


def _train_full(
    model: Any,
    cfg: Any,
    pixels: dict[str, CachedRows],
    splits: dict[str, _Split],
    config: Any,
    device: Any,
    class_names: list[str],
    *,
    on_progress: ProgressFn,
    should_stop: StopFn,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fine-tune every layer; returns logits per split (val, test) and train metrics."""
    from models.training import TrainData, predict_logits, train_full

    data = TrainData(
        train_pixels=pixels["train"],
        train_labels=splits["train"].labels,
        val_pixels=pixels["val"],
        val_labels=splits["val"].labels,
        class_names=class_names,
    )
    result = train_full(
        config,
        data,
        model=model,
        cfg=cfg,
        on_progress=lambda p: _emit(
            on_progress, **{**_progress_dict(p), "phase": f"training ({p.phase})", "stage": p.phase}
        ),
        should_stop=should_stop,
    )
    trained = result.model
    logits = {
        split: np.asarray(
            predict_logits(trained, pixels[split], cfg, device=device, batch_size=config.eval_batch_size),
            dtype=np.float64,
        )
        for split in ("val", "test")
    }
    last = result.history[-1] if result.history else {}
    return logits, {
        "accuracy": last.get("train_acc"),
        "loss": last.get("train_loss"),
        "n_images": len(splits["train"].ids),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
    }


def _register(
    db: Database,
    staging: Path,
    *,
    job_id: int,
    config: Any,
    class_names: list[str],
    class_ids: list[int],
    pretrained_source: str,
    temperature: float,
    metrics: dict[str, Any],
    test_accuracy: float | None,
    test_hash: str,
    parent_id: int | None,
) -> int:
    """Insert the candidate row and move its checkpoint files into place in one transaction."""
    settings = db.settings
    with db.write() as session:
        row = ModelVersion(
            arch=config.arch,
            image_size=config.image_size,
            mode=config.mode,
            class_names=class_names,
            class_category_ids=class_ids,
            weights_path="",
            pretrained_source=pretrained_source,
            temperature=temperature,
            status=VersionStatus.CANDIDATE,
            metrics=_json_safe(metrics),
            test_accuracy=test_accuracy,
            test_image_ids_hash=test_hash,
            parent_id=parent_id,
            job_id=job_id,
        )
        session.add(row)
        session.flush()
        stem = f"v{row.id}"
        for path in sorted(staging.iterdir()):
            if path.name.startswith("model"):
                path.replace(settings.checkpoints_dir / (stem + path.name[len("model") :]))
        row.weights_path = str((settings.checkpoints_dir / f"{stem}.safetensors").relative_to(settings.data_dir))
        return int(row.id)


def _json_safe(value: Any) -> Any:
    """Metrics as plain JSON (numpy scalars and arrays become Python numbers and lists)."""
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _promote(
    db: Database,
    version_id: int,
    *,
    test_accuracy: float | None,
    test_hash: str,
    test_pairs: Sequence[tuple[int, int]],
) -> bool:
    """Apply settings.promote_policy to a new candidate; returns True when it became active.

    The active version is compared on the candidate's own test images and labels (`test_pairs`, as they were when
    the candidate was measured): labels corrected while the job ran do not tilt the comparison either way.
    """
    policy = db.settings.promote_policy
    current = active_version(db)
    decision: dict[str, Any] = {"policy": policy}
    promote = False
    if policy == "always" or (policy == "if_not_worse" and current is None):
        promote = True
        decision["reason"] = "no active version" if current is None else "policy: always"
    elif policy == "if_not_worse":
        assert current is not None
        if test_accuracy is None:
            promote = True
            decision["reason"] = "no labelled test images to compare on"
        else:
            try:
                if current.test_image_ids_hash == test_hash and current.test_accuracy is not None:
                    baseline = float(current.test_accuracy)
                else:
                    # The test set changed since the active version was measured: measure it again on the
                    # candidate's images and labels.
                    again = evaluate_version(db, current.id, pairs=test_pairs)
                    assert again["test_set_hash"] == test_hash
                    baseline = float(again["accuracy"])
            except CheckpointError as exc:
                baseline = None
                decision["active_error"] = str(exc)
            decision["active_version"] = current.id
            decision["active_accuracy_same_images"] = baseline
            promote = baseline is None or test_accuracy >= baseline
            decision["reason"] = "not worse than the active version" if promote else "worse than the active version"
    else:
        decision["reason"] = "policy: manual (activate it from the Models page or `models activate`)"
    if promote:
        try:
            activate_version(db, version_id, actor="training")
        except CheckpointError as exc:
            promote = False
            decision["reason"] = f"could not activate: {exc}"
    decision["promoted"] = promote
    with db.write() as session:
        row = session.get(ModelVersion, version_id)
        assert row is not None
        row.metrics = {**(row.metrics or {}), "promotion": _json_safe(decision)}
    return promote
