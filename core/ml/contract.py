"""The training run's typed contract with the job queue: what a run takes (JobParams) and what it reports
while it runs (ProgressReport). core.ml defines them; core.jobs stores them with the job."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from core.errors import TrainingRefused
from models.modes import TrainMode

HISTORY_KEYS = ("epoch", "loss", "train_acc", "val_acc")

_NON_EPOCH_PHASES = ("done",)


@dataclass(frozen=True)
class JobParams:
    """What a training job carries: its mode and the TrainConfig settings it overrides (`training_jobs.params`)."""

    mode: TrainMode
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, mode: str, params: Any) -> JobParams:
        """A known mode and a dict of plain JSON values, or TrainingRefused naming what is wrong.

        Whether the overrides are TrainConfig fields with fitting values is `core.ml.training.build_train_config`'s
        call.
        """
        try:
            known = TrainMode(mode)
        except (TypeError, ValueError):
            raise TrainingRefused(f"unknown training mode {mode!r}: use one of {', '.join(TrainMode)}") from None
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise TrainingRefused(f"training parameters must be a dict of name -> value, got {type(params).__name__}")
        try:
            params = json.loads(json.dumps(params))  # stored as JSON: refuse what would not survive the trip
        except (TypeError, ValueError) as exc:
            raise TrainingRefused(f"training parameters must be plain JSON values: {exc}") from exc
        return cls(known, params)


@dataclass(frozen=True)
class ProgressReport:
    """One progress report of a running job, stored as JSON in `training_jobs.progress` (beside its `history`).

    `phase` is what people read ("training (val)"); `stage` is the models library's own phase ("features", "head",
    "train", "val", "done"; None for core's own steps), so the history can tell the loop's summary from an epoch.
    """

    phase: str
    stage: str | None = None
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    train_acc: float | None = None
    val_acc: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    device: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Every field, None where unknown, as plain JSON values (numpy numbers become Python ones)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=_json_number))

    @classmethod
    def from_library(cls, progress: Any, phase: str) -> ProgressReport:
        """A models.training report as the job's: `phase` for people, the library's own phase as `stage`."""
        return cls(**{**dataclasses.asdict(progress), "phase": phase, "stage": progress.phase})

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> ProgressReport:
        """A stored report (rows written before a field existed lack it); other keys, such as `history`, are skipped."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"phase": "", **{k: v for k, v in values.items() if k in known}})

    def history_point(self) -> dict[str, Any] | None:
        """The point this report contributes to the per-epoch curves (HISTORY_KEYS), or None: no epoch, a summary
        ("done"), or no number at all."""
        values = self.to_json()
        epoch = values["epoch"]
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            return None
        if self.stage in _NON_EPOCH_PHASES or self.phase in _NON_EPOCH_PHASES:
            return None
        point = {key: values[key] for key in HISTORY_KEYS}
        if all(point[key] is None for key in HISTORY_KEYS[1:]):
            return None
        return point


def _json_number(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)
