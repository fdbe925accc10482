"""Fashion-MNIST through the whole product: import, cache, train via the job queue and worker, classify files.

    python benchmarks/fashion_mnist.py --preset cpu-short --out results/fmnist-cpu.json
    python benchmarks/fashion_mnist.py --preset gpu-full --out results/fmnist-gpu.json

Every step is the code users run: images enter as PNG files through `core.catalog.ingest.import_uploads` into a fresh
data
directory (the app's own 80/10/10 hash split applies), a "full" training job is queued with
`core.jobs.queue.enqueue_training` and run by `python -m core.jobs.worker --once` (or the same code in this process),
and the official 10,000 test images (never imported, so never trained on) are classified as PNG files on disk with
`core.ml.predict.predict_files`, the path behind `python -m core.cli predict`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `core`, `models` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from tqdm import tqdm

from benchmarks.common import (
    ROOT,
    device_name,
    library_versions,
    markdown_table,
    peak_rss_mb,
    rate,
    timed,
    write_json,
)

# Job parameters per preset: network settings plus models.training.TrainConfig fields (unknown keys are refused
# by TrainConfig.from_dict, so a typo fails loudly instead of being ignored).
PRESETS: dict[str, dict[str, Any]] = {
    # A few minutes on 2 CPU cores: a few thousand images at 32 px, resnet18 from scratch (a smoke run).
    "cpu-short": {
        "train_limit": 6000,
        "test_limit": None,
        "pretrained": "none",
        "device": "cpu",
        "params": {"arch": "resnet18", "image_size": 32, "epochs": 4, "batch_size": 64},
    },
    # The best measured on 2 CPU cores inside 20 minutes end to end (90.3 %, docs/benchmarks.md).
    "cpu-20min": {
        "train_limit": None,
        "test_limit": None,
        "pretrained": "none",
        "device": "cpu",
        "params": {"arch": "resnet18", "image_size": 32, "epochs": 8, "batch_size": 128},
    },
    # One GPU, the default start since issue 9: a full fine-tune of the bundled ImageNet EfficientNet-Lite0 on all
    # 60,000 training images (the app's 80 % train split of them), 128 px, backbone at half the head's learning rate.
    "gpu-pretrained": {
        "train_limit": None,
        "test_limit": None,
        "pretrained": "auto",
        "device": "cuda",
        "params": {
            "arch": "efficientnet_lite0",
            "image_size": 128,
            "epochs": 8,
            "batch_size": 256,
            "lr": 0.002,
            "backbone_lr_scale": 0.5,
            "patience": 4,
            "amp": True,
            "compile": False,
        },
    },
    # One GPU: all 60,000 training images at 64 px, long enough to beat 95.0 % test accuracy.
    "gpu-full": {
        "train_limit": None,
        "test_limit": None,
        "pretrained": "auto",
        "device": "cuda",
        "params": {
            "arch": "resnet18",
            "image_size": 64,
            "epochs": 30,
            "batch_size": 512,
            "lr": 0.002,
            "patience": 8,
            "amp": True,
            "compile": False,
        },
    },
}
COLUMNS = (
    "preset",
    "device",
    "arch",
    "px",
    "epochs",
    "train imgs",
    "test imgs",
    "import s",
    "import img/s",
    "cache s",
    "cache img/s",
    "train s",
    "train img/s",
    "predict s",
    "predict img/s",
    "test acc",
    "macro F1",
    "ECE",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-short")
    parser.add_argument("--train-limit", type=int, help="Official training images to import, balanced (0: all).")
    parser.add_argument("--test-limit", type=int, help="Official test images to classify, balanced (0: all).")
    parser.add_argument("--arch", help="timm architecture, e.g. resnet18, resnet50.")
    parser.add_argument("--image-size", type=int, help="Training and inference resolution in pixels.")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--device", help="auto, cpu, cuda or mps.")
    parser.add_argument("--pretrained", choices=("auto", "hub", "file", "none"), help="Backbone weights source.")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Any other training parameter (a TrainConfig field), e.g. --set lr=0.003 --set precision=bf16.",
    )
    parser.add_argument(
        "--worker",
        choices=("subprocess", "in-process"),
        default="subprocess",
        help="Run the job with `python -m core.jobs.worker --once` (default) or the worker's code in this process.",
    )
    parser.add_argument("--data-dir", type=Path, help="Data directory to use (default: a fresh temporary one).")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    return parser.parse_args(argv)


def _value(text: str) -> Any:
    """`--set` values: JSON-ish literals (numbers, true/false, null) else the string."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The preset with command-line overrides applied."""
    preset = PRESETS[args.preset]
    params = dict(preset["params"])
    for key in ("arch", "image_size", "epochs", "batch_size"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        params[key.strip()] = _value(raw.strip())
    device = args.device or preset["device"]
    params["device"] = device

    def limit(given: int | None, default: int | None) -> int | None:
        value = default if given is None else given
        return None if value is None or value == 0 else int(value)

    return {
        "preset": args.preset,
        "train_limit": limit(args.train_limit, preset["train_limit"]),
        "test_limit": limit(args.test_limit, preset["test_limit"]),
        "pretrained": args.pretrained or preset["pretrained"],
        "device": device,
        "params": params,
        "worker": args.worker,
    }


def _configure_environment(data_dir: Path, config: dict[str, Any]) -> None:
    """Settings for this run (and the worker subprocess): its own data dir, device, weights source."""
    os.environ["PRODCAT_DATA_DIR"] = str(data_dir)
    os.environ["PRODCAT_AUTH"] = "none"  # a benchmark acts alone: no sign-in
    os.environ.pop("PRODCAT_DATABASE_URL", None)
    os.environ["PRODCAT_DEVICE"] = config["device"]
    os.environ["PRODCAT_PRETRAINED"] = config["pretrained"]
    os.environ["PRODCAT_DEFAULT_ARCH"] = str(config["params"]["arch"])
    os.environ["PRODCAT_IMAGE_SIZE"] = str(config["params"]["image_size"])
    # The first version is activated anyway; "always" also makes reruns into an existing data dir serve the new one.
    os.environ["PRODCAT_PROMOTE_POLICY"] = "always"


def _bar(desc: str) -> tuple[tqdm, Any]:
    bar = tqdm(total=None, unit="img", desc=desc, mininterval=1.0)

    def progress(done: int, total: int | None, *_: Any) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return bar, progress


def import_train_set(db: Any, limit: int | None) -> dict[str, Any]:
    """Import the official training images (balanced when limited) as PNG uploads; timed."""
    from core.catalog.demo import balanced_indices, load_fashion_mnist, make_uploads
    from core.catalog.ingest import import_uploads

    data = load_fashion_mnist("train")
    uploads, labels = make_uploads(data, balanced_indices(data.labels, limit))
    bar, progress = _bar("import")
    with timed() as clock:
        result = import_uploads(
            db, uploads, labels=labels, actor="benchmark", source="benchmark:fashion-mnist", progress=progress
        )
    bar.close()
    if result.refused:
        raise SystemExit(f"import refused {len(result.refused)} images, e.g. {result.refused[0]}")
    return {
        "images": len(uploads),
        "imported": len(result.imported),
        "duplicates": len(result.duplicates),
        "seconds": clock.seconds,
        "images_per_s": rate(len(uploads), clock.seconds),
        "source": data.source,
    }


def build_pixel_cache(db: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Decode every labelled image into the pixel cache the training job will read (timed on its own)."""
    from core.ml.pixel_cache import PixelCache
    from core.ml.versions import labelled_images
    from models.factory import create_network, preprocessing_config

    # The same preprocessing config the job resolves (it depends on the architecture, not on the weights).
    model, _ = create_network(str(params["arch"]), 10, pretrained="none")
    cfg = preprocessing_config(model, int(params["image_size"]))
    del model
    ids = [image_id for image_id, _ in labelled_images(db)]
    cache = PixelCache.for_config(db.settings, cfg)
    bar = tqdm(total=len(ids), unit="img", desc="cache", mininterval=1.0)

    def progress(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()

    with timed() as clock:
        cache.fill(db, ids, progress=progress)
    bar.close()
    return {
        "images": len(ids),
        "seconds": clock.seconds,
        "images_per_s": rate(len(ids), clock.seconds),
        "crop_pct": cfg.crop_pct,
        "interpolation": cfg.interpolation,
    }


class _PhaseTimeline:
    """Polls the job's stored progress while it runs: when each phase was first seen, for a breakdown of the job.

    A phase shorter than the poll interval can be missed; the worker's start-up shows as the time to the first phase.
    """

    def __init__(self, db: Any, job_id: int, every_s: float = 0.2) -> None:
        import threading

        self.db, self.job_id, self.every_s = db, job_id, every_s
        self.seen: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._start = 0.0  # set on entry, before polling starts

    def __enter__(self) -> _PhaseTimeline:
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        from core.jobs.queue import get_job

        shown: tuple[str, int | None] | None = None
        while not self._stop.wait(self.every_s):
            report = get_job(self.db, self.job_id).report
            now = time.perf_counter() - self._start
            if report.phase and (not self.seen or self.seen[-1][1] != report.phase):
                self.seen.append((now, report.phase))
            if report.phase and (report.phase, report.epoch) != shown:
                shown = (report.phase, report.epoch)  # printed as it happens: a run cut off by a time limit says where
                rate = f", {report.images_per_s:,.0f} img/s" if report.images_per_s else ""
                print(f"  {now:6.1f} s {report.phase} epoch {report.epoch} step {report.step}/{report.steps}{rate}",
                      flush=True)  # fmt: skip

    def durations(self, total_s: float) -> list[dict[str, Any]]:
        """Each phase with its start and how long it lasted (until the next phase, or the job's end)."""
        ends = [t for t, _ in self.seen[1:]] + [total_s]
        first = [{"phase": "worker start-up", "start_s": 0.0, "seconds": self.seen[0][0]}] if self.seen else []
        return first + [
            {"phase": phase, "start_s": round(start, 2), "seconds": round(end - start, 2)}
            for (start, phase), end in zip(self.seen, ends, strict=True)
        ]


def train_through_worker(db: Any, params: dict[str, Any], how: str) -> dict[str, Any]:
    """Queue a full training job and run it with the worker; timed end to end (job start to version registered)."""
    from core.jobs.queue import enqueue_training, get_job

    job_id = enqueue_training(db, "full", params, "benchmark")
    with timed() as clock, _PhaseTimeline(db, job_id) as timeline:
        if how == "subprocess":
            log = Path(db.settings.logs_dir) / "benchmark-worker.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w", encoding="utf-8") as handle:
                code = subprocess.call(
                    [sys.executable, "-m", "core.jobs.worker", "--once"], cwd=ROOT, stdout=handle, stderr=handle
                )
            if code != 0:
                raise SystemExit(f"the worker exited with {code}; see {log}")
        else:
            from core.jobs.worker import run_job_in_foreground

            run_job_in_foreground(db, job_id)
    job = get_job(db, job_id)
    if job.status != "succeeded" or job.model_version_id is None:
        raise SystemExit(f"training job {job_id} ended {job.status}: {job.error}")
    phases = timeline.durations(clock.seconds)
    totals: dict[str, float] = {}
    for row in phases:
        totals[row["phase"]] = totals.get(row["phase"], 0.0) + row["seconds"]
    for phase, seconds in totals.items():
        print(f"  job phase {phase!r}: {seconds:.1f} s", flush=True)
    return {"job_id": job_id, "seconds": clock.seconds, "job": job, "phases": phases}


def _job_summary(db: Any, job: Any, train_seconds: float, epochs: int) -> dict[str, Any]:
    """Figures from the job row (progress, per-epoch history, timestamps) and the model version it produced."""
    from core.ml.versions import get_version

    progress = dict(job.progress or {})
    history = list(job.history)
    version = get_version(db, int(job.model_version_id))
    metrics = dict(getattr(version, "metrics", None) or {})
    train_images = int((metrics.get("train") or {}).get("n_images") or 0)
    epochs_run = max((int(p.get("epoch") or 0) for p in history), default=epochs)  # early stopping may cut it short
    job_seconds = (
        (job.finished_at - job.started_at).total_seconds() if job.started_at and job.finished_at else train_seconds
    )
    return {
        # Wall time of the worker process: start-up, training, calibration, evaluation, checkpoint, predictions.
        "seconds": train_seconds,
        "job_seconds": job_seconds,
        "epochs_run": epochs_run,
        "device": progress.get("device"),
        "train_images": train_images,
        "images_per_s": rate(train_images * epochs_run, job_seconds),
        "history": history,
        "model_version_id": job.model_version_id,
        "pretrained_source": getattr(version, "pretrained_source", None),
        "app_val_accuracy": (metrics.get("val") or {}).get("accuracy"),
        "app_test_accuracy": (metrics.get("test") or {}).get("accuracy"),
        "temperature": metrics.get("temperature"),
    }


def classify_test_set(db: Any, limit: int | None, work: Path) -> dict[str, Any]:
    """Write the official test images as PNG files and classify them with predict_files; metrics and timing."""
    from core.catalog.demo import FASHION_MNIST_CLASSES, balanced_indices, encode_png, file_name, load_fashion_mnist
    from core.ml.predict import predict_files
    from models.metrics import classification_metrics

    data = load_fashion_mnist("test")
    indices = balanced_indices(data.labels, limit)
    folder = work / "official-test-png"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in indices:
        path = folder / file_name("test", int(index))
        path.write_bytes(encode_png(data.images[index]))
        paths.append(path)
    y_true = data.labels[indices].astype(np.int64)
    class_index = {name: i for i, name in enumerate(FASHION_MNIST_CLASSES)}

    results = []
    bar = tqdm(total=len(paths), unit="img", desc="predict", mininterval=1.0)
    with timed() as clock:
        # Chunks only bound memory; each call is exactly what `predict FILES...` does.
        for start in range(0, len(paths), 2000):
            results += predict_files(db, paths[start : start + 2000], top_k=len(FASHION_MNIST_CLASSES))
            bar.update(min(2000, len(paths) - start))
    bar.close()
    failed = [r for r in results if r.error]
    if failed:
        raise SystemExit(f"{len(failed)} test files could not be classified, e.g. {failed[0].name}: {failed[0].error}")
    # Full probability vectors in the official class order, from the top-k list (k = every class).
    probs = np.zeros((len(results), len(FASHION_MNIST_CLASSES)))
    for row, result in enumerate(results):
        for entry in result.top_k:
            probs[row, class_index[entry.category]] = entry.probability
    metrics = classification_metrics(y_true, probs, list(FASHION_MNIST_CLASSES))
    return {
        "images": len(paths),
        "seconds": clock.seconds,
        "images_per_s": rate(len(paths), clock.seconds),
        "accuracy": float(metrics["accuracy"]),
        "macro_f1": float(metrics["macro_f1"]),
        "ece": float(metrics["ece"]),
        "per_class_f1": {
            name: float(values["f1"]) for name, values in (metrics.get("per_class") or {}).items() if "f1" in values
        },
    }


def run(config: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    """The whole benchmark in `data_dir`; returns the results dictionary."""
    _configure_environment(data_dir, config)
    from core.db import open_database
    from core.settings import get_settings
    from models.devices import pick_device

    get_settings.cache_clear()
    db = open_database(get_settings())
    started = time.perf_counter()
    params = config["params"]
    print(f"data dir {data_dir}; settings {config}", flush=True)

    imported = import_train_set(db, config["train_limit"])
    print(f"import: {imported['images']} images in {imported['seconds']:.1f} s", flush=True)
    cached = build_pixel_cache(db, params)
    print(f"cache: {cached['images']} images in {cached['seconds']:.1f} s", flush=True)
    trained = train_through_worker(db, params, config["worker"])
    training = _job_summary(db, trained["job"], trained["seconds"], int(params.get("epochs") or 1))
    training["phases"] = trained["phases"]
    print(f"training: {training['seconds']:.1f} s, app test accuracy {training['app_test_accuracy']}", flush=True)
    predicted = classify_test_set(db, config["test_limit"], data_dir)
    print(f"prediction: {predicted['images']} files in {predicted['seconds']:.1f} s", flush=True)

    return {
        "benchmark": "fashion_mnist",
        "settings": config,
        # The worker picks the same device from the same settings; its own description is in training.device.
        "device": device_name(pick_device(config["device"])),
        "import": imported,
        "cache": cached,
        "training": training,
        "prediction": predicted,
        "total_seconds": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(),
        "versions": library_versions(),
        "data_dir": str(data_dir),
    }


def table_row(results: dict[str, Any]) -> dict[str, Any]:
    """The markdown-table cells of one run."""
    params = results["settings"]["params"]
    return {
        "preset": results["settings"]["preset"],
        "device": results["device"],
        "arch": params.get("arch"),
        "px": params.get("image_size"),
        "epochs": results["training"]["epochs_run"],
        "train imgs": results["import"]["images"],
        "test imgs": results["prediction"]["images"],
        "import s": results["import"]["seconds"],
        "import img/s": results["import"]["images_per_s"],
        "cache s": results["cache"]["seconds"],
        "cache img/s": results["cache"]["images_per_s"],
        "train s": results["training"]["seconds"],
        "train img/s": results["training"]["images_per_s"],
        "predict s": results["prediction"]["seconds"],
        "predict img/s": results["prediction"]["images_per_s"],
        "test acc": results["prediction"]["accuracy"],
        "macro F1": results["prediction"]["macro_f1"],
        "ECE": results["prediction"]["ece"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = resolve_settings(args)
    if args.data_dir is not None:
        results = run(config, args.data_dir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="prodcat-fmnist-") as tmp:
            results = run(config, Path(tmp) / "data")
            results["data_dir"] = "(temporary, removed)"
    write_json(args.out, results)
    print()
    print(markdown_table(COLUMNS, [table_row(results)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
