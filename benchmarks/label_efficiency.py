"""Label efficiency: official test accuracy after 100, 300, 1,000 and 3,000 labels, through the whole product.

    python benchmarks/label_efficiency.py --out results/label-efficiency.json
    python benchmarks/label_efficiency.py --quick-check

Three series, each point the product path end to end with settings defaults (`PRODCAT_DEFAULT_ARCH` and
`PRODCAT_IMAGE_SIZE` unset, the retrain mode the Train page picks by hardware: "quick" on a CPU) and
`PRODCAT_PROMOTE_POLICY=always`:

- pretrained-random: `PRODCAT_PRETRAINED=auto` (the bundled ImageNet EfficientNet-Lite0 offline); a balanced random
  sample of the official training images imported as labelled PNG uploads (`core.catalog.ingest.import_uploads`) into a
  fresh data directory, one training job (`core.jobs.queue.enqueue_training`, run by `python -m core.jobs.worker
  --once`).
- random-init-random: the same with `PRODCAT_PRETRAINED=none` (random-init resnet18, the behaviour before issue 9).
- pretrained-active: one catalogue grows. A pool of unlabelled training images (`--pool`) is imported, the first
  100 random ones labelled; after each job the next images are the ones the app's review queue puts first
  (`core.views.review.review_queue`, order "lowest confidence", unlabelled only), labelled with their true class through
  `core.catalog.labels.set_label` (what the Review page does when someone accepts or corrects a photo), up to the next
  count.

Each point then classifies official test images (never imported; `--test-limit` per class balanced) as PNG files
with `core.ml.predict.predict_files` and scores them with `models.metrics.classification_metrics`.

Timings per point: "job s" is the job row's start to finish (features, head fit, calibration, evaluation, checkpoint,
and the stored predictions the worker refreshes for every catalogue image: the whole pool in the active series);
"end-to-end s" adds the import (or the review-queue labelling), the worker's start-up and the test predictions.

`--replot A.json B.json --plot docs/label_efficiency.png` measures nothing: it redraws the curves from earlier runs'
`--out` files together (each line says its test-set size when they differ).

The random samples are nested (the 300 contain the 100) and balanced: per class a seeded random order of its images,
with the first validation-split image and the first two train-split images moved to the front, because the app's
training plan refuses a class without them (the split is fixed per image by its content hash, so it is known before
import). The active series starts from the same 100 labels.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `core`, `models` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from tqdm import tqdm

from benchmarks.common import ROOT, device_name, library_versions, markdown_table, peak_rss_mb, timed, write_json
from benchmarks.fashion_mnist import _bar, _job_summary, classify_test_set

ACTOR = "benchmark"
NUM_CLASSES = 10
DEFAULT_LABELS = (100, 300, 1000, 3000)
QUICK_CHECK = {"labels": (100, 300), "test_limit": 500, "pool": 600}
# Environment a run must not inherit: the benchmark measures the defaults a new catalogue gets.
UNSET = ("PRODCAT_DATABASE_URL", "PRODCAT_DEFAULT_ARCH", "PRODCAT_IMAGE_SIZE", "PRODCAT_PRETRAINED_FILE")
COLUMNS = (
    "series",
    "labels",
    "weights",
    "arch",
    "picking",
    "test acc",
    "macro F1",
    "ECE",
    "job s",
    "end-to-end s",
)


@dataclass(frozen=True)
class Series:
    """One learning curve: which starting weights (`PRODCAT_PRETRAINED`) and how labelled images are picked."""

    name: str
    pretrained: str
    picking: str  # "random" or "active"
    title: str


SERIES: dict[str, Series] = {
    s.name: s
    for s in (
        Series("pretrained-random", "auto", "random", "pretrained (defaults), random picking"),
        Series("random-init-random", "none", "random", "random init, random picking"),
        Series("pretrained-active", "auto", "active", "pretrained (defaults), active picking (lowest confidence)"),
    )
}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one label count")
    return values


def _series_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [n for n in names if n not in SERIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown series {', '.join(unknown) or text!r}: choose from {', '.join(SERIES)}"
        )
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=_int_list, help="Label counts, comma-separated (default 100,300,1000,3000).")
    parser.add_argument("--series", type=_series_list, default=tuple(SERIES), help=f"Any of {', '.join(SERIES)}.")
    parser.add_argument(
        "--test-limit", type=int, help="Official test images, balanced per class (default 2000; 0: all)."
    )
    parser.add_argument("--pool", type=int, help="Unlabelled pool of the active series (default 4000).")
    parser.add_argument("--seed", type=int, default=0, help="Which images the random picks take (default 0).")
    parser.add_argument(
        "--mode", choices=("auto", "quick", "full"), default="auto", help="Retrain mode (auto: picked by hardware)."
    )
    parser.add_argument("--out", type=Path, help="Write every figure and setting as JSON here (after each point).")
    parser.add_argument(
        "--plot",
        help="Learning-curve PNG (default docs/label_efficiency.png; --quick-check: a temp file; '' for none).",
    )
    parser.add_argument(
        "--replot",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="Measure nothing: redraw --plot from these earlier --out files (their rows together).",
    )
    parser.add_argument(
        "--quick-check",
        action="store_true",
        help="Smoke test: labels 100,300, --test-limit 500, pool 600 (flags given explicitly still win).",
    )
    args = parser.parse_args(argv)
    defaults = QUICK_CHECK if args.quick_check else {"labels": DEFAULT_LABELS, "test_limit": 2000, "pool": 4000}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.plot is None:
        quick = Path(tempfile.gettempdir()) / "label_efficiency-quick-check.png"
        args.plot = str(quick if args.quick_check else ROOT / "docs" / "label_efficiency.png")
    if min(args.labels) < 3 * NUM_CLASSES:
        parser.error(f"label counts must be at least {3 * NUM_CLASSES}: the training plan needs 3 labels per class")
    if "pretrained-active" in args.series and args.pool <= max(args.labels):
        parser.error(f"--pool ({args.pool}) must exceed the largest label count ({max(args.labels)})")
    if args.test_limit < 0:
        parser.error("--test-limit must be 0 (all) or positive")
    return args


# --- which images get labelled (pure) ------------------------------------------------------------------------


def picking_orders(
    images: np.ndarray, labels: np.ndarray, *, seed: int, fractions: Sequence[float]
) -> list[np.ndarray]:
    """Per class, a seeded random order of its images, with the plan's minimum (the first validation-split image and
    the first two train-split images of that order) moved to the front, so any prefix of 3 or more per class trains.

    Ingest fixes an image's split from the SHA-256 of its bytes, except that a near-duplicate (same dHash) joins the
    split of the first such image already in the catalogue. So only images without a near-duplicate anywhere in the
    training set are moved to the front: their split is known before import whatever else is imported with them.
    """
    from PIL import Image as PILImage

    from core.catalog.demo import encode_png
    from core.catalog.imaging import difference_hash
    from core.catalog.splits import split_for_hash
    from core.ml.training import MIN_TRAIN_PER_CATEGORY, MIN_VAL_PER_CATEGORY
    from core.schema import Split

    # The hash ingest computes: a greyscale PNG decodes losslessly to these very pixels.
    hashes = [difference_hash(PILImage.fromarray(np.ascontiguousarray(image))) for image in images]
    shared = {h for h, n in Counter(hashes).items() if h is not None and n > 1}
    rng = np.random.default_rng(seed)
    orders = []
    for c in range(NUM_CLASSES):
        order = rng.permutation(np.flatnonzero(labels == c))
        need = {Split.TRAIN: MIN_TRAIN_PER_CATEGORY, Split.VAL: MIN_VAL_PER_CATEGORY}
        front: list[int] = []
        for position, index in enumerate(order):
            if not any(need.values()):
                break
            if hashes[index] in shared:
                continue
            split = split_for_hash(hashlib.sha256(encode_png(images[index])).hexdigest(), fractions)
            if need.get(split, 0) > 0:
                need[split] -= 1
                front.append(position)
        orders.append(np.concatenate([order[front], np.delete(order, front)]))
    return orders


def balanced_pick(orders: Sequence[np.ndarray], count: int) -> np.ndarray:
    """The first count/10 images of every class's order (the remainder to the first classes), sorted."""
    base, extra = divmod(count, len(orders))
    chosen = [order[: base + (1 if c < extra else 0)] for c, order in enumerate(orders)]
    return np.sort(np.concatenate(chosen))


# --- one catalogue ---------------------------------------------------------------------------------------------


def open_catalogue(data_dir: Path, series: Series) -> Any:
    """A database in `data_dir` with this series' settings (inherited by the worker subprocess); other settings keep
    their defaults (`main` unsets the ones that would change what a new catalogue gets)."""
    from core.db import close_all, open_database
    from core.settings import get_settings

    close_all()
    os.environ["PRODCAT_DATA_DIR"] = str(data_dir)
    os.environ["PRODCAT_AUTH"] = "none"  # a benchmark acts alone: no sign-in
    os.environ["PRODCAT_PRETRAINED"] = series.pretrained
    os.environ["PRODCAT_PROMOTE_POLICY"] = "always"
    get_settings.cache_clear()
    return open_database(get_settings())


def import_images(db: Any, data: Any, indices: np.ndarray, labelled: set[int] | None = None) -> dict[str, Any]:
    """Import official training images as PNG uploads; all labelled, or only the indices in `labelled`."""
    from core.catalog.demo import make_uploads
    from core.catalog.ingest import import_uploads

    uploads, truth = make_uploads(data, indices)
    if labelled is not None:
        keep = {upload.name for upload, index in zip(uploads, indices, strict=True) if int(index) in labelled}
        labels = {name: category for name, category in truth.items() if name in keep}
    else:
        labels = truth
    bar, progress = _bar("import")
    with timed() as clock:
        result = import_uploads(
            db, uploads, labels=labels, actor=ACTOR, source="benchmark:label-efficiency", progress=progress
        )
    bar.close()
    if result.refused:
        raise SystemExit(f"import refused {len(result.refused)} images, e.g. {result.refused[0]}")
    return {
        "images": len(uploads),
        "labelled": len(labels),
        "imported": len(result.imported),
        "duplicates": len(result.duplicates),
        "seconds": clock.seconds,
        "truth": truth,
    }


def train_with_worker(db: Any, mode: str) -> dict[str, Any]:
    """Queue a training job with the job's defaults and run it with `python -m core.jobs.worker --once`, showing the
    job's progress from its row; the job row's start and finish times give the job seconds."""
    from core.jobs.queue import enqueue_training, get_job

    job_id = enqueue_training(db, mode, {}, ACTOR)
    log = Path(db.settings.logs_dir) / f"benchmark-worker-job{job_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # No rate: steps of different phases (features, predictions) are not comparable.
    bar = tqdm(total=None, desc=f"job {job_id}", mininterval=1.0, bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}]")
    with timed() as clock, open(log, "w", encoding="utf-8") as handle:
        worker = subprocess.Popen(
            [sys.executable, "-m", "core.jobs.worker", "--once"], cwd=ROOT, stdout=handle, stderr=handle
        )
        phase = None
        while worker.poll() is None:
            time.sleep(2.0)
            report = get_job(db, job_id).report
            if report.phase != phase:  # a new phase counts its own steps
                phase = report.phase
                bar.reset()
                bar.total = None  # reset() would keep the last phase's total
                bar.set_description(f"job {job_id}: {phase or 'starting'}", refresh=False)
            if report.steps and report.step is not None:
                bar.total, bar.n = report.steps, report.step
            bar.refresh()
    bar.close()
    job = get_job(db, job_id)
    if worker.returncode != 0 or job.status != "succeeded" or job.model_version_id is None:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(
            f"training job {job_id} ended {job.status} (worker exit {worker.returncode}): {job.error}\n{tail}"
        )
    summary = _job_summary(db, job, clock.seconds, 1)
    summary.pop("history", None)
    summary["mode"] = job.mode
    return summary


def labelled_counts(db: Any) -> dict[str, int]:
    """Labelled images in total and per app split (what the training plan counts)."""
    from core.ml.training import training_plan

    plan = training_plan(db)
    return {
        "labels": plan.labelled,
        "train": sum(c.train for c in plan.trainable),
        "val": sum(c.val for c in plan.trainable),
        "test": sum(c.test for c in plan.trainable),
    }


def label_from_review_queue(db: Any, count: int, truth: dict[str, str]) -> dict[str, Any]:
    """Label the `count` unlabelled images the review queue shows first (lowest confidence), each with its true
    class and the prediction the person saw, as the Review page does; page after page of the largest size."""
    from core.catalog.labels import SeenPrediction, set_label
    from core.views.review import MAX_PAGE_SIZE, LabelState, ReviewOrder, review_queue

    picked: list[str] = []
    wrong = unscored = 0
    bar = tqdm(total=count, unit="label", desc="label (review queue)", mininterval=1.0)
    with timed() as clock:
        while len(picked) < count:
            page = review_queue(
                db,
                order=ReviewOrder.LOWEST_CONFIDENCE,
                label_state=LabelState.UNLABELLED,
                page=1,
                page_size=min(MAX_PAGE_SIZE, count - len(picked)),
            )
            if not page.items:
                raise SystemExit(f"the pool ran out of unlabelled images after {len(picked)} of {count}: raise --pool")
            for item in page.items:
                category = truth[item.original_name]
                seen = None
                if item.predicted_category_id is not None and item.model_version_id is not None:
                    seen = SeenPrediction(
                        item.model_version_id, item.predicted_category_id, float(item.confidence or 0)
                    )
                else:
                    unscored += 1
                wrong += item.predicted is not None and item.predicted != category
                set_label(db, item.image_id, category, actor=ACTOR, seen_prediction=seen)
                picked.append(category)
                bar.update(1)
    bar.close()
    return {
        "labelled": len(picked),
        "seconds": clock.seconds,
        "predicted_wrong": int(wrong),  # picks the active model had wrong: corrections rather than confirmations
        "unscored": int(unscored),  # picks without a prediction of the active model (should be 0)
        "per_class": dict(sorted(Counter(picked).items())),
    }


def _active_arch(db: Any) -> str:
    """The architecture of the version the run just activated."""
    from core.ml.versions import active_version

    version = active_version(db)
    assert version is not None, "the run's training job activated no version"
    return version.arch


def measure(db: Any, mode: str, test_limit: int | None, work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train through the worker, then classify the official test images: (training summary, prediction results)."""
    training = train_with_worker(db, mode)
    print(f"  job: {training['job_seconds']:.1f} s ({training['mode']}, {training['pretrained_source']})", flush=True)
    predicted = classify_test_set(db, test_limit, work)
    print(f"  official test accuracy {predicted['accuracy']:.4f} on {predicted['images']} images", flush=True)
    return training, predicted


def make_row(
    series: Series,
    counts: dict[str, int],
    training: dict[str, Any],
    predicted: dict[str, Any],
    seconds: float,
    **extra: Any,
) -> dict[str, Any]:
    """One point of a curve with everything behind it."""
    return {
        "series": series.name,
        "labels": counts["labels"],
        "labelled_per_split": {k: v for k, v in counts.items() if k != "labels"},
        "weights": training["pretrained_source"],
        "arch": training.get("arch"),
        "picking": series.picking,
        "test_accuracy": predicted["accuracy"],
        "macro_f1": predicted["macro_f1"],
        "ece": predicted["ece"],
        "job_seconds": training["job_seconds"],
        "end_to_end_seconds": seconds,
        "training": training,
        "prediction": predicted,
        **extra,
    }


def run_random(
    series: Series, count: int, data: Any, orders: list[np.ndarray], args: argparse.Namespace, work: Path, mode: str
) -> dict[str, Any]:
    """One point of a random-picking series in a fresh data directory."""
    data_dir = work / f"{series.name}-{count}"
    db = open_catalogue(data_dir, series)
    started = time.perf_counter()
    imported = import_images(db, data, balanced_pick(orders, count))
    imported.pop("truth")
    counts = labelled_counts(db)
    training, predicted = measure(db, mode, args.test_limit or None, work)
    seconds = time.perf_counter() - started
    training["arch"] = _active_arch(db)
    shutil.rmtree(data_dir, ignore_errors=True)  # pixel caches at 224 px are large
    return make_row(series, counts, training, predicted, seconds, imported=imported)


def run_active(
    series: Series, data: Any, orders: list[np.ndarray], args: argparse.Namespace, work: Path, mode: str, on_row: Any
) -> None:
    """The active series: one catalogue, the pool imported once, labels added from the review queue between jobs."""
    data_dir = work / series.name
    db = open_catalogue(data_dir, series)
    first, *later = args.labels
    series_started = started = time.perf_counter()
    initial = {int(i) for i in balanced_pick(orders, first)}
    imported = import_images(db, data, balanced_pick(orders, args.pool), labelled=initial)
    truth = imported.pop("truth")
    step: dict[str, Any] = {"imported": imported}
    for target in (first, *later):
        if target != first:
            started = time.perf_counter()
            need = target - labelled_counts(db)["labels"]
            step = {"active_labels": label_from_review_queue(db, need, truth)}
        counts = labelled_counts(db)
        print(f"{series.name}: {counts['labels']} labels", flush=True)
        training, predicted = measure(db, mode, args.test_limit or None, work)
        training["arch"] = _active_arch(db)
        now = time.perf_counter()
        extra = {"pool": args.pool, "cumulative_seconds": now - series_started, **step}
        on_row(make_row(series, counts, training, predicted, now - started, **extra))
    shutil.rmtree(data_dir, ignore_errors=True)


# --- output ----------------------------------------------------------------------------------------------------


def table_row(row: dict[str, Any]) -> dict[str, Any]:
    """The markdown-table cells of one point."""
    return {
        "series": row["series"],
        "labels": row["labels"],
        "weights": row["weights"],
        "arch": row["arch"],
        "picking": row["picking"],
        "test acc": row["test_accuracy"],
        "macro F1": row["macro_f1"],
        "ECE": row["ece"],
        "job s": row["job_seconds"],
        "end-to-end s": row["end_to_end_seconds"],
    }


def learning_curves(rows: Sequence[dict[str, Any]], *, device: str, mode: str) -> Any:
    """A plotly figure: official test accuracy against labels (log x), one line per series; when the series were
    scored on test sets of different sizes, each line's name says its size."""
    import plotly.graph_objects as go

    sizes = {r["prediction"]["images"] for r in rows}
    fig = go.Figure()
    for name, series in SERIES.items():
        mine = [r for r in rows if r["series"] == name]
        if not mine:
            continue
        points = sorted((r["labels"], r["test_accuracy"]) for r in mine)
        x, y = zip(*points, strict=True)
        own = sorted({r["prediction"]["images"] for r in mine})
        title = series.title if len(sizes) == 1 else f"{series.title} ({'/'.join(f'{n:,}' for n in own)} test images)"
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                name=title,
                mode="lines+markers",
                hovertemplate="%{x} labels: %{y:.1%}<extra></extra>",
            )
        )
    ticks = sorted({r["labels"] for r in rows})
    fig.update_xaxes(type="log", title="labelled images", tickvals=ticks, ticktext=[f"{t:,}" for t in ticks])
    tested = f" ({next(iter(sizes)):,} images)" if len(sizes) == 1 else ""
    fig.update_yaxes(title=f"official test accuracy{tested}", tickformat=".0%")
    fig.update_layout(
        title=f"prodcat label efficiency on Fashion-MNIST (every default, {mode} retrain)",
        template="plotly_white",
        legend={"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0},
        annotations=[
            {
                "text": device,
                "xref": "paper",
                "yref": "paper",
                "x": 0,
                "y": 1.06,
                "showarrow": False,
                "font": {"size": 11},
                "xanchor": "left",
            }
        ],
        margin={"t": 80, "b": 120},
    )
    return fig


def replot(files: Sequence[Path], plot: Path) -> int:
    """Draw the learning curves from earlier runs' --out files (say, series measured on test sets of different
    sizes, or one seed's points from two runs) without measuring anything."""
    documents = [json.loads(f.read_text()) for f in files]
    rows = [row for document in documents for row in document["rows"]]
    modes = sorted({document["settings"]["mode"] for document in documents})
    devices = sorted({document["device"] for document in documents})
    write_plot(learning_curves(rows, device="; ".join(devices), mode="/".join(modes)), plot)
    return 0


def write_plot(fig: Any, path: Path) -> None:
    """The figure as a PNG through plotly's kaleido (which drives an installed Chrome/Chromium, or BROWSER_PATH)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.write_image(str(path), width=900, height=560, scale=2)
    except Exception as exc:  # kaleido missing, or no browser: the numbers are already written, only the picture lacks
        print(
            f"could not write {path} ({type(exc).__name__}: {exc}); install requirements-test.txt (kaleido) and "
            "Chromium, or point BROWSER_PATH at a Chrome",
            file=sys.stderr,
            flush=True,
        )
        return
    print(f"plot: {path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot, Path(args.plot))
    from core.catalog.demo import load_fashion_mnist
    from core.ml.training import suggested_mode
    from core.settings import Settings
    from models.devices import pick_device

    for key in UNSET:
        os.environ.pop(key, None)
    settings = Settings()
    mode = str(suggested_mode(settings) if args.mode == "auto" else args.mode)
    data = load_fashion_mnist("train")
    orders = picking_orders(data.images, data.labels, seed=args.seed, fractions=settings.split_fractions)
    results: dict[str, Any] = {
        "benchmark": "label_efficiency",
        "settings": {
            "labels": list(args.labels),
            "series": list(args.series),
            "test_limit": args.test_limit or None,
            "pool": args.pool,
            "seed": args.seed,
            "mode": mode,
            "image_size": settings.image_size,
            "promote_policy": "always",
            "quick_check": args.quick_check,
            "series_settings": {
                name: {"PRODCAT_PRETRAINED": s.pretrained, "picking": s.picking}
                for name, s in SERIES.items()
                if name in args.series
            },
        },
        "device": device_name(pick_device(settings.device)),
        "versions": library_versions(),
        "rows": [],
    }
    print(f"label efficiency: {results['settings']}; {results['device']}", flush=True)
    started = time.perf_counter()

    def on_row(row: dict[str, Any]) -> None:
        results["rows"].append(row)
        results["total_seconds"] = time.perf_counter() - started
        results["peak_rss_mb"] = peak_rss_mb()
        write_json(args.out, results)  # after every point: a long run that dies keeps what it measured
        print(markdown_table(COLUMNS, [table_row(row)]).splitlines()[-1], flush=True)

    with tempfile.TemporaryDirectory(prefix="prodcat-label-efficiency-") as tmp:
        work = Path(tmp)
        for name in args.series:
            series = SERIES[name]
            if series.picking == "active":
                run_active(series, data, orders, args, work, mode, on_row)
                continue
            for count in args.labels:
                print(f"{series.name}: {count} labels", flush=True)
                on_row(run_random(series, count, data, orders, args, work, mode))
    print()
    print(markdown_table(COLUMNS, [table_row(r) for r in results["rows"]]))
    print(f"\ntotal {results['total_seconds']:.0f} s", flush=True)
    if args.plot:
        figure = learning_curves(results["rows"], device=results["device"], mode=mode)
        write_plot(figure, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
