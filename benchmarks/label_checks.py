"""Label checks (issue 10): are wrong labels found after one retrain, and what does the K-fold step cost?

    python benchmarks/label_checks.py --out results/label-checks.json
    python benchmarks/label_checks.py --quick

Every setting is the default a new catalogue gets (`PRODCAT_IMAGE_SIZE`, `PRODCAT_DEFAULT_ARCH` and friends unset:
224 px, the retrain mode picked by hardware, quick on a CPU), with `PRODCAT_PRETRAINED=auto` and `HF_HUB_OFFLINE=1`,
so the bundled ImageNet EfficientNet-Lite0 is the backbone. Each noise scenario gets a fresh temporary data directory:

1. uniform: `--images` Fashion-MNIST training images (balanced, `core.catalog.demo.balanced_indices`) imported as
labelled
   PNG uploads (`core.catalog.ingest.import_uploads`) with `--noise` of the labels flipped to another class picked
   uniformly (seeded); one retrain (`core.jobs.queue.enqueue_training` + `core.jobs.worker.run_job_in_foreground`).
2. shirts: the same images with `--swap` of the Shirt labels turned into T-shirt/top and the same share of the
   T-shirt/top labels turned into Shirt (class-conditional noise between two classes that look alike).

Scored on the top K of each list, K = the number of flipped labels (so precision@K = recall@K):

- after: `core.views.review.review_queue(order="suspected-mislabel")`, which ranks every labelled image by the stored
  label check (K-fold out-of-sample probabilities, cleanlab self-confidence).
- before: the rule the order had before the label checks (af15e80~1 `core/views/review.py`), recomputed from the same
run:
  only labelled val and test images ranked, by cleanlab's `get_label_quality_scores` on the active version's stored
  `predictions` probabilities (lowest first, ties by id); the train split's images after them by id, unscored.

Also reported: the check's estimate of wrong labels (`core.ml.label_checks.label_health`: open issues), how many of the
flags are real flips, and how often the suggested category (`image_checks.suggested_category_id`) is the true one.

3. timing: the label check at `--timing-images` labelled images. Importing and extracting 10,000 images at 224 px
   takes over 3 minutes on 2 CPU cores, so the timing uses real backbone features of that many distinct Fashion-MNIST
   training images extracted at 64 px by the network a new quick lineage gets (`models.training.extract_features`,
   the same stage-pooled feature width as at 224 px) and calls `core.ml.label_checks.check_labels` on them (what the
   training job calls; the same seconds it keeps in `metrics["label_check"]["seconds"]`), with
   `models.label_checks.cross_validated_probs` alone timed too, with the head's L2 (as the job runs it) and with the
   check's own L2 search on the first fold (as jobs ran it before). The baseline is the quick retrain's own head fit
   on the same features: `models.training.fit_linear_head` on the 80 % train rows with the val-picked L2 grid on
   10 % val rows, then `refit_head` on both at the picked L2 (what `train_quick` does).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `core`, `models` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.common import device_name, library_versions, markdown_table, peak_rss_mb, timed, write_json

ACTOR = "benchmark"
NUM_CLASSES = 10
TSHIRT, SHIRT = 0, 6  # Fashion-MNIST class indices of T-shirt/top and Shirt
# Environment a run must not inherit: the benchmark measures the defaults a new catalogue gets.
UNSET = (
    "PRODCAT_DATABASE_URL",
    "PRODCAT_DEFAULT_ARCH",
    "PRODCAT_IMAGE_SIZE",
    "PRODCAT_PRETRAINED_FILE",
    "PRODCAT_LABEL_CHECK_FOLDS",
    "PRODCAT_PROMOTE_POLICY",
    "PRODCAT_DEVICE",
)
FULL = {"images": 2000, "timing_images": 10_000}
QUICK = {"images": 400, "timing_images": 2000}
NOISE_COLUMNS = (
    "noise",
    "images",
    "K (flips)",
    "flips in val+test",
    "before P@K",
    "before R@K",
    "after P@K",
    "after R@K",
    "estimated issues",
    "flagged flips",
    "suggestion right (all flips)",
    "suggestion right (top-K flips)",
    "app test acc (noisy labels)",
    "check s",
    "job s",
)
TIMING_COLUMNS = ("labelled images", "features", "check_labels s", "K-fold probs s", "head fit s", "ratio")


@dataclass(frozen=True)
class Noisy:
    """Given labels (class index per chosen image, some flipped) and which positions were flipped."""

    labels: np.ndarray
    flipped: np.ndarray  # bool per chosen image


def flip_uniformly(truth: np.ndarray, *, share: float, seed: int) -> Noisy:
    """`share` of the labels (rounded) moved to another class picked uniformly among the other nine."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(truth), size=round(share * len(truth)), replace=False)
    labels = truth.copy()
    labels[chosen] = (truth[chosen] + rng.integers(1, NUM_CLASSES, size=len(chosen))) % NUM_CLASSES
    flipped = np.zeros(len(truth), dtype=bool)
    flipped[chosen] = True
    return Noisy(labels, flipped)


def swap_classes(truth: np.ndarray, a: int, b: int, *, share: float, seed: int) -> Noisy:
    """`share` of class a's labels turned into b and the same share of b's into a (seeded)."""
    rng = np.random.default_rng(seed)
    labels = truth.copy()
    flipped = np.zeros(len(truth), dtype=bool)
    for source, target in ((a, b), (b, a)):
        rows = np.flatnonzero(truth == source)
        chosen = rng.choice(rows, size=round(share * len(rows)), replace=False)
        labels[chosen] = target
        flipped[chosen] = True
    return Noisy(labels, flipped)


def open_catalogue(data_dir: Path) -> Any:
    """A fresh database in `data_dir` with every default, the bundled backbone and no hub."""
    from core.db import close_all, open_database
    from core.settings import get_settings

    close_all()
    os.environ["PRODCAT_DATA_DIR"] = str(data_dir)
    os.environ["PRODCAT_AUTH"] = "none"  # a benchmark acts alone: no sign-in
    os.environ["PRODCAT_PRETRAINED"] = "auto"
    os.environ["HF_HUB_OFFLINE"] = "1"
    get_settings.cache_clear()
    return open_database(get_settings())


def catalogue_rows(db: Any) -> dict[str, dict[str, Any]]:
    """original_name -> image id, split and current label category id, for every image."""
    from sqlalchemy import select

    from core.schema import Image, Label

    with db.read() as session:
        rows = session.execute(
            select(Image.id, Image.original_name, Image.split, Label.category_id).outerjoin(
                Label, Label.image_id == Image.id
            )
        ).all()
    return {name: {"id": int(i), "split": split, "label": c} for i, name, split, c in rows}


def old_suspected_order(db: Any, version_id: int) -> list[int]:
    """Image ids in the order suspected-mislabel had before issue 10 (af15e80~1 core/views/review.py, no merges here):
    labelled val+test images with a stored prediction, by cleanlab label quality of its probabilities, lowest first
    (ties by id); then every other image by id."""
    from cleanlab.rank import get_label_quality_scores
    from sqlalchemy import select

    from core.schema import Image, Label, ModelVersion, Prediction
    from core.views.review import OUT_OF_SAMPLE_SPLITS

    with db.read() as session:
        classes = [int(c) for c in session.get(ModelVersion, version_id).class_category_ids]
        scorable = session.execute(
            select(Image.id, Label.category_id, Prediction.probs)
            .join(Label, Label.image_id == Image.id)
            .join(Prediction, (Prediction.image_id == Image.id) & (Prediction.model_version_id == version_id))
            .where(Image.split.in_(OUT_OF_SAMPLE_SPLITS), Label.category_id.in_(classes))
        ).all()
        every = [int(i) for i in session.scalars(select(Image.id).order_by(Image.id))]
    ids = np.array([int(r[0]) for r in scorable], dtype=np.int64)
    labels = np.array([classes.index(int(r[1])) for r in scorable], dtype=np.int64)
    probs = np.array([r[2] for r in scorable], dtype=np.float64)
    quality = np.asarray(get_label_quality_scores(labels, probs), dtype=np.float64)
    ranked = [int(i) for i in ids[np.lexsort((ids, quality))]]
    scored = set(ranked)
    return ranked + [i for i in every if i not in scored]


def suspected_order(db: Any, limit: int) -> list[Any]:
    """The first `limit` review items of the suspected-mislabel order (every labelled image, the stored check)."""
    from core.views.review import MAX_PAGE_SIZE, ReviewOrder, review_queue

    items: list[Any] = []
    page = 1
    while len(items) < limit:
        got = review_queue(db, order=ReviewOrder.SUSPECTED_MISLABEL, page=page, page_size=MAX_PAGE_SIZE)
        items += got.items
        if page >= got.pages:
            break
        page += 1
    return items[:limit]


def run_noise(name: str, data: Any, chosen: np.ndarray, noisy: Noisy, work: Path) -> dict[str, Any]:
    """Import with noisy labels, one default retrain, then score the suspected lists before and after."""
    from sqlalchemy import select

    from core.catalog.demo import FASHION_MNIST_CLASSES, make_uploads
    from core.catalog.ingest import import_uploads
    from core.jobs.queue import enqueue_training, get_job
    from core.jobs.worker import run_job_in_foreground
    from core.ml.label_checks import label_health
    from core.ml.training import suggested_mode
    from core.ml.versions import active_version
    from core.schema import Category, ImageCheck, ModelVersion

    data_dir = work / name
    db = open_catalogue(data_dir)
    uploads, _ = make_uploads(data, chosen)
    given = {u.name: FASHION_MNIST_CLASSES[int(c)] for u, c in zip(uploads, noisy.labels, strict=True)}
    truth_of = {u.name: FASHION_MNIST_CLASSES[int(data.labels[i])] for u, i in zip(uploads, chosen, strict=True)}
    flipped_names = {u.name for u, f in zip(uploads, noisy.flipped, strict=True) if f}
    with timed() as imported:
        result = import_uploads(db, uploads, labels=given, actor=ACTOR)
    if result.refused:
        raise RuntimeError(f"import refused {len(result.refused)} files: {result.refused[:3]}")
    rows = catalogue_rows(db)
    flips = {rows[n]["id"] for n in flipped_names if n in rows}  # an exact duplicate upload is stored once
    mode = str(suggested_mode(db.settings))
    print(f"{name}: {len(rows)} images, {len(flips)} flipped labels; {mode} retrain", flush=True)
    with timed() as job_timer:
        job_id = enqueue_training(db, mode, {}, ACTOR)
        version_id = run_job_in_foreground(db, job_id)
    if version_id is None:
        raise RuntimeError(f"training job failed: {get_job(db, job_id).error}")
    active = active_version(db)
    if active is None or active.id != version_id:
        raise RuntimeError(f"v{version_id} was not made active (active: {active and active.id})")
    k = len(flips)

    after = suspected_order(db, k)
    after_ids = [item.image_id for item in after]
    after_hits = sum(i in flips for i in after_ids)
    before_ids = old_suspected_order(db, version_id)[:k]
    before_hits = sum(i in flips for i in before_ids)

    truth_id = {}
    with db.read() as session:
        category_id = {n: int(i) for i, n in session.execute(select(Category.id, Category.name))}
        checks = {
            int(c.image_id): (int(c.suggested_category_id), bool(c.label_issue))
            for c in session.scalars(select(ImageCheck).where(ImageCheck.model_version_id == version_id))
        }
        metrics = dict(session.get(ModelVersion, version_id).metrics or {})
    for n, r in rows.items():
        truth_id[r["id"]] = category_id[truth_of[n]]
    right = [checks[i][0] == truth_id[i] for i in flips if i in checks]
    top_right = [checks[i][0] == truth_id[i] for i in after_ids if i in flips]
    flagged = {i for i, (_, issue) in checks.items() if issue}
    health = label_health(db)
    out_of_sample = {r["id"] for r in rows.values() if r["split"] in ("val", "test")}
    summary = metrics.get("label_check", {})
    test = metrics.get("test") or {}
    row = {
        "noise": name,
        "images": len(rows),
        "k": k,
        "flips_in_val_test": len(flips & out_of_sample),
        "before_precision": before_hits / k if k else None,
        "before_recall": before_hits / len(flips) if flips else None,
        "after_precision": after_hits / k if k else None,
        "after_recall": after_hits / len(flips) if flips else None,
        "after_hits_by_split": {
            s: sum(1 for it in after if it.image_id in flips and it.split == s) for s in ("train", "val", "test")
        },
        "estimated_issues": health.open_issues,
        "checked": health.checked,
        "flagged": len(flagged),
        "flagged_flips": len(flagged & flips),
        "suggestion_right_all": float(np.mean(right)) if right else None,
        "suggestion_right_top_k": float(np.mean(top_right)) if top_right else None,
        "label_check": summary,
        "test_accuracy": test.get("accuracy", metrics.get("test_accuracy")),
        "import_seconds": imported.seconds,
        "job_seconds": job_timer.seconds,
        "mode": mode,
        "arch": active.arch,
        "image_size": active.image_size,
        "pretrained_source": active.pretrained_source,
    }
    from core.db import close_all

    close_all()
    shutil.rmtree(data_dir, ignore_errors=True)  # the 224 px pixel cache is large
    return row


def noise_table_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "noise": row["noise"],
        "images": row["images"],
        "K (flips)": row["k"],
        "flips in val+test": row["flips_in_val_test"],
        "before P@K": row["before_precision"],
        "before R@K": row["before_recall"],
        "after P@K": row["after_precision"],
        "after R@K": row["after_recall"],
        "estimated issues": row["estimated_issues"],
        "flagged flips": f"{row['flagged_flips']} of {row['flagged']}",
        "suggestion right (all flips)": row["suggestion_right_all"],
        "suggestion right (top-K flips)": row["suggestion_right_top_k"],
        "app test acc (noisy labels)": row["test_accuracy"],
        "check s": row["label_check"].get("seconds"),
        "job s": row["job_seconds"],
    }


def backbone_features(data: Any, indices: np.ndarray, image_size: int) -> tuple[np.ndarray, tuple[int, ...] | None]:
    """Features of the network a new quick-mode lineage gets (the bundled backbone, what `auto` picks offline, with
    its stage-pooled blocks) for these images at `image_size`, and the widths of their blocks."""
    from PIL import Image as PILImage

    from core.ml.backbone import starting_weights
    from core.settings import get_settings
    from models.factory import build_network, preprocessing_config
    from models.preprocess import to_model_pixels
    from models.stages import block_dims, with_stage_features

    weights = starting_weights(get_settings(), None)
    model = with_stage_features(build_network(weights, NUM_CLASSES), weights.arch)
    cfg = preprocessing_config(model, image_size)
    pixels = np.stack([to_model_pixels(PILImage.fromarray(data.images[i]).convert("RGB"), cfg) for i in indices])
    from models.training import extract_features

    print(f"timing: {len(indices)} features from {weights.describe()} at {image_size} px", flush=True)
    return extract_features(model, pixels, cfg, device="cpu", batch_size=128), block_dims(model)


def run_timing(data: Any, count: int, *, seed: int, work: Path) -> dict[str, Any]:
    """check_labels and its K-fold step at `count` labelled images vs the quick head fit on the same features."""
    from core.catalog.demo import balanced_indices
    from core.ml.label_checks import LabelledSet, check_labels
    from core.settings import get_settings
    from models.label_checks import cross_validated_probs
    from models.training import TrainConfig, fit_linear_head, refit_head

    db = open_catalogue(work / "timing")  # settings (folds, weights cache) as a new catalogue has them
    settings = get_settings()
    chosen = balanced_indices(data.labels, count)
    with timed() as extracted:
        features, blocks = backbone_features(data, chosen, 64)
    labels = data.labels[chosen].astype(np.int64)
    labelled = LabelledSet(list(range(len(chosen))), labels, features, list(range(NUM_CLASSES)), blocks)
    # The quick retrain's head: 80 % train rows, L2 picked on 10 % val rows (the app's split shares), then refitted
    # on both at that L2.
    order = np.random.default_rng(seed).permutation(len(labels))
    train_rows, val_rows = order[: int(0.8 * len(order))], order[int(0.8 * len(order)) : int(0.9 * len(order))]
    config = TrainConfig()
    with timed() as head:
        fit = fit_linear_head(
            features[train_rows],
            labels[train_rows],
            features[val_rows],
            labels[val_rows],
            num_classes=NUM_CLASSES,
            config=config,
            blocks=blocks,
        )
        both = np.concatenate([train_rows, val_rows])
        refit_head(fit, features[both], labels[both], num_classes=NUM_CLASSES, config=config, blocks=blocks)
    # The job's check reuses the head's L2 (core.ml.training._check_labels); the K-fold step alone is timed both so
    # and with its own L2 search on the first fold (what every job did before).
    job_config = TrainConfig(head_l2=fit.l2)
    folds = settings.label_check_folds
    with timed() as kfold:
        cv = cross_validated_probs(
            features, labels, num_classes=NUM_CLASSES, folds=folds, seed=seed, blocks=blocks, config=job_config
        )
    with timed() as kfold_grid:
        cv_grid = cross_validated_probs(
            features, labels, num_classes=NUM_CLASSES, folds=folds, seed=seed, blocks=blocks
        )
    check = check_labels(labelled, folds=folds, seed=seed, config=job_config)
    from core.db import close_all

    close_all()
    del db
    return {
        "labelled_images": len(chosen),
        "features": f"real, {features.shape[1]}-dim, 64 px",
        "feature_seconds": extracted.seconds,
        "check_labels_seconds": check.seconds,
        "kfold_seconds": kfold.seconds,
        "kfold_own_l2_search_seconds": kfold_grid.seconds,
        "folds": cv.folds,
        "l2": cv.l2,
        "l2_own_search": cv_grid.l2,
        "estimated_issues_clean_labels": check.estimated_issues,
        "head_fit_seconds": head.seconds,
        "ratio": check.seconds / head.seconds if head.seconds else None,
        "kfold_ratio": kfold.seconds / head.seconds if head.seconds else None,
    }


def timing_table_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "labelled images": row["labelled_images"],
        "features": row["features"],
        "check_labels s": row["check_labels_seconds"],
        "K-fold probs s": row["kfold_seconds"],
        "K-fold with its own L2 search s": row["kfold_own_l2_search_seconds"],
        "head fit s": row["head_fit_seconds"],
        "ratio": row["ratio"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, help="Fashion-MNIST training images per noise scenario (default 2000).")
    parser.add_argument("--timing-images", type=int, help="Labelled images for the K-fold timing (default 10000).")
    parser.add_argument("--noise", type=float, default=0.10, help="Share of labels flipped uniformly (default 0.10).")
    parser.add_argument("--swap", type=float, default=0.20, help="Share of Shirt/T-shirt labels swapped (default 0.2).")
    parser.add_argument("--seed", type=int, default=0, help="Which labels are flipped (default 0).")
    parser.add_argument(
        "--scenarios", default="uniform,shirts,timing", help="Any of uniform, shirts, timing (comma-separated)."
    )
    parser.add_argument("--out", type=Path, help="Write every figure and setting as JSON here.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 400 images, timing at 2,000.")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - {"uniform", "shirts", "timing"}
    if unknown:
        parser.error(f"unknown scenarios {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from core.catalog.demo import balanced_indices, load_fashion_mnist
    from core.settings import Settings
    from models.devices import pick_device

    for key in UNSET:
        os.environ.pop(key, None)
    settings = Settings()
    data = load_fashion_mnist("train")
    results: dict[str, Any] = {
        "benchmark": "label_checks",
        "settings": {
            "images": args.images,
            "timing_images": args.timing_images,
            "noise": args.noise,
            "swap": args.swap,
            "seed": args.seed,
            "image_size": settings.image_size,
            "label_check_folds": settings.label_check_folds,
            "pretrained": "auto (HF_HUB_OFFLINE=1)",
            "quick": args.quick,
        },
        "device": device_name(pick_device(settings.device)),
        "versions": library_versions(),
        "noise": [],
    }
    print(f"label checks: {results['settings']}; {results['device']}", flush=True)
    started = time.perf_counter()
    chosen = balanced_indices(data.labels, args.images)
    truth = data.labels[chosen].astype(np.int64)
    with tempfile.TemporaryDirectory(prefix="prodcat-label-checks-") as tmp:
        work = Path(tmp)
        if "uniform" in args.scenarios:
            noisy = flip_uniformly(truth, share=args.noise, seed=args.seed)
            results["noise"].append(run_noise(f"uniform {args.noise:.0%}", data, chosen, noisy, work))
            write_json(args.out, results)
        if "shirts" in args.scenarios:
            noisy = swap_classes(truth, SHIRT, TSHIRT, share=args.swap, seed=args.seed)
            results["noise"].append(run_noise(f"Shirt<->T-shirt {args.swap:.0%}", data, chosen, noisy, work))
            write_json(args.out, results)
        if results["noise"]:
            print()
            print(markdown_table(NOISE_COLUMNS, [noise_table_row(r) for r in results["noise"]]), flush=True)
        if "timing" in args.scenarios:
            results["timing"] = run_timing(data, args.timing_images, seed=args.seed, work=work)
            print()
            print(markdown_table(TIMING_COLUMNS, [timing_table_row(results["timing"])]), flush=True)
    results["total_seconds"] = time.perf_counter() - started
    results["peak_rss_mb"] = peak_rss_mb()
    write_json(args.out, results)
    print(f"\ntotal {results['total_seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
