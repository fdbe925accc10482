"""Training: full fine-tuning (AdamW, warm-up + cosine, balanced sampling, GPU augmentation) and quick head refits."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import timm.optim
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import WeightedRandomSampler

from models.calibration import fit_temperature
from models.devices import describe_device, pick_device
from models.errors import NotEnoughData, TrainingStopped
from models.factory import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, PreprocessConfig, timm_api
from models.modes import TrainMode
from models.preprocess import PixelRows, augment_batch, normalize_nchw, numpy_to_tensor
from models.stages import block_dims

ProgressCallback = Callable[["Progress"], None]
StopCheck = Callable[[], bool]

_BALANCES = ("sampler", "loss", "none")
# Candidate L2 strengths for the quick head when none is configured: picked by validation log loss, strongest first
# (warm starts). The strong end matters when labels are noisy: on 2,000 Fashion-MNIST images with 10% of labels
# flipped, out-of-sample accuracy rose from 77% (1e-3) to 82% (0.3); with clean labels the choice moved it <1 point.
HEAD_L2_GRID = (1.0, 0.3, 0.1, 1e-2, 1e-3, 1e-4)
# With fewer images per batch, BatchNorm's batch statistics are too noisy to train on (freeze_bn=None decides by it).
_FREEZE_BN_BELOW = 16
_HEAD, _BACKBONE = "head", "backbone"


@dataclass
class TrainConfig:
    """Training settings. Saved beside the checkpoint they produced; `from_dict` refuses unknown keys."""

    arch: str = "resnet18"
    image_size: int = 224
    mode: TrainMode = TrainMode.QUICK
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    backbone_lr_scale: float = 0.1  # full mode: the backbone learns at lr * this, the classifier head at lr
    head_warmup_epochs: float = 0.0  # full mode: only the head trains this long (the backbone's lr is 0)
    freeze_bn: bool | None = None  # full mode: BatchNorm in eval mode, running stats kept; None: when a batch < 16
    label_smoothing: float = 0.1
    seed: int = 0
    device: str = "auto"
    balance: str = "sampler"  # "sampler": class-balanced sampling; "loss": class-weighted loss; "none"
    patience: int = 3  # epochs without a better validation accuracy before stopping early
    max_steps: int | None = None  # cap on optimiser steps in total (tests, smoke runs)
    compile: bool = False  # torch.compile the training model (pays off on long GPU runs)
    # CUDA: let cuDNN time its kernels for each new input shape. Off by default: on an H200 it cost 12 s once per
    # process for 6 % faster steps, which pays back only after ~1.5 million training images (bench_cudnn.py).
    cudnn_benchmark: bool = False
    amp: bool = True  # bf16 autocast on CUDA
    augment: bool = True
    eval_batch_size: int = 128
    progress_every_s: float = 2.0
    head_l2: float | None = None  # quick mode L2 strength; None picks it on the validation split
    head_max_iter: int = 100  # LBFGS iterations per quick head fit
    head_threads: int = 1  # torch CPU threads while fitting the head (small matmuls: more threads only contend)
    head_refit: bool = True  # quick mode: refit the head on train + validation with the L2 validation picked

    def __post_init__(self) -> None:
        problems = []
        try:
            self.mode = TrainMode(self.mode)
        except ValueError:
            problems.append(f"mode must be one of {', '.join(TrainMode)}, got {self.mode!r}")
        if self.balance not in _BALANCES:
            problems.append(f"balance must be one of {', '.join(_BALANCES)}, got {self.balance!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "head_max_iter", "head_threads"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            problems.append(f"image_size must be {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, got {self.image_size}")
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.patience < 0:
            problems.append("weight_decay, warmup_epochs and patience must not be negative")
        for name in ("backbone_lr_scale", "head_warmup_epochs"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if self.freeze_bn not in (None, True, False):
            problems.append(f"freeze_bn must be true, false or empty (automatic), got {self.freeze_bn!r}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be at least 1 when set, got {self.max_steps}")
        if self.head_l2 is not None and self.head_l2 < 0:
            problems.append(f"head_l2 must not be negative, got {self.head_l2}")
        if problems:
            raise ValueError("invalid training settings: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Settings from a plain dict (job parameters, a sidecar); ValueError names unknown keys or bad types."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        defaults = cls()
        return cls(**{key: _coerce(key, value, getattr(defaults, key)) for key, value in values.items()})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that `from_dict` turns back into an equal config."""
        return dataclasses.asdict(self)


# Fields whose default is None, and the type they hold when set.
_OPTIONAL_TYPES: dict[str, type] = {"max_steps": int, "head_l2": float, "freeze_bn": bool}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Accept JSON-ish values for a field (1 for 1.0, "8" for 8, "true") but refuse what does not fit."""
    if value is None:
        if key in _OPTIONAL_TYPES:
            return None
        raise ValueError(f"training setting {key!r} must not be empty")
    kind = _OPTIONAL_TYPES.get(key) or (str if isinstance(default, str) else type(default))  # a StrEnum is text
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool | int) and value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if isinstance(value, bool):  # True is an int in Python, but never a sensible number of epochs
            raise ValueError(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind is float:
            return float(value)
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    except (TypeError, ValueError) as exc:
        raise ValueError(f"training setting {key!r} must be {kind.__name__}, got {value!r}") from exc


@dataclass
class TrainData:
    """Model-sized uint8 NHWC pixels (from `to_model_pixels`) with int64 class indices.

    The pixels may be an ndarray, a memmap or any lazy `PixelRows` view: training only ever indexes a batch at a time.
    """

    train_pixels: PixelRows
    train_labels: np.ndarray
    val_pixels: PixelRows
    val_labels: np.ndarray
    class_names: list[str]

    def __post_init__(self) -> None:
        self.train_labels = np.asarray(self.train_labels, dtype=np.int64).reshape(-1)
        self.val_labels = np.asarray(self.val_labels, dtype=np.int64).reshape(-1)
        for split, pixels, labels in (
            ("train", self.train_pixels, self.train_labels),
            ("val", self.val_pixels, self.val_labels),
        ):
            if len(pixels) != len(labels):
                raise ValueError(f"{split}: {len(pixels)} images but {len(labels)} labels")
            if len(pixels) and (pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8):
                raise ValueError(f"{split} pixels must be uint8 (N, S, S, 3), got {pixels.dtype} {pixels.shape}")
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.class_names)):
                raise ValueError(f"{split} labels must be indices into the {len(self.class_names)} class names")


@dataclass
class Progress:
    """One progress report: phase is "features", "head", "train", "val" or "done"."""

    phase: str
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    loss: float | None = None
    train_acc: float | None = None
    val_acc: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    device: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for the job row)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of a training run. Quick mode's head fit is one epoch without a loss, a learning rate or a rate."""

    epoch: int
    train_acc: float | None
    val_acc: float | None
    seconds: float
    train_loss: float | None = None
    val_loss: float | None = None
    lr: float | None = None  # the head's
    images_per_s: float | None = None


@dataclass
class TrainResult:
    """A trained model (best validation weights), its fitted temperature and per-epoch history."""

    model: nn.Module
    temperature: float
    history: list[EpochRecord]
    best_epoch: int
    best_val_acc: float | None = None
    val_logits: np.ndarray | None = None
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _report(on_progress: ProgressCallback | None, progress: Progress) -> None:
    if on_progress is not None:
        on_progress(progress)


def _check_stop(should_stop: StopCheck | None, where: str) -> None:
    if should_stop is not None and should_stop():
        raise TrainingStopped(f"training stopped on request ({where})")


def _autocast(device: torch.device, enabled: bool) -> Any:
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _to_device_nchw(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC numpy -> uint8 NCHW (channels_last strides) on `device`, via pinned memory on CUDA."""
    tensor = numpy_to_tensor(pixels)
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    return tensor.permute(0, 3, 1, 2)


def predict_logits(
    model: nn.Module,
    pixels: PixelRows,
    cfg: PreprocessConfig,
    *,
    device: torch.device,
    batch_size: int = 128,
    amp: bool = True,
) -> np.ndarray:
    """Float32 logits of `model` (eval mode) over uint8 NHWC pixels."""
    model.eval()
    channels_last = device.type == "cuda"
    chunks = []
    with torch.inference_mode(), _autocast(device, amp):
        for start in range(0, len(pixels), batch_size):
            batch = normalize_nchw(
                _to_device_nchw(pixels[start : start + batch_size], device), cfg, channels_last=channels_last
            )
            chunks.append(model(batch).float().cpu().numpy())
    if not chunks:
        return np.zeros((0, _num_classes(model)), dtype=np.float32)
    return np.concatenate(chunks)


def _num_classes(model: nn.Module) -> int:
    head = timm_api(model).get_classifier() if hasattr(model, "get_classifier") else None
    return int(head.out_features) if isinstance(head, nn.Linear) else int(getattr(model, "num_classes", 0))


def _class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=num_classes).astype(np.int64)


def train_full(
    config: TrainConfig,
    data: TrainData,
    *,
    model: nn.Module,
    cfg: PreprocessConfig,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> TrainResult:
    """Fine-tune every layer of `model` and return it with its best-validation weights and a fitted temperature.

    AdamW (no decay on biases and norms; the backbone at `backbone_lr_scale` times the head's lr, and idle for the
    first `head_warmup_epochs`), linear warm-up then cosine decay per step, class balance by sampling or loss weights,
    BatchNorm statistics frozen for small batches (`freeze_bn`), `augment_batch` on the device, bf16 autocast +
    channels_last on CUDA (cuDNN autotuning only with `cudnn_benchmark`), early stopping on validation accuracy.
    `on_progress` gets a report every `progress_every_s` seconds and at each epoch's end; `should_stop()` is checked
    every step and raises TrainingStopped. A CUDA out-of-memory error frees GPU memory and is re-raised as a
    RuntimeError saying what to lower.
    """
    if len(data.train_labels) < 2:
        raise NotEnoughData(f"full training needs at least 2 training images, got {len(data.train_labels)}")
    device = pick_device(config.device)
    failure: str | None = None
    try:
        return _FullRun(config, data, model, cfg, device, on_progress, should_stop).run()
    except torch.OutOfMemoryError as exc:
        failure = str(exc).splitlines()[0] if str(exc) else "out of memory"
    # Outside the except block the traceback (and the tensors its frames hold) is released before we free memory.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    raise RuntimeError(
        f"the {device.type} device ran out of memory training {config.arch} at {config.image_size} px with batch "
        f"size {config.batch_size}: lower batch_size or image_size and try again ({failure})"
    )


@dataclass(frozen=True)
class _StepPlan:
    """How a full run's optimiser steps are laid out over its epochs."""

    batch_size: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    warmup_steps: int  # the head's linear warm-up
    head_only_steps: int  # steps before the backbone starts learning
    backbone_warmup_steps: int  # the backbone's linear warm-up, from head_only_steps on
    freeze_bn: bool


def _plan_steps(config: TrainConfig, n_train: int) -> _StepPlan:
    batch_size = min(config.batch_size, n_train)
    steps_per_epoch = max(1, n_train // batch_size)  # drop the ragged tail: BatchNorm cannot train on 1 image
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup = round(config.warmup_epochs * steps_per_epoch)
    head_only = min(round(config.head_warmup_epochs * steps_per_epoch), total_steps)
    return _StepPlan(
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        epochs=math.ceil(total_steps / steps_per_epoch),
        warmup_steps=min(warmup, max(total_steps - 1, 0)),
        head_only_steps=head_only,
        backbone_warmup_steps=min(warmup, max(total_steps - head_only - 1, 0)),
        freeze_bn=config.freeze_bn if config.freeze_bn is not None else batch_size < _FREEZE_BN_BELOW,
    )


def _param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: timm's weight-decay split (none on biases and norms) of the classifier head, at lr, and of the
    backbone, at lr * backbone_lr_scale; head groups first, each tagged with its "part" for the schedule.

    A model without a timm classifier (`get_classifier`) trains as one part, the head.
    """
    head = timm_api(model).get_classifier() if hasattr(model, "get_classifier") else model
    head_ids = {id(p) for p in head.parameters()}
    groups = timm.optim.param_groups_weight_decay(
        model, config.weight_decay, no_weight_decay_list=getattr(model, "no_weight_decay", set)()
    )
    parts = []
    for part, lr in ((_HEAD, config.lr), (_BACKBONE, config.lr * config.backbone_lr_scale)):
        for group in groups:
            params = [p for p in group["params"] if (id(p) in head_ids) == (part == _HEAD)]
            if params:
                parts.append({**group, "params": params, "lr": lr, "part": part})
    return parts


def _optimizer_and_schedule(
    model: nn.Module, config: TrainConfig, plan: _StepPlan
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the head and backbone groups, and a per-step warm-up + cosine schedule for each part."""
    optimizer = timm.optim.create_optimizer_v2(
        model,
        "adamw",
        lr=config.lr,
        weight_decay=config.weight_decay,
        param_group_fn=lambda m: _param_groups(m, config),
    )
    schedules = {
        _HEAD: _warmup_cosine(plan.warmup_steps, plan.total_steps),
        _BACKBONE: _warmup_cosine(plan.backbone_warmup_steps, plan.total_steps, start=plan.head_only_steps),
    }
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [schedules[g["part"]] for g in optimizer.param_groups])
    return optimizer, scheduler


def _criterion(config: TrainConfig, counts: np.ndarray, device: torch.device) -> nn.Module:
    """Label-smoothed cross entropy, weighted by inverse class frequency when `balance` is "loss"."""
    loss_weight = None
    if config.balance == "loss":
        present = counts > 0
        weights = np.zeros(len(counts), dtype=np.float32)
        weights[present] = counts.sum() / (present.sum() * counts[present])
        loss_weight = torch.from_numpy(weights).to(device)
    return nn.CrossEntropyLoss(weight=loss_weight, label_smoothing=config.label_smoothing)


def _warmup_cosine(warmup: int, total: int, *, start: int = 0, floor: float = 0.01) -> Callable[[int], float]:
    """LR multiplier per step: 0 before `start`, then a linear warm-up to 1 over `warmup` steps, then a cosine down to
    `floor` at step `total`."""

    def factor(step: int) -> float:
        if step < start:
            return 0.0
        step -= start
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - start - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class _EpochStats:
    loss: float
    acc: float
    seen: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.seen / max(self.seconds, 1e-9)


@dataclass
class _Validation:
    acc: float
    loss: float
    logits: np.ndarray


@dataclass
class _Best:
    """The best epoch so far (validation accuracy, ties broken by loss), with its weights and validation logits.

    Without a validation split every epoch counts as the best, so the last one is kept.
    """

    acc: float = -1.0
    loss: float = math.inf
    epoch: int = 0
    state: dict[str, torch.Tensor] | None = None
    logits: np.ndarray | None = None
    bad_epochs: int = 0  # epochs since the last improvement

    @property
    def val_acc(self) -> float | None:
        return self.acc if self.acc >= 0 else None

    def update(self, epoch: int, model: nn.Module, val: _Validation | None) -> None:
        if val is not None and not (val.acc > self.acc or (val.acc == self.acc and val.loss < self.loss)):
            self.bad_epochs += 1
            return
        if val is not None:
            self.acc, self.loss, self.logits = val.acc, val.loss, val.logits
        else:
            self.acc, self.loss = -1.0, math.inf
        self.epoch = epoch
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.bad_epochs = 0


class _FullRun:
    """One full fine-tuning run: set up from the config, then epochs of training and validation, then the result.

    One process on one device. `models.distributed` runs one per device under DistributedDataParallel by overriding
    the hooks that differ there: the training model, the epoch's batches, the stop check, the epoch's totals and
    the agreement on early stopping; validation and the best weights stay with the main process (`is_main`).
    """

    world = 1  # processes training together
    is_main = True  # validates, keeps the best weights and reports progress

    def __init__(
        self,
        config: TrainConfig,
        data: TrainData,
        model: nn.Module,
        cfg: PreprocessConfig,
        device: torch.device,
        on_progress: ProgressCallback | None,
        should_stop: StopCheck | None,
    ) -> None:
        self.config, self.data, self.model, self.cfg, self.device = config, data, model, cfg, device
        self.on_progress, self.should_stop = on_progress, should_stop
        self.cuda = device.type == "cuda"
        self.device_text = describe_device(device)
        torch.manual_seed(config.seed)
        self.sample_gen = torch.Generator().manual_seed(config.seed)
        self.augment_gen = torch.Generator().manual_seed(config.seed + 1)
        if self.cuda:  # fixed input size: cuDNN may time its kernels once per shape and keep the fastest
            torch.backends.cudnn.benchmark = config.cudnn_benchmark
        model.to(  # type: ignore[call-overload]  # torch's stub lacks to(device, memory_format=...)
            device, memory_format=torch.channels_last if self.cuda else torch.contiguous_format
        )
        self.train_model = self._training_model(model)
        self.plan = _plan_steps(config, len(data.train_labels))
        self.optimizer, self.scheduler = _optimizer_and_schedule(model, config, self.plan)
        self.counts = _class_counts(data.train_labels, len(data.class_names))
        self.criterion = _criterion(config, self.counts, device)
        self.train_labels = torch.from_numpy(data.train_labels)
        self.global_step = 0
        self.bn_frozen = False
        self.started = time.monotonic()

    def run(self) -> TrainResult:
        history: list[EpochRecord] = []
        best = _Best()
        stopped_early = False
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # gathers the next batch while this one runs
        try:
            for epoch in range(1, self.plan.epochs + 1):
                stats = self._train_epoch(epoch, pool, best.val_acc)
                if len(self.data.val_labels):
                    self._stop_point(f"validation of epoch {epoch}")
                val = self._validate(epoch)
                if self.is_main:
                    best.update(epoch, self.model, val)
                history.append(self._history_point(epoch, stats, val))
                self._report(
                    "val",
                    epoch,
                    loss=stats.loss,
                    train_acc=stats.acc,
                    val_acc=val.acc if val is not None else None,
                    images_per_s=stats.images_per_s,
                    eta_s=self._eta(time.monotonic()),
                )
                patience = self.config.patience
                out_of_patience = val is not None and 0 < patience <= best.bad_epochs and epoch < self.plan.epochs
                if self._agreed(out_of_patience):
                    stopped_early = True
                    break
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return self._result(best, history, stopped_early)

    def _train_epoch(
        self, epoch: int, pool: concurrent.futures.ThreadPoolExecutor, best_val_acc: float | None
    ) -> _EpochStats:
        """One epoch of steps over class-balanced (or shuffled) batches, reporting every `progress_every_s`."""
        plan = self.plan
        batches = self._epoch_batches(epoch)
        self.model.train()
        self.bn_frozen = False
        epoch_start = time.monotonic()
        last_report = 0.0
        loss_sum = torch.zeros((), device=self.device)
        correct_sum = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        future = pool.submit(self._gather, batches[0])
        for step, indices in enumerate(batches, start=1):
            self._stop_point(f"epoch {epoch}, step {step}")
            pixels = future.result()
            if step < len(batches):
                future = pool.submit(self._gather, batches[step])
            self._freeze_batch_norm(plan.freeze_bn or self.global_step < plan.head_only_steps)
            loss, correct = self._step(pixels, indices)
            # Accumulate on the device: a .item() per step would stall the GPU pipeline.
            loss_sum += loss * len(indices)
            correct_sum += correct
            seen += len(indices)
            now = time.monotonic()
            if step == 1 or now - last_report >= self.config.progress_every_s:
                last_report = now
                self._report(
                    "train",
                    epoch,
                    loss=float(loss_sum) / seen,
                    train_acc=float(correct_sum) / seen,
                    val_acc=best_val_acc,
                    images_per_s=seen * self.world / max(now - epoch_start, 1e-9),
                    eta_s=self._eta(now),
                )
        total_loss, total_correct, total_seen = self._epoch_totals(float(loss_sum), float(correct_sum), seen)
        return _EpochStats(
            loss=total_loss / max(total_seen, 1),
            acc=total_correct / max(total_seen, 1),
            seen=total_seen,
            seconds=time.monotonic() - epoch_start,
        )

    # --- what a distributed run (models.distributed) does differently -------------------------------------------

    def _training_model(self, model: nn.Module) -> nn.Module:
        """The module the training steps call: the model itself, or its torch.compile wrapper."""
        return cast(nn.Module, torch.compile(model)) if self.config.compile else model

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This process's batches of the epoch (sorted train indices): class-balanced draws, or a shuffle."""
        plan = self.plan
        num = plan.steps_per_epoch * plan.batch_size
        order = _epoch_indices(self.config.balance, self.data.train_labels, self.counts, num, self.sample_gen)
        return [np.sort(order[i * plan.batch_size : (i + 1) * plan.batch_size]) for i in range(self._epoch_steps())]

    def _epoch_steps(self) -> int:
        """Optimiser steps in the coming epoch (the last one may be cut short by `max_steps`)."""
        return min(self.plan.steps_per_epoch, self.plan.total_steps - self.global_step)

    def _stop_point(self, where: str) -> None:
        """Raise TrainingStopped when a stop was asked for (checked every step and before each validation)."""
        _check_stop(self.should_stop, where)

    def _epoch_totals(self, loss_sum: float, correct: float, seen: int) -> tuple[float, float, int]:
        """The epoch's summed loss, correct predictions and images over every process training together."""
        return loss_sum, correct, seen

    def _agreed(self, stop_early: bool) -> bool:
        """Whether every process stops early now (the main process's verdict: it alone validates)."""
        return stop_early

    def _gather(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self.data.train_pixels[indices])

    def _freeze_batch_norm(self, frozen: bool) -> None:
        """BatchNorm layers in eval mode (running statistics used and kept) or back in training mode."""
        if frozen == self.bn_frozen:
            return
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train(not frozen)
        self.bn_frozen = frozen

    def _step(self, pixels: np.ndarray, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser and schedule step on a batch: its mean loss and its number of correct predictions."""
        images = _to_device_nchw(pixels, self.device)
        labels = self.train_labels[indices].to(self.device, non_blocking=True)
        if self.config.augment:
            images = augment_batch(images, generator=self.augment_gen)
        inputs = normalize_nchw(images, self.cfg, channels_last=self.cuda)
        with _autocast(self.device, self.config.amp):
            logits = self.train_model(inputs)
            loss = self.criterion(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.global_step += 1
        return loss.detach(), (logits.detach().argmax(dim=1) == labels).sum()

    def _validate(self, epoch: int) -> _Validation | None:
        """Accuracy, loss and logits on the validation split; None without one."""
        if not len(self.data.val_labels):
            return None
        logits = predict_logits(
            self.model,
            self.data.val_pixels,
            self.cfg,
            device=self.device,
            batch_size=self.config.eval_batch_size,
            amp=self.config.amp,
        )
        labels = self.data.val_labels
        loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
        return _Validation(acc=float((logits.argmax(axis=1) == labels).mean()), loss=loss, logits=logits)

    def _history_point(self, epoch: int, stats: _EpochStats, val: _Validation | None) -> EpochRecord:
        return EpochRecord(
            epoch=epoch,
            train_acc=stats.acc,
            val_acc=val.acc if val is not None else None,
            seconds=stats.seconds,
            train_loss=stats.loss,
            val_loss=val.loss if val is not None else None,
            lr=float(self.optimizer.param_groups[0]["lr"]),
            images_per_s=stats.images_per_s,
        )

    def _eta(self, now: float) -> float:
        return (now - self.started) / self.global_step * (self.plan.total_steps - self.global_step)

    def _report(self, phase: str, epoch: int, **numbers: float | None) -> None:
        _report(
            self.on_progress,
            Progress(
                phase=phase,
                epoch=epoch,
                epochs=self.plan.epochs,
                step=self.global_step,
                steps=self.plan.total_steps,
                device=self.device_text,
                **numbers,
            ),
        )

    def _result(self, best: _Best, history: list[EpochRecord], stopped_early: bool) -> TrainResult:
        """The best epoch's weights in eval mode, a temperature fitted on its validation logits, the final report."""
        if best.state is not None:
            self.model.load_state_dict(best.state)
        self.model.eval()
        temperature = 1.0
        if best.logits is not None and len(best.logits):
            temperature = fit_temperature(best.logits, self.data.val_labels)
        last = history[-1] if history else None
        self._report(
            "done",
            len(history),
            loss=last.train_loss if last else None,
            train_acc=last.train_acc if last else None,
            val_acc=best.val_acc,
            eta_s=0.0,
        )
        return TrainResult(
            model=self.model,
            temperature=temperature,
            history=history,
            best_epoch=best.epoch,
            best_val_acc=best.val_acc,
            val_logits=best.logits,
            stopped_early=stopped_early,
        )


def _epoch_indices(
    balance: str, labels: np.ndarray, counts: np.ndarray, num: int, generator: torch.Generator
) -> np.ndarray:
    """Training indices for one epoch: class-balanced draws with replacement, or a shuffle."""
    if balance == "sampler":
        weights = 1.0 / counts[labels]
        sampler = WeightedRandomSampler(
            torch.from_numpy(weights),  # type: ignore[arg-type]  # takes a tensor (as_tensor); stub: Sequence[float]
            num_samples=num,
            replacement=True,
            generator=generator,
        )
        return np.fromiter(iter(sampler), dtype=np.int64, count=num)
    return torch.randperm(len(labels), generator=generator)[:num].numpy()


def extract_features(
    model: nn.Module,
    pixels: PixelRows,
    cfg: PreprocessConfig,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    amp: bool = True,
) -> np.ndarray:
    """Pooled backbone features (N, D) float32: `forward_head(forward_features(x), pre_logits=True)`.

    Reports phase "features" progress per batch (throttled to about once a second) and honours `should_stop`.
    """
    device = torch.device(device) if isinstance(device, str) else device
    model.eval()
    model.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]  # stub lacks this overload
    n = len(pixels)
    out = np.zeros((n, int(timm_api(model).num_features)), dtype=np.float32)
    started = last = time.monotonic()
    with torch.inference_mode(), _autocast(device, amp):
        for start in range(0, n, batch_size):
            _check_stop(should_stop, f"feature extraction at image {start}")
            batch = normalize_nchw(_to_device_nchw(pixels[start : start + batch_size], device), cfg, channels_last=True)
            feats = timm_api(model).forward_head(timm_api(model).forward_features(batch), pre_logits=True)
            out[start : start + len(batch)] = feats.float().cpu().numpy()
            now = time.monotonic()
            done = start + len(batch)
            if now - last >= 1.0 or done == n:
                last = now
                rate = done / max(now - started, 1e-9)
                _report(
                    on_progress,
                    Progress(
                        phase="features",
                        step=done,
                        steps=n,
                        images_per_s=rate,
                        eta_s=(n - done) / rate,
                        device=describe_device(device),
                    ),
                )
    return out


@dataclass(frozen=True)
class HeadFit:
    """A fitted linear head for raw features, and the L2 strength it was fitted with."""

    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    l2: float


def fit_head(
    features: np.ndarray,
    labels: np.ndarray,
    val_features: np.ndarray | None,
    val_labels: np.ndarray | None,
    *,
    num_classes: int,
    config: TrainConfig | None = None,
    blocks: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fit_linear_head`'s (weight, bias)."""
    fit = fit_linear_head(
        features, labels, val_features, val_labels, num_classes=num_classes, config=config, blocks=blocks
    )
    return fit.weight, fit.bias


def fit_linear_head(
    features: np.ndarray,
    labels: np.ndarray,
    val_features: np.ndarray | None,
    val_labels: np.ndarray | None,
    *,
    num_classes: int,
    config: TrainConfig | None = None,
    blocks: Sequence[int] | None = None,
    start: HeadFit | None = None,
) -> HeadFit:
    """A class-balanced, L2-regularised multinomial logistic regression on features -> (weight (C, D), bias (C,)).

    Full-batch LBFGS on standardised features (folded back into the returned weights, so they apply to raw
    features). `blocks`, the widths of consecutive feature blocks (a stage-pooled network's `block_dims`), scales each
    standardised block to the same total variance, so that the widest block does not take the L2 budget (measured:
    +1.3 points over standardising alone, models/stages.py). Without `config.head_l2`, the strength is chosen from a
    small grid by validation log loss (warm-started from strong to weak). `start`, an earlier fit of the same
    classes on these features' columns, is where LBFGS starts instead of zero (`refit_head`). Classes absent from
    `labels` keep zero weights and a very low bias.
    """
    config = config or TrainConfig()
    device = head_device(config)
    x = torch.as_tensor(np.asarray(features, dtype=np.float32)).to(device)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64)).to(device)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features {tuple(x.shape)} and labels {tuple(y.shape)} do not match")
    if x.shape[0] < 2 or len(torch.unique(y)) < 2:
        raise NotEnoughData("fitting a classifier head needs at least 2 labelled images from 2 categories")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be class indices in [0, {num_classes})")

    mean = x.mean(dim=0)
    std = x.std(dim=0).clamp_min(1e-6) / _block_scales(blocks, x.shape[1]).to(device)
    z = (x - mean) / std
    counts = torch.bincount(y, minlength=num_classes).double()
    if config.balance == "none":
        sample_w = torch.ones(len(y), dtype=torch.float32, device=device)
    else:
        class_w = torch.where(counts > 0, len(y) / (counts.clamp_min(1) * (counts > 0).sum()), 0.0)
        sample_w = class_w[y].float()
    sample_w = sample_w / sample_w.sum()

    have_val = val_features is not None and val_labels is not None and len(val_labels) > 0
    if config.head_l2 is not None:
        grid: tuple[float, ...] = (config.head_l2,)
    elif have_val:
        grid = HEAD_L2_GRID
    else:
        grid = (1e-3,)
    if have_val:
        zv = (torch.as_tensor(np.asarray(val_features, dtype=np.float32)).to(device) - mean) / std
        yv = torch.as_tensor(np.asarray(val_labels, dtype=np.int64)).to(device)

    weight = torch.zeros(num_classes, x.shape[1], device=device)
    bias = torch.zeros(num_classes, device=device)
    if start is not None:  # the same function in this fit's standardised space: W z + b = W_raw x + b_raw
        weight = start.weight.to(device) * std
        bias = start.bias.to(device) + start.weight.to(device) @ mean
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    best: tuple[float, torch.Tensor, torch.Tensor, float] | None = None
    with _cpu_threads(config.head_threads):
        for l2 in grid:
            _lbfgs_fit(z, y, sample_w, weight, bias, l2, config.head_max_iter)
            if len(grid) == 1:
                best = (0.0, weight.detach().clone(), bias.detach().clone(), l2)
                break
            with torch.no_grad():
                score = float(F.cross_entropy(F.linear(zv, weight, bias), yv))
            if best is None or score < best[0]:
                best = (score, weight.detach().clone(), bias.detach().clone(), l2)
    assert best is not None
    _, w, b, chosen = best
    absent = counts == 0
    w[absent] = 0.0
    b[absent] = b[~absent].min() - 10.0  # never predicted until the class has examples
    # Fold the standardisation in: W z + b = (W / std) x + (b - (W / std) . mean).
    w_raw = w / std
    b_raw = b - w_raw @ mean
    return HeadFit(w_raw.cpu().contiguous(), b_raw.cpu().contiguous(), float(chosen))


def refit_head(
    fit: HeadFit,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    config: TrainConfig,
    blocks: Sequence[int] | None = None,
) -> HeadFit:
    """`fit` refitted on more labelled rows (train and validation together) with the L2 strength validation picked,
    starting from `fit`: what scikit-learn's `LogisticRegressionCV(refit=True)` does once the search is over.

    Measured on the bundled backbone's stage-pooled features (3 random samples of 800 train + 100 validation
    Fashion-MNIST labels, all 10,000 test images): 85.47 -> 85.78 % (+0.31 points, paired SE 0.08), the gain of
    12.5 % more labels. The validation split has then been seen by the head, so its honest numbers (calibration,
    validation metrics) come from `fit`, not from the refit."""
    return fit_linear_head(
        features,
        labels,
        None,
        None,
        num_classes=num_classes,
        config=dataclasses.replace(config, head_l2=fit.l2),
        blocks=blocks,
        start=fit,
    )


def head_device(config: TrainConfig) -> torch.device:
    """Where head fits and label checks run: the job's GPU when it has one, else the CPU (MPS is left out: the
    LBFGS fits are not proven there). On an H200 the K-fold heads of a 60,000-image label check took 93 s on one
    CPU thread, most of a fine-tune that trained for 56 s (docs/benchmarks.md, GPU figures)."""
    device = pick_device(config.device)
    return device if device.type == "cuda" else torch.device("cpu")


def _block_scales(blocks: Sequence[int] | None, width: int) -> torch.Tensor:
    """Per feature: sqrt(width / (number of blocks * its block's width)), 1 without blocks."""
    if not blocks:
        return torch.ones(width)
    if sum(blocks) != width or min(blocks) < 1:
        raise ValueError(f"feature blocks {list(blocks)} do not add up to the {width} features")
    return torch.cat([torch.full((b,), (width / (len(blocks) * b)) ** 0.5) for b in blocks])


@contextlib.contextmanager
def _cpu_threads(threads: int) -> Iterator[None]:
    """Temporarily cap torch's CPU threads. Measured on a shared 2-core machine: the head fit's small matmuls ran
    2-4x faster on 1 thread than on 2 under load, and about as fast unloaded (benchmarks/bench_quick_retrain.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, previous)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _lbfgs_fit(
    z: torch.Tensor,
    y: torch.Tensor,
    sample_w: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    l2: float,
    max_iter: int,
) -> None:
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = F.linear(z, weight, bias)
        loss = (F.cross_entropy(logits, y, reduction="none") * sample_w).sum() + 0.5 * l2 * (weight * weight).sum()
        loss.backward()
        return loss

    optimizer.step(closure)


def set_head(model: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """Put a fitted (C, D) weight and (C,) bias into the model's classifier, resizing it to C classes if needed."""
    weight = torch.as_tensor(weight)
    bias = torch.as_tensor(bias)
    head = timm_api(model).get_classifier()
    if not isinstance(head, nn.Linear) or head.out_features != weight.shape[0]:
        device = next(model.parameters()).device
        timm_api(model).reset_classifier(int(weight.shape[0]))
        head = timm_api(model).get_classifier()
        head.to(device)  # timm builds the new head on the CPU: keep it with the rest of the model (CUDA)
    if not isinstance(head, nn.Linear) or head.in_features != weight.shape[1]:
        raise ValueError(f"head weight {tuple(weight.shape)} does not fit the model's classifier {head}")
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight))
        head.bias.copy_(bias.to(head.bias))
    return model


def resize_head(model: nn.Module, old_classes: list[str], new_classes: list[str], *, seed: int = 0) -> nn.Module:
    """Give the model a head for `new_classes`, keeping the rows of classes that persist (matched by name).

    Classes new since the parent version start with small random weights and the mean old bias, so existing
    predictions are unchanged until training teaches the new rows.
    """
    head = timm_api(model).get_classifier()
    if not isinstance(head, nn.Linear) or head.out_features != len(old_classes):
        raise ValueError(
            f"the model's head has {getattr(head, 'out_features', '?')} outputs, "
            f"not the {len(old_classes)} old classes given"
        )
    old_weight = head.weight.detach().clone()
    old_bias = head.bias.detach().clone()
    device = old_weight.device
    timm_api(model).reset_classifier(len(new_classes))
    new_head = timm_api(model).get_classifier()
    assert isinstance(new_head, nn.Linear), f"timm rebuilt a non-linear classifier: {new_head}"  # as the old one was
    generator = torch.Generator().manual_seed(seed)
    old_index = {name: i for i, name in enumerate(old_classes)}
    with torch.no_grad():
        new_head.weight.copy_(torch.randn(new_head.weight.shape, generator=generator) * 0.01)
        new_head.bias.fill_(float(old_bias.mean()) if len(old_bias) else 0.0)
        for j, name in enumerate(new_classes):
            if name in old_index:
                new_head.weight[j] = old_weight[old_index[name]].cpu()
                new_head.bias[j] = old_bias[old_index[name]].cpu()
    new_head.to(device)
    return model


def head_logits(model: nn.Module, features: np.ndarray) -> np.ndarray:
    """Float64 logits of the model's linear classifier over pooled backbone features (N, D)."""
    head = timm_api(model).get_classifier()
    assert isinstance(head, nn.Linear), f"the model's classifier is not linear: {head}"
    weight = head.weight.detach().double().cpu().numpy()
    bias = head.bias.detach().double().cpu().numpy()
    return np.asarray(features, dtype=np.float64) @ weight.T + bias


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float | None:
    return float((logits.argmax(axis=1) == labels).mean()) if len(labels) else None


def train_quick(
    config: TrainConfig,
    data: TrainData,
    *,
    model: nn.Module,
    cfg: PreprocessConfig,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    train_features: np.ndarray | None = None,
    val_features: np.ndarray | None = None,
) -> TrainResult:
    """Quick retraining: backbone features (given, e.g. from a cache, or extracted), a refit head, a temperature.

    The head's L2 strength is picked on validation; with `config.head_refit` the head is then refitted on train and
    validation together (`refit_head`). The result's `val_logits`, `best_val_acc` and temperature come from the head
    before that refit, the last one that had not seen validation. The backbone is untouched, so features cached for
    the parent version stay valid for the result. Reports phase "head" before the fit, then "val" (the fit's numbers,
    as one epoch) and "done".
    """
    device = pick_device(config.device)
    if train_features is None:
        train_features = extract_features(
            model,
            data.train_pixels,
            cfg,
            device=device,
            batch_size=config.eval_batch_size,
            on_progress=on_progress,
            should_stop=should_stop,
            amp=config.amp,
        )
    if val_features is None:
        val_features = extract_features(
            model,
            data.val_pixels,
            cfg,
            device=device,
            batch_size=config.eval_batch_size,
            should_stop=should_stop,
            amp=config.amp,
        )
    _check_stop(should_stop, "before fitting the head")
    started = time.monotonic()
    where = describe_device(head_device(config))  # the fit's device, which later reports must not contradict
    _report(on_progress, Progress(phase="head", step=0, steps=1, device=where))
    num_classes = len(data.class_names)
    blocks = block_dims(model)
    fit = fit_linear_head(
        train_features,
        data.train_labels,
        val_features,
        data.val_labels,
        num_classes=num_classes,
        config=config,
        blocks=blocks,
    )
    set_head(model, fit.weight, fit.bias)
    model.eval()
    train_acc = _accuracy(head_logits(model, train_features), data.train_labels)
    val_acc = val_loss = None
    val_logits = None
    temperature = 1.0
    if len(data.val_labels):  # measured and calibrated on the head that has not seen validation
        val_logits = head_logits(model, val_features)
        val_acc = _accuracy(val_logits, data.val_labels)
        val_loss = float(F.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(data.val_labels)))
        temperature = fit_temperature(val_logits, data.val_labels)
        if config.head_refit:
            _check_stop(should_stop, "before refitting the head")
            both = np.concatenate([np.asarray(train_features), np.asarray(val_features)])
            labels = np.concatenate([data.train_labels, data.val_labels])
            fit = refit_head(fit, both, labels, num_classes=num_classes, config=config, blocks=blocks)
            set_head(model, fit.weight, fit.bias)
    seconds = time.monotonic() - started
    history = [EpochRecord(epoch=1, train_acc=train_acc, val_acc=val_acc, seconds=seconds, val_loss=val_loss)]
    fitted = Progress(
        phase="val", epoch=1, epochs=1, step=1, steps=1, train_acc=train_acc, val_acc=val_acc, eta_s=0.0, device=where
    )
    _report(on_progress, fitted)
    _report(on_progress, dataclasses.replace(fitted, phase="done"))
    return TrainResult(
        model=model,
        temperature=temperature,
        history=history,
        best_epoch=1,
        best_val_acc=val_acc,
        val_logits=val_logits,
        extra={"head_seconds": seconds, "head_l2": fit.l2},
    )
