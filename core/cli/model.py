"""CLI commands for models: `predict`, `train`, `evaluate`, `models list`, `models activate`, `export model`.

Heavy libraries (torch, timm) are imported inside the commands so `--help` and the other commands stay fast.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypedDict

import typer

from core.cli.app import ActorOpt, JsonOpt, actor_or_default, app, export_app, fail, models_app, open_db, print_json
from core.jobs.queue import TrainMode
from core.ml.contract import ProgressReport
from core.schema import JobStatus, VersionStatus


class _TopKCell(TypedDict):
    category: str
    probability: float


class _PredictionRow(TypedDict):
    """One `predict` result as printed (JSON keys, CSV and text columns)."""

    file: str
    category: str | None
    confidence: float | None
    top_k: list[_TopKCell]
    error: str | None
    model_version: int | None


class DeviceChoice(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
    MPS = "mps"


@app.command("predict")
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files to classify (they are not imported).")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="How many likely categories to list.")] = 3,
    as_json: JsonOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV (file, category, confidence, top_k).")] = False,
) -> None:
    """Predict the category of image files with the active model, without importing them."""
    from core.catalog.export import spreadsheet_safe
    from core.ml.predict import predict_files

    db = open_db()
    results = predict_files(db, paths, top_k=top_k)
    rows: list[_PredictionRow] = [
        {
            "file": r.name,
            "category": r.category,
            "confidence": None if r.confidence is None else round(r.confidence, 4),
            "top_k": [{"category": t.category, "probability": round(t.probability, 4)} for t in r.top_k],
            "error": r.error,
            "model_version": r.model_version_id,
        }
        for r in results
    ]
    if as_json:
        print_json(rows)
    elif as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["file", "category", "confidence", "top_k", "error"])
        for row in rows:
            top = "; ".join(f"{t['category']}:{t['probability']:.4f}" for t in row["top_k"])
            cells = [row["file"], row["category"] or "", row["confidence"] or "", top, row["error"] or ""]
            writer.writerow([spreadsheet_safe(cell) for cell in cells])
    else:
        for row in rows:
            if row["error"]:
                typer.secho(f"{row['file']}: refused: {row['error']}", fg=typer.colors.RED)
                continue
            top = ", ".join(f"{t['category']} {t['probability']:.1%}" for t in row["top_k"])
            typer.echo(f"{row['file']}: {row['category']} ({row['confidence']:.1%})  [{top}]")
    if rows and all(r["error"] for r in rows):
        raise typer.Exit(1)


@app.command("train")
def train(
    mode: Annotated[TrainMode | None, typer.Option("--mode", help="quick: head only; full: all layers.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Epochs (full mode).")] = None,
    arch: Annotated[str | None, typer.Option("--arch", help="timm architecture, e.g. resnet18, resnet50.")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", min=16, help="Input size in pixels.")] = None,
    device: Annotated[DeviceChoice, typer.Option("--device", help="Where to train.")] = DeviceChoice.AUTO,
    wait: Annotated[bool, typer.Option("--wait", help="Train here in the foreground and wait for the result.")] = False,
    actor: ActorOpt = None,
) -> None:
    """Queue a retrain on the current labels (or run it here with --wait)."""
    from core.jobs.queue import enqueue_training
    from core.ml.backbone import next_start
    from core.ml.training import training_plan

    db = open_db()
    plan = training_plan(db, mode=mode)
    if plan.problems:
        raise fail("training refused:\n  - " + "\n  - ".join(plan.problems))
    for note in plan.notes:  # categories left out of this retrain, and what they need
        typer.echo(f"note: {note}")
    # Said before queueing: which backbone and weights the job starts from, and refused weights stop it here.
    start = next_start(db, job_arch=arch or None, image_size=image_size, labelled=plan.labelled)
    if start.problem is not None:
        raise fail(f"training refused: {start.problem}")
    typer.echo(f"backbone: {start.description}")
    for note in start.notes:
        typer.echo(f"  {note}")
    if start.expected is not None:
        typer.echo(f"  {start.expected.describe(start.labelled)}")
    params: dict[str, Any] = {}
    if epochs is not None:
        params["epochs"] = epochs
    if arch:
        params["arch"] = arch
    if image_size:
        params["image_size"] = image_size
    if device != DeviceChoice.AUTO:
        params["device"] = device.value
    job_id = enqueue_training(db, plan.mode, params, actor_or_default(actor))
    if not wait:
        from core.jobs.queue import ensure_worker

        started = ensure_worker(db)
        typer.echo(f"queued training job {job_id} ({plan.mode})" + ("; started a worker" if started else ""))
        return
    version_id = _run_in_foreground(db, job_id)
    typer.echo(f"job {job_id} succeeded: model v{version_id}")
    _print_version_summary(db, version_id)


class JobBars:
    """A job run here, shown as one tqdm line per phase (per epoch while training): its count, rate and time.

    A phase runs from its first report to the next phase's; one whose first report comes after its first batch is
    timed from the report before (a bar started then showed rates of a million images a second). A phase without a
    count shows its time only, so "saving" no longer reads as "1/1" of the fit before it. Reports of a loop's
    validation and summary ("val", "done") update the current line.
    """

    _FOLLOW_UPS = frozenset({"val", "done"})

    def __init__(self, file: Any = None) -> None:
        self.file = file if file is not None else sys.stderr
        self.bar: Any = None
        self.key: tuple[str, int | None] | None = None
        self.phase_end = time.time()  # tqdm's own clock

    def show(self, report: ProgressReport) -> None:
        key = (report.phase, report.epoch)
        if self.bar is None or (key != self.key and report.stage not in self._FOLLOW_UPS):
            self._open(report, key)
        bar = self.bar
        if bar.total and report.steps and bar.total != report.steps:  # a counted phase whose count grew
            bar.total = report.steps
        if report.step is not None and bar.total:
            bar.n = int(report.step)
        numbers = {"loss": report.loss, "train_acc": report.train_acc, "val_acc": report.val_acc}
        bar.set_postfix({k: f"{v:.3f}" for k, v in numbers.items() if v is not None}, refresh=False)
        bar.refresh()
        self.phase_end = time.time()

    def _open(self, report: ProgressReport, key: tuple[str, int | None]) -> None:
        from tqdm import tqdm

        self.close()
        counted = bool(report.steps and report.steps > 1)
        epoch = f" epoch {report.epoch}/{report.epochs}" if report.epochs else ""
        self.bar = tqdm(
            total=report.steps if counted else None,
            desc=f"{'training' if report.stage == 'train' else report.phase}{epoch}",
            unit="batch" if report.stage == "train" else "img",
            file=self.file,
            bar_format=None if counted else "{desc}: {elapsed}{postfix}",
        )
        if report.step:  # reported after its first batch: the phase began when the last report came
            self.bar.start_t = self.phase_end
        self.key = key

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _run_in_foreground(db: Any, job_id: int) -> int:
    """Claim the job in this process and run it the way the worker does, with a line of progress per phase."""
    from core.jobs import queue as jobs
    from core.jobs import worker

    bars = JobBars()
    try:
        job = worker.run_job_in_foreground(db, job_id, on_progress=bars.show)
    finally:
        bars.close()
    view = jobs.get_job(db, job_id)
    if view.status != JobStatus.SUCCEEDED:
        raise fail(f"training job {job_id} {view.status}: {view.error or 'no message'}")
    version_id = job if isinstance(job, int) else view.model_version_id
    assert version_id is not None  # a succeeded training job names the version it wrote (queue.finish_job)
    return int(version_id)


def _print_version_summary(db: Any, version_id: int) -> None:
    from core.ml.versions import get_version

    v = get_version(db, version_id)
    typer.echo(f"v{v.id}: {v.status}, {v.accuracy.describe()}, classes: {', '.join(v.class_names)}")


@app.command("evaluate")
def evaluate(
    version: Annotated[int | None, typer.Option("--version", help="Model version id (default: active).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure a model version on the test split as labelled today (its stored accuracy is the one at training)."""
    from core.ml.versions import AccuracyBasis, AccuracyFigure, active_version, evaluate_version

    db = open_db()
    if version is None:
        active = active_version(db)
        if active is None:
            raise fail("no active model yet: train one with `train`")
        version = active.id
    metrics = evaluate_version(db, version)
    if as_json:
        print_json({"version": version, **metrics})
        return
    if not metrics.get("n_images"):
        typer.echo(f"v{version}: {metrics.get('note', 'no labelled test images')}")
        return
    today = AccuracyFigure(metrics["accuracy"], int(metrics["n_images"]), AccuracyBasis.TODAYS_LABELS)
    typer.echo(f"v{version}: {today.describe()}, macro F1 {metrics['macro_f1']:.3f}, ECE {metrics['ece']:.3f}")
    per_class = metrics.get("per_class") or {}
    if isinstance(per_class, dict):
        for name, stats in per_class.items():
            typer.echo(
                f"  {name}: precision {stats.get('precision', 0):.2f} recall {stats.get('recall', 0):.2f} "
                f"f1 {stats.get('f1', 0):.2f} (n={stats.get('support', 0)})"
            )


def _fmt(value: float | None, pattern: str = "{:.1%}") -> str:
    return "-" if value is None else pattern.format(value)


@models_app.command("list")
def models_list(as_json: JsonOpt = False) -> None:
    """List model versions, newest first (the active one is marked)."""
    from core.ml.versions import list_versions

    versions = list_versions(open_db())
    if as_json:
        print_json(
            [
                {
                    "id": v.id,
                    "status": v.status,
                    "arch": v.arch,
                    "image_size": v.image_size,
                    "mode": v.mode,
                    "classes": v.class_names,
                    "test_accuracy": v.test_accuracy,
                    "test_images": v.test_images,
                    "macro_f1": v.macro_f1,
                    "ece": v.ece,
                    "created_at": v.created_at,
                    "activated_at": v.activated_at,
                    "pretrained_source": v.pretrained_source,
                    "job_id": v.job_id,
                    "parent_id": v.parent_id,
                }
                for v in versions
            ]
        )
        return
    if not versions:
        typer.echo("no model versions yet: train one with `train`")
        return
    # The backbone source (where the lineage's weights started) goes last: file names make it the widest column.
    typer.echo(
        f"{'':2}{'id':>4}  {'status':9}  {'arch':18}  {'px':>4}  {'mode':5}  {'test acc':>8}  "
        f"{'F1':>5}  {'ECE':>5}  {'classes':>7}  {'created':16}  backbone source"
    )
    for v in versions:
        mark = "* " if v.status == VersionStatus.ACTIVE else "  "
        typer.echo(
            f"{mark}{v.id:>4}  {v.status:9}  {v.arch:18}  {v.image_size:>4}  {v.mode:5}  {_fmt(v.test_accuracy):>8}  "
            f"{_fmt(v.macro_f1, '{:.3f}'):>5}  {_fmt(v.ece, '{:.3f}'):>5}  {len(v.class_names):>7}  "
            f"{v.created_at:%Y-%m-%d %H:%M}  {v.pretrained_source}"
        )


@models_app.command("activate")
def models_activate(
    version: Annotated[int, typer.Argument(help="Model version id to serve predictions (older = rollback).")],
    actor: ActorOpt = None,
) -> None:
    """Make a model version the active one (rollback = activate an older one) and refresh its predictions."""
    from core.ml.predict import refresh_predictions
    from core.ml.versions import activate_version

    db = open_db()
    view = activate_version(db, version, actor=actor_or_default(actor))
    unreadable: list = []
    computed = refresh_predictions(db, view.id, unreadable=unreadable)
    typer.echo(f"v{view.id} is now active ({computed - len(unreadable)} predictions computed)")
    for refusal in unreadable:
        typer.echo(f"no prediction for {refusal}", err=True)


@export_app.command("model")
def export_model(
    directory: Annotated[Path, typer.Argument(help="Folder to write the model into (created if needed).")],
    version: Annotated[int | None, typer.Option("--version", help="Model version id (default: active).")] = None,
    onnx: Annotated[bool, typer.Option("--onnx/--no-onnx", help="Also write ONNX if onnx is installed.")] = True,
) -> None:
    """Export a model version: safetensors weights + JSON sidecar (and ONNX when the onnx package is installed)."""
    from core.ml.versions import checkpoint_path, load_classifier

    db = open_db()
    classifier, view = load_classifier(db, version)
    source = checkpoint_path(db, view)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(source.parent.glob(source.stem + ".*")):
        target = directory / (f"model-v{view.id}" + path.name[len(source.stem) :])
        shutil.copyfile(path, target)
        written.append(target)
    info = {
        "version": view.id,
        "arch": view.arch,
        "image_size": view.image_size,
        "classes": view.class_names,
        "test_accuracy": view.test_accuracy,
        "temperature": view.temperature,
    }
    (directory / f"model-v{view.id}.version.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    written.append(directory / f"model-v{view.id}.version.json")
    if onnx:
        onnx_path = _export_onnx(classifier, view, directory)
        if onnx_path is not None:
            written.append(onnx_path)
        else:
            typer.echo("onnx is not installed: skipped the ONNX file (pip install onnx to get it)")
    for path in written:
        typer.echo(str(path))


def _export_onnx(classifier: Any, view: Any, directory: Path) -> Path | None:
    try:
        import onnx  # noqa: F401 (only checking it is there; torch.onnx needs it)
    except ImportError:
        return None
    import torch

    model = classifier.model.to("cpu").eval()
    dummy = torch.zeros(1, 3, view.image_size, view.image_size)
    path = directory / f"model-v{view.id}.onnx"
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
    )
    return path
